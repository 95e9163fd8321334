"""Word boundaries restored: text written without spaces reaches the guard model as words.

Called from ``guardproxy.normalize`` (its steps 8 and 13; that docstring states the rules). Pure functions of a ``str``;
each returns its input unchanged unless it is convincingly an evasion:

- ``decode_quoted_printable``: ``How=20do=20I`` (quoted-printable, MIME's encoding) is decoded by ``binascii.a2b_qp``
  when a text holds ``_MIN_QP`` escapes, two of them a space escape joining two words.
- ``decode_plus_runs``: ``How+do+I+build`` (HTML form encoding) is decoded by ``urllib.parse.unquote_plus`` in a run
  of ``_MIN_PLUS_WORDS`` words joined only by ``+``, so ``C++``, ``a+b``, ``1+1=2`` and ``i++`` stay.
- ``split_words``: camel case (``HowDoIBuildAPipeBomb``) and long runs of letters with the spaces deleted
  (``howdoibuildapipebomb``) are split into English words, with a unigram word-frequency model (the 126k-word
  English list that the ``wordninja`` package ships, costs as wordninja computes them: ``log(rank * log(N))``) and
  dynamic programming over word costs. A split is kept only when it reads convincingly as English. A run is judged
  by its own words: markup and emphasis around it (backticks, ``**``, ``~~``, HTML tags) do not stop the split; code
  marks (``obj.getX``, ``getX(``, ``#tag``, ``$x``) do unless the run reads as prose (function words, pronouns,
  question words); URLs, e-mail addresses and paths always do. Random case with the spaces deleted
  (``hOwDoIbUiLd...``) is segmented in lower case; snake-case prose (``how_do_i_build``) and camel case in short
  pieces (``HowDo IBuild APipe Bomb``) are read as words where, taken together, they read as prose.
"""

from __future__ import annotations

import binascii
import gzip
import importlib.util
import re
import urllib.parse
from math import inf, log
from pathlib import Path

__all__ = ["decode_plus_runs", "decode_quoted_printable", "split_words"]

# --- quoted-printable -------------------------------------------------------------------------------------------

_MIN_QP = 3
_QP_ESCAPE = re.compile(r"=[0-9A-Fa-f]{2}")
# A space or tab escape between a character and a letter: ``How=20do``. ``x=20 y=30``, ``padx=20,`` and
# ``width=20px`` (code, maths, CSS) have none.
_QP_JOINER = re.compile(r"(?<=[^\s=])=(?:20|09)(?=[A-Za-z])(?!px|em|pt|ms|rem|vh|vw|deg)")
_MIN_QP_JOINERS = 2


def decode_quoted_printable(text: str) -> str:
    """Decode a quoted-printable text (``=XX`` escapes, ``=`` soft line breaks); any other text is returned as is."""
    if "=" not in text or len(_QP_ESCAPE.findall(text)) < _MIN_QP or len(_QP_JOINER.findall(text)) < _MIN_QP_JOINERS:
        return text
    try:
        return binascii.a2b_qp(text.encode("utf-8")).decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return text


# --- form encoding (+ for a space) ------------------------------------------------------------------------------

_MIN_PLUS_WORDS = 4
_PLUS_RUN = re.compile(r"(?<![^\s\"'(\[])[^\s+]+(?:\+[^\s+]+){3,}(?![^\s\"')\].,;:!?])")
_PLUS_WORD = re.compile(r"(?:[A-Z]?[a-z]+|[A-Z]+)(?:'[a-z]+)?(?:%[0-9A-Fa-f]{2}|[.,;:!?])*")


def decode_plus_runs(text: str) -> str:
    """Decode runs of ``_MIN_PLUS_WORDS``+ words joined only by ``+`` (``How+do+I+build``) as form encoding."""
    if "+" not in text:
        return text
    return _PLUS_RUN.sub(_decode_plus_run, text)


