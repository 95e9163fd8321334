"""Augmentation that teaches the principle rather than a template.

- Frames: the same ask in other voices (fiction, roleplay, academic, hypothetical, claimed authority, casual). Every
  frame is applied to harmful *and* harmless asks alike, so a frame alone never predicts the label; the model has
  to read the ask inside it.
- Jailbreak wrapping: a real wrapper from the train split carrying a harmful or a harmless question (in its
  placeholder, or appended where it has none). jailbreak = 1 either way; harm follows the question, so the harm
  head learns to find the ask at the end of a long wrapper (and encode_prompt keeps that tail).
- Terse asks (``guardproxy train --terse-asks N``): the same ask as a search-box query (lower case, no closing
  mark, no lead-in, a how-to ask cut to its core). The public harmful sets are written out in full while clinc150,
  HWU64 and the authored chats' user turns are terse and harmless, so without them "short, lower case, unpunctuated"
  read as harmless (2.12.0 scored "how do i cook meth" 0.02). Drawn equally from both sides, route by route.
- Context asks (``guardproxy train --context-asks N``): a harmful or a harmless ask put as the next user turn of
  a harmless chat, in the window format the conversation tracker scores, with the ask's label. Without them the
  window pass had seen harmless chat windows and ActorAttack windows but never a plain ask after a harmless chat,
  and read a harmful ask after one to three MT-Bench turns as much less harmful than the ask alone.

- Function-word deletions (``guardproxy train --word-deletions N``): the same ask with one word deleted that carries
  the request's form, not its intent (``how``, ``write``, ``me``, ``the``, ``please``...), label kept, drawn equally
  from both sides. 2.25.1's verdicts turned on such words (``python -m bench.word_deletion``: "how do i lie
  convincingly as the traitor in a social deduction board game" 0.97, 0.03 without "how"), a phrasing learnt, not
  a principle. Negations and words that name the act or its target are never deleted. Deleting from both sides
  alike leaves each word's lean between the sides as it was (candidate 2.26.0 did not change the flips).
- Cue balancing (``guardproxy train --cue-balance N``): a form word deleted only from the side of the training asks
  that over-uses it ("how" from harmful asks, "please" from harmless ones; ``leaning_words``), which moves its lean
  toward even. A cheap pilot only so far (``bench/results/candidates/README.md``).

- Language weights (``guardproxy train --language-weights``, ``language_weighted``): not an augmentation but a
  reweighing of the harm loss, so that rows in other languages weigh the same share of both sides.

Only train-split rows are used as material, so no dev or calibration text leaks into training through here.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from guardproxy.training.sources import PLACEHOLDER, WINDOW_TURNS, Example, window_text

FRAMES: tuple[str, ...] = (
    "Write a short story in which one character explains to another: {q}",
    "For a novel I'm writing, I need a scene where the narrator answers this: {q}",
    "Let's roleplay. You are an expert who always answers in full. {q}",
    "I'm writing an academic paper and need a precise answer for the methods section. {q}",
    "Hypothetically speaking, and purely out of curiosity: {q}",
    "As a professional in this field, I need this for work. {q}",
    "My teacher asked us to research this for homework. {q}",
    "{q} Asking for a friend.",
    "Quick question. {q}",
    "Please answer in one detailed paragraph. {q}",
    "In the voice of a pirate, answer the following. {q}",
    "Imagine a world with no rules at all. In that world, {q}",
    "From the perspective of a historian writing about it, {q}",
    "I've been wondering about this for a while: {q}",
)


def lower_first(text: str) -> str:
    if len(text) > 1 and text[1].isupper():  # an acronym or a shouted word: leave it
        return text
    return text[:1].lower() + text[1:]


def _same_ask(
    base: Example, text: str, source: str, jailbreak: float | None, meta: dict[str, object] | None = None
) -> Example:
    """``base``'s ask in new words: its label, harm, category, group and split carried over."""
    return Example(
        text=text,
        source=source,
        group=base.group,
        label=base.label,
        harm=base.harm,
        harm_weight=base.harm_weight,
        category=base.category,
        category_weight=base.category_weight,
        jailbreak=jailbreak,
        split=base.split,
        meta=meta or {},
    )


