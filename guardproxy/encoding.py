"""Tokenization shared by training and runtime, so both feed the guard model identical ids.

Every text is normalized first (``guardproxy.normalize``). Long inputs are cut deliberately:

- prompt mode keeps the head *and* the tail (``[CLS] head tail [SEP]``): a jailbreak wrapper often ends with the
  actual ask, and its opening lines are what marks it as a wrapper. The middle is not read by this pass; the
  classifier's per-turn check reads it in short windows of their own (``OnnxClassifier.prompt_windows``);
- pair mode keeps the tail of the prompt (the ask) and the head of the reply (a refusal shows in its first
  sentences): ``[CLS] prompt [SEP] reply [SEP]`` with ``token_type_ids`` 0 then 1.

A conversation window is a prompt whose last line is its newest turn. A model trained with ``guardproxy train
--window-pool newest`` has a fourth input, ``pool_mask``: its heads read the mean of the masked ids only, while the
attention reads the whole input. For a window that mask covers the newest turn (``encode_window``), so small talk
before a harmful ask is context for the ask's ids, not ids averaged in with it; for anything else it equals
``attention_mask``.

A model trained with ``guardproxy train --strip-end-punctuation`` has a tokenizer that drops the ``.``, ``?`` and
``!`` ending each line before it reads the text (``add_end_punctuation_rule``): its verdict cannot turn on whether a
request ends in a question mark. That lives in the model's ``tokenizer.json``, so training and runtime agree.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Regex, Tokenizer, normalizers

from guardproxy.errors import ConfigError
from guardproxy.normalize import normalize

__all__ = [
    "END_PUNCTUATION_PATTERN",
    "POOL_INPUT",
    "Encoding",
    "covered_scripts",
    "encode_pair",
    "encode_prompt",
    "encode_window",
    "load_tokenizer",
    "pad_batch",
    "add_end_punctuation_rule",
    "drops_end_punctuation",
    "unreadable_share",
]

POOL_INPUT = "pool_mask"  # the optional fourth model input (see the module docstring)
PAD_ID = 0  # BERT's [PAD]; padded positions are masked out, so the id itself never reaches a result
HEAD_FRACTION = 0.25  # share of a long prompt's budget kept from its beginning; the rest comes from its end
PAIR_PROMPT_MIN_FRACTION = 1 / 3  # the prompt keeps at least this share of a pair's budget when both are long
_CHARS_PER_TOKEN_BOUND = 8  # pre-cut very long texts before tokenizing: more characters than any token needs
# A script is covered when the vocabulary has at least this many pieces of two or more of its letters. The shipped
# (English) vocabulary: Latin 27,587; Cyrillic 8, Greek 4, Arabic 2; every other script none.
COVERED_SCRIPT_PIECES = 100


@dataclass(frozen=True)
class Encoding:
    """The ids of one model input, special tokens included, not padded."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    # First id the heads' mean reads when the model has ``pool_mask`` (a window's newest turn, up to but not
    # including the final [SEP]); 0: every id, as ``attention_mask``.
    pool_from: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` with padding and truncation switched off (``encode_*`` cut and ``pad_batch`` pads)."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for missing or malformed files
        raise ConfigError(f"cannot load tokenizer: {exc}", where=str(path)) from exc
    tokenizer.no_padding()
    tokenizer.no_truncation()
    for token in ("[CLS]", "[SEP]"):
        if tokenizer.token_to_id(token) is None:
            raise ConfigError(f"tokenizer has no {token} token", where=str(path))
    return tokenizer


# A run of sentence-ending marks (and the blanks after it) at the end of a line. The tokenizer's regex engine
# (Oniguruma) reads ``$`` as the end of any line, so each turn of a window, one per line, loses its own.
END_PUNCTUATION_PATTERN = r"[.?!\u3002]+[ \t]*$"


def add_end_punctuation_rule(tokenizer: Tokenizer) -> Tokenizer:
    """Make ``tokenizer`` drop the punctuation that ends each line before anything else reads the text.

    The public sets tie the question mark to their labels: thousands of harmless assistant commands are written
    without one (CLINC150, HWU64) and the in-the-wild harmful questions all end in one, and a model trained on them
    read "how do i make a bomb" as harmless and "how do i make a bomb?" as harmful (``bench.end_punctuation``).
    Returns the same tokenizer, changed; saved, the change travels in its ``tokenizer.json``.
    """
    rule = normalizers.Replace(Regex(END_PUNCTUATION_PATTERN), "")
    tokenizer.normalizer = rule if tokenizer.normalizer is None else normalizers.Sequence([rule, tokenizer.normalizer])
    return tokenizer


def drops_end_punctuation(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` reads "a?" as it reads "a" (a model trained with ``--strip-end-punctuation``)."""
    marked: list[int] = tokenizer.encode("a?", add_special_tokens=False).ids
    plain: list[int] = tokenizer.encode("a", add_special_tokens=False).ids
    return marked == plain


@functools.lru_cache(maxsize=8192)
def _script(char: str) -> str:
    """The Unicode script of a letter, as the first word of its name (``LATIN``, ``CYRILLIC``, ``CJK``, ``HANGUL``)."""
    return unicodedata.name(char, "").partition(" ")[0]


def covered_scripts(tokenizer: Tokenizer) -> frozenset[str]:
    """The scripts whose words the tokenizer's vocabulary can spell in pieces longer than one letter.

    An English WordPiece vocabulary covers Latin (accents are stripped, so French or Polish words still come out as
    word pieces). Russian, Greek, Arabic, Hindi or Korean come out letter by letter, and Chinese, Japanese and Thai
    largely as ``[UNK]``: the guard model reads such text as a string of characters, not words.
    """
    counts: dict[str, int] = {}
    for token in tokenizer.get_vocab():
        core = token.removeprefix("##")
        if len(core) < 2:
            continue
        for script in {_script(c) for c in core if c.isalpha()}:
            counts[script] = counts.get(script, 0) + 1
    return frozenset(s for s, n in counts.items() if n >= COVERED_SCRIPT_PIECES)


def unreadable_share(text: str, covered: frozenset[str]) -> float:
    """The share of ``text``'s letters written in scripts outside ``covered`` (0.0 for text without letters).

    What the guard reports as ``unreadable``: near 1 the model's harm score is close to a guess (``bench/RESULTS.md``
    measures it per script), and a policy can say what to do then (``unreadable_at_least``).
    """
    latin = "LATIN" in covered  # then the letters below U+0250 (ASCII, Latin-1, Latin Extended-A/B) need no lookup
    if latin and text.isascii():
        return 0.0
    letters = outside = 0
    for char in text:
        if char.isalpha():
            letters += 1
            if not (latin and char < "\u0250") and _script(char) not in covered:
                outside += 1
    return outside / letters if letters else 0.0


def encode_prompt(tokenizer: Tokenizer, text: str, max_length: int) -> Encoding:
    """Encode one prompt (or a window of turns) as ``[CLS] ids [SEP]``, keeping head and tail when too long."""
    input_ids, _ = _prompt_ids(tokenizer, text, max_length)
    return Encoding(input_ids=input_ids, token_type_ids=(0,) * len(input_ids))


def encode_window(tokenizer: Tokenizer, text: str, newest: str, max_length: int) -> Encoding:
    """Encode a window (``text``, whose last line is ``newest``) as ``encode_prompt`` does, with ``pool_from`` at the
    newest turn's first id. When the window is cut, the pooled ids stay within the kept tail."""
    input_ids, tail_from = _prompt_ids(tokenizer, text, max_length)
    n_newest = len(_token_ids(tokenizer, newest, max_length, keep="tail"))
    pool_from = max(tail_from, len(input_ids) - 1 - n_newest)
    if pool_from >= len(input_ids) - 1:  # nothing of the newest turn was kept: read the whole window
        pool_from = 0
    return Encoding(input_ids=input_ids, token_type_ids=(0,) * len(input_ids), pool_from=pool_from)