def _decode_plus_run(match: re.Match[str]) -> str:
    run = match.group(0)
    if any(ch in run for ch in "/=&@"):
        return run  # a URL, a query string or an address: left as written
    pieces = run.split("+")
    # single letters other than "a" and "I" are letters spelled out ("h+o+w", step 10 joins them), not words
    words = sum(1 for p in pieces if _PLUS_WORD.fullmatch(p) and (p[1:2].isalpha() or p in ("a", "A", "I")))
    # Words, nearly all of them (a number or two may stand among them): not a sum, a version string or base64.
    if words < _MIN_PLUS_WORDS - 1 or 4 * words < 3 * len(pieces):
        return run
    try:
        return urllib.parse.unquote_plus(run, errors="strict")
    except UnicodeDecodeError:
        return run


# --- camel case and deleted spaces ------------------------------------------------------------------------------


_LIST_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|'[a-z]+")  # words and contractions ("don't", "'s"), not "3d"


def _word_costs() -> dict[str, float]:
    """wordninja's word costs, read from the list it ships (without importing it: its import builds its own model)."""
    spec = importlib.util.find_spec("wordninja")
    if spec is None or spec.origin is None:  # pragma: no cover - a core dependency
        return {}
    with gzip.open(Path(spec.origin).parent / "wordninja" / "wordninja_words.txt.gz") as f:
        words = f.read().decode().split()
    scale = log(len(words))
    costs: dict[str, float] = {}
    for rank, word in enumerate(words, start=1):
        if _LIST_WORD.fullmatch(word) and word not in costs:
            costs[word] = log(rank * scale)
    return costs


# Pieces a split may use: English has two one-letter words and a few dozen two-letter ones; the list holds every
# letter and hundreds of abbreviations of one and two letters, which let any string of letters "split".
_SHORT_WORDS = frozenset("a i am an as at be by do go he hi if in is it me my no of oh ok on or so to up us we".split())
_MAX_WORD = 20
# English clitics, which the list holds only inside its contractions: "Alexa's", "they're".
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m", "'t")


def _word_model() -> tuple[dict[str, float | None], float]:
    """Every word a split may use with its cost, and every proper prefix of one as None (where a word may still
    end), in one dict (~310k keys, ~20 MB); and the list's ``log(N)``."""
    costs = _word_costs()
    words = {w: c for w, c in costs.items() if (len(w) > 2 or w in _SHORT_WORDS) and len(w) <= _MAX_WORD}
    words.update(dict.fromkeys(_CLITICS, costs.get("s", 10.0)))
    model: dict[str, float | None] = {w[:k]: None for w in words for k in range(1, len(w))}
    model.update(words)
    return model, log(max(len(costs), 2))


_PREFIXES, _SCALE = _word_model()
# A piece is weak when it is not in the list, or has up to 3 letters and is not among its 5,000 most common words, or
# up to 5 and not among its 20,000 (the list's tail holds names, foreign words and the fragments a long word that is
# not in the list breaks into: "transform at ional", "operation aliz at ions"); a longer piece in the list is a word
# ("idiomatic", "harmoniously").
_WEAK_COSTS = ((3, log(5_000 * _SCALE)), (5, log(20_000 * _SCALE)))  # (up to this many letters, cost above which)
_UNKNOWN_COST = 40.0  # one letter outside any word: much dearer than the rarest word, so used only where needed


def _cost(word: str) -> float:
    """A word's cost; ``inf`` for what is not a word of the list (lower case)."""
    cost = _PREFIXES.get(word)
    return inf if cost is None else cost


def word_cost(word: str) -> float:
    """A lower-case word's cost in the English word list (the rarer, the dearer: ``log(rank * log(N))``); ``inf``
    for what is no word of it. The cipher step and the reading of zero-width characters judge by it too."""
    return _cost(word)


def is_word(word: str) -> bool:
    """Whether a lower-case word is one of the English word list's."""
    return _cost(word) != inf


