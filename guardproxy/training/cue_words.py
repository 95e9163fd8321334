"""Form words as label cues in the training asks: ``python -m guardproxy.training.cue_words --data ../shared/data``.

A form word (``augment.FORM_WORDS``: how, write, give, please...) says nothing about a request's intent. If it is
much more common on one side of the training asks, a model can learn it as evidence anyway. 2.25.1 did: deleting
"how" clears most of the harmless challenge rows it flags (``python -m bench.word_deletion``). For each form word
this prints the share of harmful and of harmless asks that contain it, and their ratio. It reads the asks the
trainer's augmentation draws from (public and authored single asks with a harm label, every split), sorted from
the strongest harm cue to the strongest harmless one.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guardproxy.training.augment import FORM_WORDS, form_word_shares, lean_ratio, single_asks
from guardproxy.training.sources import AUTHORED_DIR, Example, load_authored, load_prompts


@dataclass(frozen=True)
class Cue:
    word: str
    harmful_share: float  # of harmful asks that contain the word
    harmless_share: float

    @property
    def ratio(self) -> float:
        """> 1: the word is a harm cue in the data; < 1: a harmless cue."""
        return lean_ratio(self.harmful_share, self.harmless_share)


def cues(asks: Iterable[Example], words: Iterable[str] = FORM_WORDS) -> list[Cue]:
    """Each word's share of harmful and of harmless asks containing it, strongest harm cue first."""
    shares = form_word_shares(list(asks))
    out = [Cue(w, *shares.get(w, (0.0, 0.0))) for w in sorted(set(words))]
    return sorted(out, key=lambda c: c.ratio, reverse=True)


def training_asks(data: Path, authored: Path = AUTHORED_DIR) -> list[Example]:
    """The single asks with a harm label that the augmentation draws from (every split)."""
    return single_asks(load_prompts(data) + load_authored(authored))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardproxy.training.cue_words", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="shared data root (read by path)")
    ap.add_argument("--min-share", type=float, default=0.005, help="leave out words in fewer asks on both sides")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"cue_words: data directory not found: {args.data}")
        return 2
    asks = training_asks(args.data)
    rows = [c for c in cues(asks) if max(c.harmful_share, c.harmless_share) >= args.min_share]
    n_bad = sum(1 for e in asks if e.harm == 1.0)
    print(f"{n_bad} harmful and {len(asks) - n_bad} harmless asks")
    print(f"{'word':<10} {'harmful':>8} {'harmless':>9} {'ratio':>6}")
    for c in rows:
        print(f"{c.word:<10} {c.harmful_share:8.1%} {c.harmless_share:9.1%} {c.ratio:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