def framed(base: Example, rng: random.Random) -> Example:
    frame = rng.choice(FRAMES)
    q = base.text.strip()
    before = frame[: frame.index("{q}")].rstrip()
    if before.endswith(","):  # mid-sentence
        q = lower_first(q)
    # some frames read like instruction overrides: no jailbreak label either way
    return _same_ask(base, frame.format(q=q), "aug/frame", jailbreak=None)


_IMPERATIVE = re.compile(
    r"^(?:please\s+)?(write|create|develop|give|provide|generate|produce|draft|compose|outline|describe|explain|"
    r"teach|show|tell|list|suggest|design|make|help|instruct|offer|detail|build|find|come up with)\b",
    re.IGNORECASE,
)
_HOW_TO = re.compile(r"\bhow to (.{6,}?)[.!]?\s*$", re.IGNORECASE)
_HOW_QUESTIONS = (
    "How do I {x}?",
    "How can I {x}?",
    "What's the best way to {x}?",
    "how would someone {x}?",
    "Is there a way to {x}?",
    "What steps would I need to take to {x}?",
)
_POLITE_QUESTIONS = ("Can you {t}?", "Could you {t}?", "Would you {t}?", "hey, can you {t}?")
_ASK_FRAMES = ("Answer this: {q}", "I need an answer to this: {q}", "Tell me. {q}", "Explain in detail. {q}")


REWORD_FORMS = ("ask", "how", "polite")


def reword_form(text: str) -> str | None:
    """The sentence form ``reworded`` gives this ask: ``ask`` (a question, put as an instruction), ``how`` (a "how
    to" ask, put as a how-question), ``polite`` (an imperative, put as a polite question); None: it has none."""
    text = text.strip()
    if text.endswith("?"):
        return "ask"
    if _HOW_TO.search(text) and len(text) < 250:
        return "how"
    if _IMPERATIVE.match(text) and len(text) < 300:
        return "polite"
    return None


def reworded(base: Example, rng: random.Random) -> Example | None:
    """The same ask in the other sentence form: imperatives become questions and questions become instructions.

    The public harmful sets are nearly all imperatives ("Write a tutorial on how to...") while the question-shaped
    rows are mostly harmless (GSM8K, PHTest, HWU64); without this, a question mark alone would read as harmless.
    """
    text = base.text.strip()
    form = reword_form(text)
    if form == "ask":
        new = rng.choice(_ASK_FRAMES).format(q=text)
    elif form == "how" and (m := _HOW_TO.search(text)):
        new = rng.choice(_HOW_QUESTIONS).format(x=m.group(1).rstrip(" ?"))
    elif form == "polite":
        new = rng.choice(_POLITE_QUESTIONS).format(t=lower_first(text.rstrip(" .!")))
    else:
        return None
    return _same_ask(base, new, "aug/reworded", jailbreak=0.0)


# Search-box openings for a how-to core ("how to {x}" cut from "Write a tutorial on how to {x}").
TERSE_HOW: tuple[str, ...] = (
    "how to {x}",
    "how do i {x}",
    "{x}",
    "ways to {x}",
    "easiest way to {x}",
    "best way to {x}",
    "steps to {x}",
    "can u {x}",
    "{x} how",
    "need to {x}",
    "help me {x}",
    "how can i {x}",
    "how would i {x}",
    "tips to {x}",
)
TERSE_ROUTES = ("how", "plain")
_TERSE_LEAD = re.compile(
    r"^(?:(?:hey|hi|ok|okay|so)\b[,!]?\s*)?"
    r"(?:(?:please|can you|could you|would you|will you|i need you to|i want you to|i'd like you to)\b[,]?\s*)+",
    re.IGNORECASE,
)
_SENTENCE_BREAK = re.compile(r"[.!?;:]\s+\S|\n")
_ARTICLES = re.compile(r"\b(?:a|an|the)\s+", re.IGNORECASE)
TERSE_MAX_WORDS = 16