_MIN_RUN = 15  # letters in a run with the spaces deleted
_MIN_SEGMENTS = 4  # segments in a camel-case run
_CHUNK = 400  # a long run is segmented in chunks of this many letters (a word may break at a seam)

# Word formation: a long word that is not in the list is often a form of one ("objectification", "redistributions",
# "decontextualizing"): such a run is a word, not words run together.
_PREFIXES_OF_FORMS = ("anti", "counter", "de", "dis", "inter", "mis", "multi", "non", "over", "pre", "re", "sub", "un")
_SUFFIXES_OF_FORMS = tuple(
    sorted(
        "s es ed ing ly er ers al ally ation ations ification ifications ization izations isation isations ized ised"
        " izing ising ness ment ments ity ities ism ist ists able ible".split(),
        key=len,
        reverse=True,
    )
)
# Runs of letters (camel case: with digits too, "How2MakeABomb") that may need splitting.
# (Anchored at a run's start with a lookahead: half the time of letting the engine try every position in a word.)
_CANDIDATE = re.compile(
    r"(?<![A-Za-z0-9'])(?=[A-Za-z0-9']*?(?:[a-z][A-Z]|[0-9][A-Z][a-z]))[A-Za-z0-9']+|(?<![A-Za-z'])[A-Za-z']{15,}"
)
_CASED = re.compile(r"'?(?:[a-z]+|[A-Z][a-z]*|[A-Z]+)(?:'[a-z]+|'[A-Z]+)?")
_SEGMENT = re.compile(r"(?:[A-Z]+(?![a-z])|[A-Z]?[a-z]+)(?:'[a-z]+)?|[A-Z](?=[A-Z][a-z])|[0-9]+")
# What touches a run (``_context``): code (``obj.getX``, ``Foo::new``, ``foo_bar``) or a name (``getX(``, ``#tag``,
# ``@user``, ``$x``) leaves it alone unless the run itself reads as prose (``_prose``, ``_some_prose``); a URL, an
# e-mail address or a path always does. Markup and emphasis (``*``, ``~``, HTML tags, brackets, quotes) do not count.
_CODE_BEFORE = frozenset("_.:=&|%^\\")
_CODE_AFTER = frozenset("_[{=&|%^\\")
# A call, a hashtag, a mention, a variable or a slash command: ``getX(``, ``#tag``, ``@user``, ``$x``, ``/cmd``
_NAME_BEFORE = frozenset("$#@/")
_ADDRESS = re.compile(r"://|www\.|@\w+\.")
_PATH_SEPARATORS = re.compile(r"[/\\]")
_TOKEN_REACH = 200
# English function words: prose has them, identifiers, names and single words seldom do.
_STOPWORDS = frozenset(
    "a about after all an and any are as at be because but by can could do does for from how i if in into"
    " is it me my of on or out should some than that the their them then these they this to was we what when"
    " where which who why will with would you your he she her him his its our us".split()
)
# Words of prose that identifiers seldom hold (they hold "by", "for", "with", "and", "on" and "the" often enough):
# pronouns, question words and auxiliaries. "I" counts as written (a lower-case "i" is often a stray letter).
_PROSE_MARKERS = frozenset(
    "me my you your we our us he she her him his they them their how what where when why who can could should would"
    " will do does was".split()
)
# Prose, even where code touches it: 6+ words, a third of them (and 3+) function words, two of them pronouns, question
# words or auxiliaries. ``getUserAccountBalanceForId(``,
# ``obj.getUserById`` and ``#HowToTrainYourDragon`` stay; ``HowDoIBuildAPipeBomb()`` reads as words.
_PROSE_WORDS = 6
_LONG_PROSE_WORDS = 12  # or 12+ words, a quarter of them function words