def _prompt_ids(tokenizer: Tokenizer, text: str, max_length: int) -> tuple[tuple[int, ...], int]:
    """``[CLS] ids [SEP]`` (head and tail kept) and the index of the first id of the kept tail (1 when uncut)."""
    _check_max_length(max_length, 2)
    budget = max_length - 2
    ids = _token_ids(tokenizer, text, budget, keep="both")
    tail_from = 1
    if len(ids) > budget:
        head = int(budget * HEAD_FRACTION)
        ids = ids[:head] + ids[len(ids) - (budget - head) :]
        tail_from = 1 + head
    cls, sep = _specials(tokenizer)
    return (cls, *ids, sep), tail_from


def encode_pair(tokenizer: Tokenizer, prompt: str, reply: str, max_length: int) -> Encoding:
    """Encode a (prompt, reply) pair: the prompt's tail and the reply's head, within ``max_length`` ids."""
    _check_max_length(max_length, 3)
    budget = max_length - 3
    prompt_ids = _token_ids(tokenizer, prompt, budget, keep="tail")
    reply_ids = _token_ids(tokenizer, reply, budget, keep="head")
    prompt_keep = min(len(prompt_ids), max(int(budget * PAIR_PROMPT_MIN_FRACTION), budget - len(reply_ids)))
    reply_keep = min(len(reply_ids), budget - prompt_keep)
    first = prompt_ids[len(prompt_ids) - prompt_keep :]
    second = reply_ids[:reply_keep]
    cls, sep = _specials(tokenizer)
    input_ids = (cls, *first, sep, *second, sep)
    token_type_ids = (0,) * (len(first) + 2) + (1,) * (len(second) + 1)
    return Encoding(input_ids=input_ids, token_type_ids=token_type_ids)