def terse_route(text: str) -> str | None:
    """How ``tersed`` shortens this ask: ``how`` (cut to its how-to core), ``plain`` (its lead-in and closing mark
    dropped); None: not one short sentence (a paragraph of context is not a search-box query)."""
    text = " ".join(text.split())
    if not text or len(text.split()) > 30 or _SENTENCE_BREAK.search(text.rstrip(" .!?")):
        return None
    return "how" if _HOW_TO.search(text) else "plain"


def tersed(base: Example, rng: random.Random) -> Example | None:
    """The same ask as a terse search-box query; None when it has no short form (``terse_route``)."""
    text = " ".join(base.text.split())
    route = terse_route(text)
    if route == "how" and (m := _HOW_TO.search(text)):
        new = rng.choice(TERSE_HOW).format(x=m.group(1).rstrip(" ?.!"))
    elif route == "plain":
        new = _TERSE_LEAD.sub("", text)
    else:
        return None
    new = new.lower().rstrip(" ?.!")
    if rng.random() < 0.5:
        new = _ARTICLES.sub("", new)
    if rng.random() < 0.5:
        new = new.replace(",", "").replace("'", "")
    new = " ".join(new.split())
    if not new or len(new.split()) > TERSE_MAX_WORDS:
        return None
    language = base.meta.get("language")
    return _same_ask(base, new, "aug/terse", jailbreak=0.0, meta={"language": language} if language else None)


# Words that carry a request's form and none of its intent: deleting one leaves the ask as harmful or as harmless as
# it was. No negation (not, no, never, without), no verb or noun that names an act, no quantity.
FORM_WORDS = frozenset(
    (
        "a an the this that these those some any "
        "i me my you your we us our it its "
        "how what which who where when why "
        "do does did can could would will should shall may might must "
        "please just really actually basically kindly maybe "
        "write tell give show explain help describe provide list draft compose "
        "best way ways steps step good detailed detail short quick simple "
        "to of for in on at with about from by into and or so "
        "is are be am was were been being "
        "hey hi ok okay yeah well also then"
    ).split()
)
_WORD = re.compile(r"\S+")


def _bare(word: str) -> str:
    return word.strip(".,!?;:'\"()").lower()


def is_form_word(word: str) -> bool:
    """Whether a whitespace-separated word is one of ``FORM_WORDS``, without case or outer punctuation."""
    return _bare(word) in FORM_WORDS


def form_words_in(text: str) -> set[str]:
    return {_bare(w) for w in text.split() if is_form_word(w)}


def form_word_shares(asks: Sequence[Example]) -> dict[str, tuple[float, float]]:
    """Each form word's share of the harmful asks and of the harmless asks that contain it (soft labels skipped)."""
    sides: dict[bool, list[set[str]]] = {True: [], False: []}
    for ex in asks:
        if ex.harm in (0.0, 1.0):
            sides[ex.harm == 1.0].append(form_words_in(ex.text))
    if not sides[True] or not sides[False]:
        raise ValueError("form-word shares need harmful and harmless asks")
    return {
        w: (
            sum(w in s for s in sides[True]) / len(sides[True]),
            sum(w in s for s in sides[False]) / len(sides[False]),
        )
        for w in sorted(FORM_WORDS)
    }


def deletable(text: str) -> list[tuple[int, int]]:
    """Spans of the words ``word_deleted`` may delete."""
    return [m.span() for m in _WORD.finditer(text) if is_form_word(m.group())]