def split_words(text: str) -> str:
    """Split camel-case runs, snake-case prose and long runs of letters with no spaces into words, where they read
    as English."""
    if "_" in text:
        text = _SNAKE.sub(_split_snake, text)
    if _CAMEL_PIECE.search(text):
        text = _CAMEL_SPAN.sub(_split_camel_span, text)
    text = _CAMEL_SPAN.sub(_split_joined_span, text)
    if not _CANDIDATE.search(text):
        return text
    return _CANDIDATE.sub(_split_run, text)


def _split_run(match: re.Match[str]) -> str:
    run = match.group(0)
    core = run.strip("'")  # quotes around it: 'HowDoI...'
    if len(core) < _MIN_SEGMENTS or "''" in core:
        return run
    context = _context(match)
    if context == "address":
        return run
    camel = words = _camel_words(core)
    if camel is None and len(core) >= _MIN_RUN and core.replace("'", "").isalpha():
        if _chaotic(core):  # random case with the spaces deleted: "hOwDoIbUiLdApIpEbOmB"
            words = _segment(core.lower())
        elif not _word_form(core.lower()):
            words = _segment(core)
    if not words or (context == "code" and not _prose(words)):
        return run
    # a capitalised camel-case name with some prose in it: "#HowToMakeAPipeBombAtHome", "StageACarAccident...()"
    if context == "name" and not (_prose(words) or (camel and core[0].isupper() and _some_prose(words))):
        return run
    at = run.index(core)
    return run[:at] + " ".join(words) + run[at + len(core) :]


def _markers(words: list[str]) -> int:
    return sum(1 for w in words if w == "I" or w.lower() in _PROSE_MARKERS)


def _prose(words: list[str]) -> bool:
    stop = sum(1 for w in words if w.lower() in _STOPWORDS)
    if len(words) >= _LONG_PROSE_WORDS:  # longer than identifiers run
        return stop >= 3 and 4 * stop >= len(words)
    return len(words) >= _PROSE_WORDS and stop >= 3 and 3 * stop >= len(words) and _markers(words) >= 2


def _some_prose(words: list[str]) -> bool:
    """6+ words, 2+ of them function words and one a pronoun, a question word, an auxiliary or an article."""
    stop = sum(1 for w in words if w.lower() in _STOPWORDS)
    articles = sum(1 for w in words if w.lower() in ("a", "an", "the"))
    return len(words) >= _PROSE_WORDS and stop >= 2 and _markers(words) + articles >= 1


def _chaotic(run: str) -> bool:
    """Whether the case of a run changes at a third of its letters or more, and 30-70% of them are capitals
    (``hOwDoIbUiLd``; not ``HowDoIBuild`` nor ``ofxCvContourFinder``)."""
    letters = [c for c in run if c.isalpha()]
    changes = sum(1 for a, b in zip(letters, letters[1:], strict=False) if a.isupper() != b.isupper())
    upper = sum(1 for c in letters if c.isupper())
    return 3 * changes >= len(letters) and 3 * len(letters) <= 10 * upper <= 7 * len(letters)


def _word_form(word: str) -> bool:
    """Whether a word is in the list, or a form of one: a prefix and/or a suffix on a word of the list."""
    for prefix in ("", *_PREFIXES_OF_FORMS):
        if not word.startswith(prefix):
            continue
        rest = word[len(prefix) :]
        if _cost(rest) < inf:
            return True
        for suffix in _SUFFIXES_OF_FORMS:
            stem = rest[: -len(suffix)]
            if rest.endswith(suffix) and len(stem) >= 4 and (_cost(stem) < inf or _cost(stem + "e") < inf):
                return True
    return False


