"""Seeded, group-aware splits: dev (never trained on), calibration (thresholds only), train.

A group is a goal, a family, a PHTest prompt with all its model responses, a HarmBench behaviour with its classifier
rows, a jailbreak community; identical texts across sources are merged into one group too (union-find), so the
same request never sits on both sides of a split.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence

from guardproxy.training.sources import Example, text_group

DEV_FRACTION = 0.15
CALIBRATION_FRACTION = 0.10
# PHTest response pairs a training run scores on dev (36k pairs in all; scoring them all would take most of a run).
DEV_PHTEST_PAIRS = 3000


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def assign_splits(examples: Sequence[Example], seed: int) -> None:
    """Set ``split`` on every example to ``dev``, ``calibration`` or ``train`` (deterministic for a seed)."""
    uf = _UnionFind()
    for ex in examples:
        uf.union(ex.group, ex.group)
        if not ex.pair and not ex.text.startswith(("user: ", "assistant: ")):
            uf.union(ex.group, text_group(ex.text))
    for ex in examples:
        root = uf.find(ex.group)
        digest = hashlib.sha256(f"{seed}:{root}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        ex.split = "dev" if u < DEV_FRACTION else "calibration" if u < DEV_FRACTION + CALIBRATION_FRACTION else "train"


def summary(examples: Sequence[Example]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter[str]] = {}
    for ex in examples:
        counts.setdefault(ex.source if not ex.source.startswith("authored/") else "authored", Counter())[ex.split] += 1
    return {source: dict(c) for source, c in sorted(counts.items())}


def cap_pairs(rows: list[Example], cap: int, seed: int) -> list[Example]:
    """Keep at most ``cap`` PHTest response pairs, a seeded uniform sample; other rows are all kept."""
    pairs = [e for e in rows if e.source == "phtest_responses"]
    if len(pairs) <= cap:
        return rows
    keep = {id(e) for e in random.Random(seed).sample(pairs, cap)}
    return [e for e in rows if e.source != "phtest_responses" or id(e) in keep]