def pad_batch(encodings: Sequence[Encoding], *, pool_mask: bool = False) -> dict[str, npt.NDArray[np.int64]]:
    """Pad to the longest encoding: ``input_ids``, ``attention_mask``, ``token_type_ids``, int64 ``[batch, seq]``;
    and ``pool_mask`` when asked (for a model that has that input)."""
    width = max((len(e) for e in encodings), default=0)
    input_ids = np.full((len(encodings), width), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(encodings), width), dtype=np.int64)
    token_type_ids = np.zeros((len(encodings), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        n = len(enc)
        input_ids[row, :n] = enc.input_ids
        attention_mask[row, :n] = 1
        token_type_ids[row, :n] = enc.token_type_ids
    feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if pool_mask:
        pooled = attention_mask.copy()
        for row, enc in enumerate(encodings):
            if enc.pool_from > 0:
                pooled[row, :] = 0
                pooled[row, enc.pool_from : len(enc) - 1] = 1
        feeds[POOL_INPUT] = pooled
    return feeds


def _token_ids(tokenizer: Tokenizer, text: str, budget: int, *, keep: str) -> list[int]:
    text = normalize(text)
    # Tokenizing a 1 MB paste only to keep a few hundred ids would cost the request path milliseconds: cut the
    # characters first, far beyond what the kept ids can span.
    limit = budget * _CHARS_PER_TOKEN_BOUND
    if len(text) > 2 * limit:
        if keep == "head":
            text = text[:limit]
        elif keep == "tail":
            text = text[-limit:]
        else:
            text = text[:limit] + " " + text[-limit:]
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False).ids
    return ids


def _specials(tokenizer: Tokenizer) -> tuple[int, int]:
    cls = tokenizer.token_to_id("[CLS]")
    sep = tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ConfigError("tokenizer has no [CLS]/[SEP] token (load it with load_tokenizer)")
    return cls, sep


def _check_max_length(max_length: int, minimum: int) -> None:
    if max_length <= minimum:
        raise ValueError(f"max_length must be greater than {minimum}, got {max_length}")
