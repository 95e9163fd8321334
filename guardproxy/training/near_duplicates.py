"""Near-duplicates between authored training rows and the challenge sets, found and dropped.

    python -m guardproxy.training.near_duplicates [--threshold 0.4] [--drop-train FILE...] [--drop-eval FILE...]

Helpers who write data independently still converge on the same canonical examples (the Tokyo subway attack,
the AR-15 conversion, "why is the sky blue"), so a new training batch can land next to a challenge row by
accident. Two rows are near-duplicates when the Jaccard overlap of their content words (stop words left out)
is at least ``--threshold``. Without ``--drop-*`` the pairs are listed; ``--drop-train FILE`` rewrites that
authored file without its prompt and pair rows near any challenge prompt (conversations are listed, not
dropped), ``--drop-eval FILE`` rewrites that challenge file without its rows near any training row, a
conversation's user turns included (run it after ``--drop-train``). Prints what it dropped; never touches shared
data. A conversation's user turn counts only with at least ``MIN_TURN_WORDS`` content words: short turns ("ok
thanks", "how many traps") match one another everywhere, and before this rule ``--drop-eval`` on the challenge
conversations dropped 24 of them for such turns.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guardproxy.training.sources import AUTHORED_DIR, CHALLENGE_DIRS

_STOP = frozenset(
    "a an the i me my you your to of in on for with and or but is are was be do does did how what whats what's "
    "which who why when where can could would should will it its it's that this these those at by from as so if not "
    "no just like about into get got im i'm ur u there their they them he she her his we our us one any some all "
    "more most much very really".split()
)


MIN_TURN_WORDS = 4


@dataclass(frozen=True)
class Text:
    path: Path
    id: str
    text: str
    words: frozenset[str]
    turn: bool = False  # a user turn of a conversation, not a prompt

    def short_turn(self) -> bool:
        """A conversation turn under ``MIN_TURN_WORDS`` content words: too short to call a duplicate either way."""
        return self.turn and len(self.words) < MIN_TURN_WORDS


# Han and kana: Chinese and Japanese put no spaces between words, so character bigrams stand in for them.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _runs(text: str) -> Iterable[str]:
    """Runs of letters, digits, combining marks (Devanagari vowel signs, Arabic harakat) and apostrophes."""
    word: list[str] = []
    for ch in unicodedata.normalize("NFKC", text.lower()) + " ":
        if ch.isalnum() or ch == "'" or unicodedata.category(ch).startswith("M"):
            word.append(ch)
        elif word:
            yield "".join(word)
            word = []


def content_words(text: str) -> frozenset[str]:
    """Content words in any script: English stop words left out; Chinese and Japanese as character bigrams."""
    out: set[str] = set()
    for run in _runs(text):
        if _CJK.search(run) and len(run) > 1:
            out.update(a + b for a, b in itertools.pairwise(run))
        elif run not in _STOP:
            out.add(run)
    return frozenset(out)


def texts_of(path: Path, *, turns_too: bool = True) -> list[Text]:
    """Every prompt (and, with ``turns_too``, every user turn) of a JSONL file of prompts, pairs or conversations."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if isinstance(row.get("prompt"), str):
            out.append(Text(path, str(row["id"]), row["prompt"], content_words(row["prompt"])))
        out += [
            Text(path, str(row["id"]), m["content"], content_words(m["content"]), turn=True)
            for m in (row.get("messages") or [] if turns_too else [])
            if m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
    return out


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def near(rows: Iterable[Text], others: Sequence[Text], threshold: float) -> list[tuple[float, Text, Text]]:
    """(overlap, row, its closest other) for each row at or above ``threshold``; rows of one content word are
    skipped (too short to call a duplicate), and short conversation turns on either side (``Text.short_turn``)."""
    others = [o for o in others if not o.short_turn()]
    hits = []
    for row in rows:
        if len(row.words) < 2 or row.short_turn() or not others:
            continue
        best, other = max(((jaccard(row.words, o.words), o) for o in others), key=lambda x: x[0])
        if best >= threshold:
            hits.append((best, row, other))
    return sorted(hits, key=lambda h: -h[0])


def drop_rows(path: Path, ids: set[str]) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and str(json.loads(line)["id"]) not in ids]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return len(lines) - len(kept)


def _all(paths: Iterable[Path], *, turns_too: bool = True) -> list[Text]:
    return [t for p in paths for t in texts_of(p, turns_too=turns_too)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guardproxy.training.near_duplicates", description=__doc__)
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--drop-train", type=Path, nargs="*", default=[], help="authored files to clean")
    parser.add_argument("--drop-eval", type=Path, nargs="*", default=[], help="challenge files to clean")
    args = parser.parse_args(argv)
    # held/ too: a batch kept out of the recipe today may be loaded later, so challenge sets stay apart from it
    train_files = sorted(AUTHORED_DIR.glob("*.jsonl")) + sorted(AUTHORED_DIR.glob("held/*.jsonl"))
    eval_files = [p for d in CHALLENGE_DIRS for p in sorted(d.glob("*.jsonl"))]
    for path in args.drop_train:
        # Against the challenge prompts only: a training conversation is never dropped from its batch here.
        hits = near(texts_of(path, turns_too=False), _all(eval_files, turns_too=False), args.threshold)
        ids = {h[1].id for h in hits}
        print(f"{path}: dropped {drop_rows(path, ids)} rows near a challenge prompt (>= {args.threshold})")
    for path in args.drop_eval:
        hits = near(texts_of(path), _all(train_files), args.threshold)
        ids = {h[1].id for h in hits}
        print(f"{path}: dropped {drop_rows(path, ids)} rows near a training row (>= {args.threshold})")
    if not args.drop_train and not args.drop_eval:
        for overlap, row, other in near(_all(train_files), _all(eval_files), args.threshold):
            print(f"{overlap:.2f}  {row.id}: {row.text[:80]!r}\n      {other.id}: {other.text[:80]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