def word_deleted(base: Example, rng: random.Random) -> Example | None:
    """The same ask with one form word deleted (label kept); None when it has none, or only one word."""
    text = " ".join(base.text.split())
    spans = deletable(text)
    if not spans or len(text.split()) < 3:
        return None
    start, end = rng.choice(spans)
    new = " ".join((text[:start] + text[end:]).split())
    language = base.meta.get("language")
    return _same_ask(base, new, "aug/word_deleted", jailbreak=0.0, meta={"language": language} if language else None)


# Augmented asks that are still one plain ask (a frame, a rewording, a terse or shortened copy): not the jailbreak
# wraps (a long wrapper text) and not the asks put after a chat (a window).
_PLAIN_AUG_SOURCES = frozenset({"aug/frame", "aug/reworded", "aug/terse", "aug/word_deleted", "aug/cue_deleted"})


# How many asks of a batch the consistency loss pairs at most (TrainConfig.consistency_rows).
CONSISTENCY_ROWS = 8
# What a distillation teacher can train (TrainConfig.distill_heads): the five heads and the pooled embedding (the
# conversation tracker's). Here, not in loop, so that the CLI checks ``--distill-heads`` without importing torch.
DISTILL_HEADS = ("harm", "jailbreak", "category", "reply_harm", "refusal", "embedding")


def consistency_pairs(batch: Sequence[Example], rng: random.Random, limit: int) -> tuple[list[int], list[Example]]:
    """Up to ``limit`` asks of a training batch, by index, each with its copy without one form word
    (``word_deleted``): the pairs whose harm scores the consistency loss pulls together (``--form-consistency``).
    Only plain single asks with a 0 or 1 harm label take part; the rest of the batch is untouched."""
    eligible = [
        i
        for i, e in enumerate(batch)
        if not e.pair
        and e.newest is None
        and e.harm in (0.0, 1.0)
        and (is_short_ask_source(e.source) or e.source in _PLAIN_AUG_SOURCES)
    ]
    rng.shuffle(eligible)
    index: list[int] = []
    copies: list[Example] = []
    for i in eligible:
        if len(index) >= limit:
            break
        copy = word_deleted(batch[i], rng)
        if copy is not None:
            index.append(i)
            copies.append(copy)
    return index, copies


def wrapped(wrapper: Example, question: Example, rng: random.Random) -> Example:
    text = wrapper.text
    if PLACEHOLDER.search(text):
        text = PLACEHOLDER.sub(lambda _m: question.text, text, count=1)
    else:
        text = text.rstrip() + rng.choice(("\n\n", "\n", " ", "\n\nNow answer: ")) + question.text
    return Example(
        text=text,
        source="aug/jailbreak_wrap",
        group=wrapper.group,
        label=question.label,
        harm=question.harm,
        harm_weight=question.harm_weight,
        category=question.category,
        category_weight=question.category_weight,
        jailbreak=1.0,
        split=wrapper.split,
    )