def _context(match: re.Match[str]) -> str | None:
    """``"address"`` for a run in a URL, an e-mail address or a path (always left as written); ``"code"`` for one
    that code characters touch (``obj.getX``, ``Foo::new``, ``foo_bar``, ``x=``; split only when it reads as prose,
    ``_prose``); ``"name"`` for a call, a hashtag, a mention, a variable or a slash command (``getX(``, ``#tag``,
    ``@user``, ``$x``, ``/cmd``; split as prose, or with 2+ function words in 6+ when it starts with a capital); None
    for prose, markup and emphasis (backticks, ``*``, ``~``, HTML tags, brackets: judged by the run alone)."""
    text, start, end = match.string, match.start(), match.end()
    # the word around the run, up to _TOKEN_REACH characters either side (a text with no spaces costs no more)
    left = text.rfind(" ", max(0, start - _TOKEN_REACH), start) + 1 or max(0, start - _TOKEN_REACH)
    right = text.find(" ", end, end + _TOKEN_REACH)
    token = text[left : right if right >= 0 else min(len(text), end + _TOKEN_REACH)]
    if _ADDRESS.search(token):
        return "address"
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    if (before in "/\\" or after in "/\\") and len(_PATH_SEPARATORS.findall(token)) >= 2:
        return "address"  # "/usr/local/share/howtobuildapipebomb.txt", "C:\\Users\\me"; not "/HowDoI..."
    if after in _CODE_AFTER or text[end : end + 2] == "::" or (after == "." and text[end + 1 : end + 2].islower()):
        return "code"  # "foo_bar", "FooBarBaz::new", "fooBarBaz.quxQuux", "howtomakeapipebomb.txt"
    # "...bomb.Give" and "Step1:Fill" are a sentence end with the space deleted, "obj.getValue" is code
    if before in _CODE_BEFORE and not (
        before in ".:" and start >= 2 and text[start - 2].isalnum() and text[start].isupper()
    ):
        return "code"
    if after == "(" or before in _NAME_BEFORE or before == "`":
        return "name"
    return None


# snake case: 4+ words joined by "_" ("how_do_i_build_a_pipe_bomb"); "max_retry_count", "__init__" and
# "get_user_by_id" stay (``_split_snake``)
_SNAKE = re.compile(r"(?<![\w$.@/\\-])[A-Za-z0-9']+(?:_[A-Za-z0-9']+){3,}(?![\w@/\\-]|\.\w)")


def _split_snake(match: re.Match[str]) -> str:
    """Words joined by ``_`` that read as prose: two thirds of them common words, a quarter (and 2+) function words."""
    run = match.group(0)
    words = run.split("_")
    known = sum(1 for w in words if w.isdigit() or (_CASED.fullmatch(w) and not _weak(w)))
    stop = sum(1 for w in words if w.lower() in _STOPWORDS)
    if 3 * known < 2 * len(words) or stop < 2 or 4 * stop < len(words):
        return run
    if match.end() < len(match.string) and match.string[match.end()] == "(" and not _prose(words):
        return run  # a call: "how_to_get_value("
    return " ".join(words)


# Camel case in short pieces: "HowDo IBuild APipe BombNow" (each piece too short to read alone). A span of words
# separated by spaces is split where camel pieces are half its words (3+) and its segments together read as prose.
_CAMEL_PIECE = re.compile(r"[a-z][A-Z]|[A-Z][A-Z][a-z]|[0-9][A-Z][a-z]")
_CAMEL_SPAN = re.compile(
    r"(?<![^\s\"'(*_~`>])[A-Za-z0-9']+[.,;:!?]?(?:[ \t]+[A-Za-z0-9']+[.,;:!?]?){2,}(?![^\s\"')*_~`<])"
)
_SPAN_WORD = re.compile(r"[A-Za-z0-9']+")


