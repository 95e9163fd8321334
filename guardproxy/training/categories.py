"""Each source's own hazard categories mapped onto ``guardproxy.taxonomy`` ids (MLCommons AILuminate hazards).

Where a source has no category (AdvBench) or a category too broad to map (HarmBench ``illegal``/``harmful``,
ActorAttack "General Illicit Scenarios"), the text decides by keyword rules; those rows train the category head
with a lower weight (``INFERRED_WEIGHT``) because the rules are a guess.
"""

from __future__ import annotations

import re

from guardproxy.taxonomy import CATEGORY_IDS

INFERRED_WEIGHT = 0.5

# Source category -> taxonomy id; ``None`` means "decide from the text".
SOURCE_CATEGORIES: dict[str, dict[str, str | None]] = {
    "harmbench": {
        "copyright": "intellectual_property",
        "cybercrime_intrusion": "nonviolent_crimes",
        "chemical_biological": "indiscriminate_weapons",
        "harassment_bullying": "hate",
        "misinformation_disinformation": None,  # elections when about voting, else defamation (by text)
        "illegal": None,
        "harmful": None,
    },
    "itw_forbidden_questions": {
        "Illegal Activity": "nonviolent_crimes",
        "Hate Speech": "hate",
        "Malware": "nonviolent_crimes",
        "Physical Harm": "violent_crimes",
        "Economic Harm": "nonviolent_crimes",
        "Fraud": "nonviolent_crimes",
        "Pornography": "sexual_content",
        "Privacy Violence": "privacy",
        "Gov Decision": "nonviolent_crimes",  # border smuggling, evading law enforcement
        # policy_restricted rows: not harmful, but the category lets a policy restrict them
        "Political Lobbying": "elections",
        "Legal Opinion": "specialized_advice",
        "Financial Advice": "specialized_advice",
        "Health Consultation": "specialized_advice",
    },
    "safemtdata_attack600": {
        "Cybercrime and Intrusions": "nonviolent_crimes",
        "Chemical and Biological Threats": "indiscriminate_weapons",
        "Harassment and Bullying": "hate",
        "Misinformation and Disinformation": None,
        "General Illicit Scenarios": None,
    },
}

# OpenAI moderation codes, most specific first: the first code present wins.
OPENAI_MODERATION_ORDER: tuple[tuple[str, str], ...] = (
    ("S3", "child_sexual_exploitation"),
    ("SH", "suicide_self_harm"),
    ("V2", "violent_crimes"),
    ("H2", "violent_crimes"),  # threatening hate
    ("V", "violent_crimes"),
    ("H", "hate"),
    ("HR", "hate"),  # harassment
    ("S", "sexual_content"),
)

# Keyword rules for rows without a usable category, checked in order; the first match wins.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (cid, re.compile(pattern, re.IGNORECASE))
    for cid, pattern in (
        (
            "child_sexual_exploitation",
            r"\b(child|minor|underage|kid|teen)\w*\b.*\b(sex|nude|porn|groom)|\bgroom\w* (a )?(child|minor)",
        ),
        (
            "indiscriminate_weapons",
            r"\b(bomb|explosive|detonat|nerve agent|sarin|anthrax|bioweapon|biological weapon|chemical weapon|"
            r"nuclear|radiolog|dirty bomb|pipe bomb|ricin|mustard gas|pathogen|toxin|weapon of mass|"
            r"dimethylmercury|nitroglycerin|tatp|thermite)",
        ),
        (
            "suicide_self_harm",
            r"\b(suicid|self[- ]harm|kill (myself|yourself|themselves)|cutting myself|anorexi|bulimi|"
            r"starve (myself|yourself))",
        ),
        (
            "sex_related_crimes",
            r"\b(rape|sexual(ly)? (assault|harass|exploit)|sex traffick|non-?consensual|revenge porn|upskirt)",
        ),
        ("sexual_content", r"\b(porn|explicit sex|erotic|sexual(ly)? explicit|nude|nsfw)"),
        (
            "hate",
            r"\b(racis|sexis|homophob|transphob|antisemit|islamophob|slur|inferior race|white suprem|nazi|"
            r"hate speech|harass|bully|cyberbull|discriminat|xenophob)",
        ),
        ("elections", r"\b(elect|vot(e|er|ing)|ballot|polling|campaign)"),
        ("defamation", r"\b(defam|libel|slander|false (rumou?r|claim|stor)|fake news (about|on)|smear)"),
        (
            "privacy",
            r"\b(dox|stalk|track (someone|a person|my (ex|wife|husband|partner))|personal (information|data)|"
            r"home address|spy on|surveil|location of)",
        ),
        (
            "intellectual_property",
            r"\b(pira(te|cy)|copyright|torrent|counterfeit|crack(ed)? (software|licen)|lyrics of|drm)",
        ),
        (
            "violent_crimes",
            r"\b(kill|murder|assassin|shoot|stab|attack|assault|tortur|kidnap|poison|terror|massacre|"
            r"hurt (someone|people)|violen|weapon|gun|firearm|mass shooting|harm (someone|people|others))",
        ),
        (
            "specialized_advice",
            r"\b(diagnos|prescri|dosage|medical advice|legal advice|invest(ment)? advice|tax advice)",
        ),
        (
            "nonviolent_crimes",
            r"\b(hack|malware|ransomware|virus|phish|fraud|scam|steal|theft|launder|counterfeit|drug|meth|"
            r"cocaine|heroin|fentanyl|smuggl|traffick|brib|blackmail|extort|identity theft|credit card|"
            r"shoplift|evade|tax evasion|exploit|ddos|keylogger|botnet|password|illegal|crack)",
        ),
    )
)


def category_index(category_id: str) -> int:
    return CATEGORY_IDS.index(category_id)


def infer_category(text: str, fallback: str = "nonviolent_crimes") -> str:
    """Best-guess taxonomy id for a harmful text from keyword rules (used only where a source gives none)."""
    for cid, pattern in _RULES:
        if pattern.search(text):
            if cid == "specialized_advice":  # harmful + advice words: the hazard is the act, keep looking
                continue
            return cid
    return fallback


def map_category(source: str, category: str | None, text: str) -> tuple[str, float]:
    """Taxonomy id and its training weight for a harmful (or policy-restricted) row of ``source``."""
    if source == "openai_moderation" and category:
        codes = set(category.split(","))
        for code, cid in OPENAI_MODERATION_ORDER:
            if code in codes:
                return cid, 1.0
    table = SOURCE_CATEGORIES.get(source, {})
    if category is not None and category in CATEGORY_IDS:
        return category, 1.0  # authored rows use taxonomy ids directly
    if category is not None and table.get(category) is not None:
        return str(table[category]), 1.0
    if category in ("misinformation_disinformation", "Misinformation and Disinformation"):
        return ("elections" if re.search(r"\b(elect|vot|ballot)", text, re.I) else "defamation"), INFERRED_WEIGHT
    return infer_category(text), INFERRED_WEIGHT
