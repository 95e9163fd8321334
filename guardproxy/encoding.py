"""Tokenization shared by training and runtime, so both feed the guard model identical ids.

Every text is normalized first (``guardproxy.normalize``). Long inputs are cut deliberately:

- prompt mode keeps the head *and* the tail (``[CLS] head tail [SEP]``): a jailbreak wrapper often ends with the
  actual ask, and its opening lines are what marks it as a wrapper;
- pair mode keeps the tail of the prompt (the ask) and the head of the reply (a refusal shows in its first
  sentences): ``[CLS] prompt [SEP] reply [SEP]`` with ``token_type_ids`` 0 then 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from guardproxy.errors import ConfigError
from guardproxy.normalize import normalize

__all__ = ["Encoding", "encode_pair", "encode_prompt", "load_tokenizer", "pad_batch"]

PAD_ID = 0  # BERT's [PAD]; padded positions are masked out, so the id itself never reaches a result
HEAD_FRACTION = 0.25  # share of a long prompt's budget kept from its beginning; the rest comes from its end
PAIR_PROMPT_MIN_FRACTION = 1 / 3  # the prompt keeps at least this share of a pair's budget when both are long
_CHARS_PER_TOKEN_BOUND = 8  # pre-cut very long texts before tokenizing: more characters than any token needs


@dataclass(frozen=True)
class Encoding:
    """The ids of one model input, special tokens included, not padded."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]

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


def encode_prompt(tokenizer: Tokenizer, text: str, max_length: int) -> Encoding:
    """Encode one prompt (or a window of turns) as ``[CLS] ids [SEP]``, keeping head and tail when too long."""
    _check_max_length(max_length, 2)
    budget = max_length - 2
    ids = _token_ids(tokenizer, text, budget, keep="both")
    if len(ids) > budget:
        head = int(budget * HEAD_FRACTION)
        ids = ids[:head] + ids[len(ids) - (budget - head) :]
    cls, sep = _specials(tokenizer)
    input_ids = (cls, *ids, sep)
    return Encoding(input_ids=input_ids, token_type_ids=(0,) * len(input_ids))


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


def pad_batch(encodings: Sequence[Encoding]) -> dict[str, npt.NDArray[np.int64]]:
    """Pad to the longest encoding: ``input_ids``, ``attention_mask``, ``token_type_ids``, int64 ``[batch, seq]``."""
    width = max((len(e) for e in encodings), default=0)
    input_ids = np.full((len(encodings), width), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((len(encodings), width), dtype=np.int64)
    token_type_ids = np.zeros((len(encodings), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        n = len(enc)
        input_ids[row, :n] = enc.input_ids
        attention_mask[row, :n] = 1
        token_type_ids[row, :n] = enc.token_type_ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


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