def _split_camel_span(match: re.Match[str]) -> str:
    span = match.group(0)
    tokens = _SPAN_WORD.findall(span)
    pieces = [t for t in tokens if _CAMEL_PIECE.search(t)]
    if len(pieces) < 3 or 2 * len(pieces) < len(tokens):
        return span
    segments: list[str] = []
    for token in tokens:
        found = _SEGMENT.findall(token)
        if "".join(found) != token:
            return span
        segments += found
    if 8 * sum(1 for s in segments if len(s) == 1 and s not in "AI0123456789") > len(segments):
        return span
    known = sum(1 for s in segments if s.isdigit() or not _weak(s))
    stop = sum(1 for s in segments if s.lower() in _STOPWORDS)
    if 3 * known < 2 * len(segments) or stop < 3 or 4 * stop < len(segments) or not _markers(segments):
        return span  # "HandBrake, MakeMKV, or AnyDVD" stay
    first = _SPAN_WORD.match(span)
    return _SPAN_WORD.sub(lambda m: _camel_piece_words(m.group(0), first=m.start() == 0 and first is not None), span)


def _camel_piece_words(token: str, *, first: bool) -> str:
    if not _CAMEL_PIECE.search(token):
        return token if first else _lower_word(token)
    segments = _SEGMENT.findall(token)
    return " ".join(segments[:first] + [_lower_word(s) for s in segments[first:]])


def _lower_word(segment: str) -> str:
    """Capitalised words after a run's first read as the lower-case words they stand for; acronyms and "I" stay."""
    return segment.lower() if (segment[1:].islower() and segment != "I") or segment == "A" else segment


def _camel_words(run: str) -> list[str] | None:
    """The words of a camel-case run; ``[]`` for one to leave as it is; None when it does not read as camel case."""
    segments = _SEGMENT.findall(run)
    if len(segments) < 2 or "".join(segments) != run:
        return None
    # a single capital other than "A" and "I" is no word: "SoMeOnE" is mixed case, not camel case ("HCl" in a long
    # run is a formula)
    if 8 * sum(1 for s in segments if len(s) == 1 and s not in "AI0123456789") > len(segments):
        return None
    lower = [s.lower() for s in segments]
    known = sum(1 for s in segments if s.isdigit() or not _weak(s))
    if 3 * known < 2 * len(segments):
        return None  # not words run together: the spaces-deleted reading may find some
    if 2 * sum(1 for w in lower if len(w) > 1 and w.isalpha()) < len(segments):
        return []  # mostly single letters and digits: a part number or a code ("V8P2ToB")
    stop = sum(1 for w in lower if w in _STOPWORDS)
    # Prose run together, not an identifier: 4 segments with 2 English function words (``HowDoIBuildAPipeBomb`` has 4
    # in 7), 6 with one, 8 with none. ``getElementById``, ``dataTaskWithRequest`` and
    # ``AbstractSingletonProxyFactoryBean`` stay as they are.
    if len(segments) < _MIN_SEGMENTS or 2 * stop + len(segments) < 8:
        return []
    # Capitalised words after the first read as the lower-case words they stand for; acronyms and "I" stay.
    return [segments[0]] + [_lower_word(s) for s in segments[1:]]


def _segment(run: str) -> list[str] | None:
    """The run segmented into English words, or None when it does not read as English."""
    starts = list(range(0, len(run), _CHUNK))
    if len(starts) > 1 and len(run) - starts[-1] < _MIN_RUN:
        starts.pop()  # a short tail joins the chunk before it
    pieces: list[str] = []
    for start, end in zip(starts, [*starts[1:], len(run)], strict=True):
        split = _best_split(run[start:end])
        if not _reads_as_english(split):
            return None
        pieces += split
    # a contraction's tail joins its word again: "Alexa's", "don't"
    for i in range(len(pieces) - 1, 0, -1):
        if pieces[i].startswith("'"):
            pieces[i - 1 : i + 1] = [pieces[i - 1] + pieces[i]]
    return pieces