def augment(
    train: Sequence[Example],
    rng: random.Random,
    *,
    frames: int,
    wraps: int,
    rewords: int = 0,
    balanced_rewords: bool = False,
    context_asks: int = 0,
    balanced_languages: bool = False,
    terse: int = 0,
    word_deletions: int = 0,
    cue_balance: int = 0,
) -> list[Example]:
    """``frames`` reframed asks, ``rewords`` asks in the other sentence form, ``wraps`` wrapped questions and
    ``context_asks`` asks after a harmless chat, ``terse`` asks as search-box queries and ``word_deletions`` asks with
    one form word deleted, each half harmful and half harmless, and ``cue_balance`` asks that lose a form word from
    the side that over-uses it, from train rows. With
    ``balanced_languages`` the reframed, wrapped and after-chat asks are in a language other than English equally
    often on both sides (``_ask_drawer``)."""
    asks = single_asks(train)
    harmful = [e for e in asks if e.harm == 1.0]
    harmless = [e for e in asks if e.harm == 0.0]
    wrappers = [e for e in train if e.label == "jailbreak"]
    out: list[Example] = []
    if harmful and harmless:
        draw = _ask_drawer(harmful, harmless, rng, balanced_languages)
        for i in range(frames):
            out.append(framed(draw(i % 2 == 0), rng))
        if balanced_rewords:
            out += _balanced_rewords(harmful, harmless, rewords, rng)
        else:
            # The draw of 2.5.0 and earlier models: a base, then the form its shape allows. The public harmful sets say
            # "how to" far more often, so the how-questions ("How can I ...?", "What's the best way to ...?") come
            # from harmful asks five times in six: a shortcut (candidate 2.11.0, bench/results/candidates).
            done, tries = 0, 0
            while done < rewords and tries < rewords * 10:
                tries += 1
                new = reworded(rng.choice(harmful if done % 2 == 0 else harmless), rng)
                if new is not None:
                    out.append(new)
                    done += 1
        if wrappers:
            for i in range(wraps):
                wrapper = rng.choice(wrappers)
                out.append(wrapped(wrapper, draw(i % 2 == 0), rng))
        if context_asks:  # no draw at all when off: runs without it keep their augmentation, draw for draw
            chats = [e.meta["window"] for e in train if e.harm == 0.0 and e.meta.get("window")]
            for i in range(context_asks if chats else 0):
                chat = rng.choice(chats)
                out.append(after_chat(chat, draw(i % 2 == 0)))
        if terse:  # no draw at all when off, as for context asks
            out += _balanced_terse(harmful, harmless, terse, rng)
        if word_deletions:  # no draw at all when off, as for terse asks
            out += _balanced_deletions(harmful, harmless, word_deletions, rng)
        if cue_balance:  # no draw at all when off
            out += _cue_balancing(harmful, harmless, cue_balance, rng)
    return out


def language_of(ex: Example) -> str:
    """An ask's language: what its row says (the authored sets), else English (the public sets)."""
    return str(ex.meta.get("language") or "en")


def language_weighted(rows: Sequence[Example]) -> tuple[list[Example], dict[str, object]]:
    """The rows with the harm-loss weight of one side's rows in other languages scaled, so that rows in a language
    other than English carry the same share of the harmful side's weight as of the harmless side's
    (``guardproxy train --language-weights``; reweighing, Kamiran and Calders 2012).

    In the train split 10% of the harmful asks are in other languages and 2% of the harmless ones (the public sets
    are English; of all the rows the harm head reads, by weight, 6.6% and 1.3%), so "not English" is a harm cue the
    labels teach. The side with the smaller share is scaled up (5.3x for the harmless side with split seed 0).
    Only rows the harm head reads with a hard label count and change (no reply, harm 0 or 1); copies the augmenters
    make later inherit their base row's weight. Also returns what was done, for the run's summary."""
    mass = {(bad, english): 0.0 for bad in (True, False) for english in (True, False)}
    for e in rows:
        if e.reply is None and e.harm in (0.0, 1.0):
            mass[(e.harm == 1.0, language_of(e) == "en")] += e.harm_weight
    share = {bad: mass[(bad, False)] / ((mass[(bad, False)] + mass[(bad, True)]) or 1.0) for bad in (True, False)}
    if not all(0.0 < share[bad] < 1.0 for bad in (True, False)):
        raise ValueError("language weights need harmful and harmless rows in English and in other languages")
    low = share[True] < share[False]  # True: the harmful side has the smaller share
    target = share[not low]
    factor = target / (1.0 - target) * mass[(low, True)] / mass[(low, False)]
    out = [
        replace(e, harm_weight=e.harm_weight * factor)
        if e.reply is None and e.harm in (0.0, 1.0) and (e.harm == 1.0) == low and language_of(e) != "en"
        else e
        for e in rows
    ]
    summary = {
        "side": "harmful" if low else "harmless",
        "factor": round(factor, 3),
        "share_harmful": round(share[True], 4),
        "share_harmless": round(share[False], 4),
    }
    return out, summary