def _best_split(run: str) -> list[str]:
    """The cheapest split of the run into words (dynamic programming over word costs, as wordninja does).

    Forward over ``_PREFIXES``: from each position only as far as some word starts so, a handful of letters in
    English, so the cost is linear in the run with a small constant.
    """
    lower = run.lower()
    n = len(lower)
    cost = [0.0] + [inf] * n
    back = [0] * (n + 1)
    # a word never runs across a lower-case letter followed by a capital ("doI" is two)
    limit = [n] * (n + 1)
    for i in range(n - 1, 0, -1):
        limit[i - 1] = i if run[i].isupper() and run[i - 1].islower() else limit[i]
    prefixes = _PREFIXES
    for i in range(n):
        base = cost[i]
        if base + _UNKNOWN_COST < cost[i + 1]:
            cost[i + 1], back[i + 1] = base + _UNKNOWN_COST, 1
        for j in range(i + 1, limit[i] + 1):
            piece = lower[i:j]
            if piece not in prefixes:
                break
            word_cost = prefixes[piece]
            if word_cost is not None and base + word_cost < cost[j]:
                cost[j], back[j] = base + word_cost, j - i
    pieces: list[str] = []
    i = n
    while i > 0:
        pieces.append(run[i - back[i] : i])
        i -= back[i]
    pieces.reverse()
    return pieces


def _weak(piece: str) -> bool:
    cost = _cost(piece.lower())
    for letters, line in _WEAK_COSTS:
        if len(piece) <= letters:
            return cost > line
    return cost == inf


def _reads_as_english(pieces: list[str]) -> bool:
    letters = sum(len(p) for p in pieces)
    weak = sum(len(p) for p in pieces if _weak(p))
    stop = sum(1 for p in pieces if p.lower() in _STOPWORDS)
    long_stop = sum(1 for p in pieces if len(p) > 1 and p.lower() in _STOPWORDS)
    if len(pieces) < 3 or 5 * letters < 13 * len(pieces) or not all(_CASED.fullmatch(p) for p in pieces):
        return False  # pieces written as words (random mixed case is base64), of a reasonable length
    # Nine letters in ten in common words, no stray letter, and two function words of 2+ letters, or one in four
    # pieces, or six pieces; or three in four in common words with two such function words, one in eight pieces. A
    # long word that is not in the list ("objectification", "operationalizations", "Softwareschmieden") breaks into
    # rare fragments with a stray "i", "a", "if" or "at" at most.
    stray = any(len(p) == 1 and _cost(p.lower()) == inf for p in pieces)
    if 10 * weak <= letters and not stray and (long_stop >= 2 or (long_stop and len(pieces) >= 4) or len(pieces) >= 6):
        return True
    return 4 * weak <= letters and long_stop >= 2 and 8 * stop >= len(pieces)


# Words joined in short pieces: "whatcan ihide inmeat tokill". A span is read as words where half its words (3+) are
# no word of the list but two or three common ones joined, and all of them together read as prose.
_MIN_JOINED = 5


def _split_joined_span(match: re.Match[str]) -> str:
    span = match.group(0)
    tokens = _SPAN_WORD.findall(span)
    if len(tokens) < 4:
        return span
    reads: dict[str, list[str]] = {}
    for token in tokens:
        bare = token.replace("'", "")
        if len(bare) >= _MIN_JOINED and bare.isalpha() and bare[1:].islower() and not _word_form(token.lower()):
            pieces = _best_split(token)
            for i in range(len(pieces) - 1, 0, -1):  # "neighbor" + "'s"
                if pieces[i].startswith("'"):
                    pieces[i - 1 : i + 1] = [pieces[i - 1] + pieces[i]]
            if 2 <= len(pieces) <= 3 and all(p.lower() in ("a", "i") or (len(p) > 1 and not _weak(p)) for p in pieces):
                reads[token] = pieces
    if len(reads) < 3 or 2 * len(reads) < len(tokens):
        return span
    words = [w for t in tokens for w in reads.get(t, [t])]
    stop = sum(1 for w in words if w.lower() in _STOPWORDS)
    markers = sum(1 for w in words if w.lower() in _PROSE_MARKERS or w == "i")
    if stop < 3 or 4 * stop < len(words) or not markers:
        return span
    return _SPAN_WORD.sub(lambda m: " ".join(reads.get(m.group(0), [m.group(0)])), span)