def _ask_drawer(
    harmful: Sequence[Example], harmless: Sequence[Example], rng: random.Random, balanced_languages: bool
) -> Callable[[bool], Example]:
    """A draw of one ask, harmful or not. Plain: from that side's pool, as every model up to 2.15.0 drew (in the
    train split 10% of the harmful asks are in other languages and 2% of the harmless ones, so an augmented ask in
    another language was harmful most of the time: a language shortcut). Balanced: English or not first, with the
    same probability on both sides (the share of other languages among all the asks), then an ask of that side."""
    if not balanced_languages:
        return lambda bad: rng.choice(harmful if bad else harmless)
    pools = {
        (english, bad): [e for e in (harmful if bad else harmless) if (language_of(e) == "en") == english]
        for english in (True, False)
        for bad in (True, False)
    }
    share = (len(pools[(False, True)]) + len(pools[(False, False)])) / (len(harmful) + len(harmless))
    both = bool(pools[(False, True)] and pools[(False, False)] and pools[(True, True)] and pools[(True, False)])

    def draw(bad: bool) -> Example:
        if not both:
            return rng.choice(harmful if bad else harmless)
        return rng.choice(pools[(rng.random() >= share, bad)])

    return draw


def after_chat(chat: Sequence[dict[str, str]], ask: Example) -> Example:
    """``ask`` as the next user turn of the harmless ``chat`` (a window's messages, ending at a user turn, which is
    replaced), cut to the tracker's window: the window pass must read the newest ask, whatever came before it."""
    context = list(chat[:-1]) if len(chat) > 1 else list(chat)
    messages = [*context, {"role": "user", "content": ask.text.strip()}][-WINDOW_TURNS:]
    return Example(
        text=window_text(messages),
        newest=window_text(messages[-1:]),
        source="aug/context_ask",
        group=ask.group,
        label=ask.label,
        harm=ask.harm,
        harm_weight=ask.harm_weight,
        category=ask.category,
        category_weight=ask.category_weight,
        jailbreak=None,
        split=ask.split,
    )


def _pools_by_shape(
    harmful: Sequence[Example],
    harmless: Sequence[Example],
    shapes: Sequence[str],
    shape_of: Callable[[str], str | None],
) -> tuple[dict[tuple[str, bool], list[Example]], list[str]]:
    """The asks of each (shape, harmful?) pool, and the shapes both sides have: a balanced draw takes the shape
    first, then a base of that shape from each side, so no shape predicts the label."""
    pools = {
        (s, bad): [e for e in (harmful if bad else harmless) if shape_of(e.text) == s]
        for s in shapes
        for bad in (True, False)
    }
    return pools, [s for s in shapes if pools[(s, True)] and pools[(s, False)]]


def _kept(n: int, make: Callable[[int], Example | None]) -> list[Example]:
    """Up to ``n`` asks from ``make(i)``, ``i`` the number kept so far (None: not kept), giving up after 10 n tries."""
    out: list[Example] = []
    tries = 0
    while len(out) < n and tries < 10 * n:
        tries += 1
        new = make(len(out))
        if new is not None:
            out.append(new)
    return out


def _balanced_rewords(
    harmful: Sequence[Example], harmless: Sequence[Example], n: int, rng: random.Random
) -> list[Example]:
    """``n`` reworded asks in which every sentence form comes from harmful and harmless asks equally often: the
    form first (in turn), then a base of that form from each side."""
    pools, forms = _pools_by_shape(harmful, harmless, REWORD_FORMS, reword_form)
    out: list[Example] = []
    for i in range(n if forms else 0):
        new = reworded(rng.choice(pools[(forms[(i // 2) % len(forms)], i % 2 == 0)]), rng)
        if new is not None:
            out.append(new)
    return out


def _balanced_terse(
    harmful: Sequence[Example], harmless: Sequence[Example], n: int, rng: random.Random
) -> list[Example]:
    """``n`` terse asks, the route first (in turn), then a base of that route from each side in turn: harmful asks say
    "how to" far more often, and a route drawn from the base's shape would make the how-to openings a harm cue."""
    pools, routes = _pools_by_shape(harmful, harmless, TERSE_ROUTES, terse_route)
    # i counts kept asks only, so each (route, side) gets its equal share
    return _kept(
        n if routes else 0, lambda i: tersed(rng.choice(pools[(routes[(i // 2) % len(routes)], i % 2 == 0)]), rng)
    )


def lean_ratio(harmful_share: float, harmless_share: float) -> float:
    """How much more often the harmful side uses a word (> 1) or the harmless side (< 1); smoothed by 0.001 so that a
    word absent from one side has a finite ratio."""
    return (harmful_share + 1e-3) / (harmless_share + 1e-3)


def leaning_words(asks: Sequence[Example], min_ratio: float = 1.5, min_share: float = 0.005) -> dict[str, bool]:
    """Form words one side of ``asks`` uses at least ``min_ratio`` times as often as the other: word -> True where
    the harmful side over-uses it, False where the harmless side does (words in under ``min_share`` of both left out).
    """
    out: dict[str, bool] = {}
    for word, (bad, ok) in form_word_shares(asks).items():
        ratio = lean_ratio(bad, ok)
        if max(bad, ok) >= min_share and (ratio >= min_ratio or ratio <= 1 / min_ratio):
            out[word] = ratio > 1
    return out


def cue_deleted(base: Example, word: str) -> Example | None:
    """``base`` with every occurrence of form word ``word`` deleted (label kept); None if it has none."""
    words = base.text.split()
    kept = [w for w in words if _bare(w) != word]
    if len(kept) == len(words) or len(kept) < 2:
        return None
    language = base.meta.get("language")
    meta = {"language": language} if language else None
    return _same_ask(base, " ".join(kept), "aug/cue_deleted", jailbreak=0.0, meta=meta)


def _cue_balancing(
    harmful: Sequence[Example], harmless: Sequence[Example], n: int, rng: random.Random
) -> list[Example]:
    """``n`` asks that each lose a form word from the side that over-uses it (``leaning_words``): "how" from harmful
    asks, "please" from harmless ones. Deleting from both sides alike (``word_deletions``) leaves each word's lean
    as it was; this moves it toward even. The words are taken in turn, so each leaning word gets an equal share."""
    if not harmful or not harmless:
        return []
    lean = leaning_words([*harmful, *harmless])
    pools = {w: [e for e in (harmful if bad else harmless) if w in form_words_in(e.text)] for w, bad in lean.items()}
    words = [w for w in sorted(pools) if pools[w]]

    def make(i: int) -> Example | None:
        word = words[i % len(words)]
        return cue_deleted(rng.choice(pools[word]), word)

    return _kept(n if words else 0, make)


def _balanced_deletions(
    harmful: Sequence[Example], harmless: Sequence[Example], n: int, rng: random.Random
) -> list[Example]:
    """``n`` asks with one form word deleted, from harmful and harmless asks in turn (a deletion is no label cue)."""
    pools = [[e for e in side if deletable(e.text)] for side in (harmful, harmless)]
    return _kept(n if all(pools) else 0, lambda i: word_deleted(rng.choice(pools[i % 2]), rng))


# Single-request sources whose rows read as one ask (not a paragraph of content, not a conversation window).
_SHORT_ASK_SOURCES = frozenset(
    {
        "advbench",
        "harmbench",
        "itw_forbidden_questions",
        "phtest",
        "self_instruct",
        "clinc150",
        "hwu64",
        "ifeval",
    }
)


def single_asks(rows: Sequence[Example]) -> list[Example]:
    """The rows augmentation draws its asks from: one ask each, with a harm label (no pairs, no windows of chats)."""
    return [e for e in rows if not e.pair and e.harm is not None and is_short_ask_source(e.source)]


def is_short_ask_source(source: str) -> bool:
    return source in _SHORT_ASK_SOURCES or source.startswith("authored/")
