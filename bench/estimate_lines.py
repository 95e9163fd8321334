"""Conversation flags at other escalation lines, with the window estimate and without: two replays compared.

    .venv/bin/python -m bench.conversation_eval --early-exit --cache /tmp/ce_with.json
    .venv/bin/python -m bench.conversation_eval --early-exit --model /tmp/noest --cache /tmp/ce_without.json
    .venv/bin/python -m bench.estimate_lines --with /tmp/ce_with.json --without /tmp/ce_without.json [--lines 0.35,0.5]

``/tmp/noest`` is a copy of the model directory whose ``early_exit.json`` has no ``"window_estimate"`` key. The
estimate's gate was chosen to keep every calibration flag at the tracker's line (0.5); a policy may flag at another
(``policies/strict.toml``: escalation >= 0.35). For each line this prints, per split and set, the conversations
flagged (and flagged before their final user turn) in each replay, and those whose first flag moved. Escalation is
recomputed from the cached per-turn components with the shipped parameters (``conversation_eval.escalations``).
Prints, never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.conversation_eval import escalations, first_flag, load_conversations
from guardproxy.conversation import EscalationParams
from guardproxy.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimate_lines", description=__doc__)
    parser.add_argument("--with", dest="with_", type=Path, required=True, help="replay cache with the estimate")
    parser.add_argument("--without", type=Path, required=True, help="replay cache of the model without it")
    parser.add_argument("--lines", default="0.35,0.5")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", type=Path, default=Settings().guard.model_dir, help="whose splits")
    parser.add_argument("--stitched", type=int, default=100, help="as the replays were run")
    args = parser.parse_args(argv)
    data = json.loads((args.model / "config.json").read_text()).get("data", {})
    convs = {
        c.id: c
        for c in load_conversations(
            args.data, int(data.get("seed", 0)), args.stitched, bool(data.get("chat_turns", False))
        )
    }
    with_, without = (json.loads(p.read_text())["turns"] for p in (args.with_, args.without))
    p = EscalationParams()
    for line in (float(x) for x in args.lines.split(",")):
        tab: Counter[tuple[str, ...]] = Counter()
        moved = []
        for cid, ta in with_.items():
            tb, c = without.get(cid), convs.get(cid)
            if tb is None or c is None:
                continue
            fa, fb = first_flag(escalations(ta, p), line), first_flag(escalations(tb, p), line)
            key = (c.split, c.set, c.label)
            tab[(*key, "n")] += 1
            tab[(*key, "with")] += fa is not None
            tab[(*key, "without")] += fb is not None
            tab[(*key, "early with")] += fa is not None and fa < len(ta)
            tab[(*key, "early without")] += fb is not None and fb < len(tb)
            if fa != fb:
                moved.append(f"{cid} ({c.split}, {c.label}): first flag {fb} -> {fa}")
        print(f"== escalation >= {line}: flagged / flagged before the final turn, with the estimate | without")
        for key in sorted({k[:3] for k in tab}):
            g = {k: tab[(*key, k)] for k in ("n", "with", "early with", "without", "early without")}
            print(
                f"  {'/'.join(key):38s} n={g['n']:5d}  {g['with']:4d} / {g['early with']:4d}  |  "
                f"{g['without']:4d} / {g['early without']:4d}"
            )
        print(f"  first flag moved (without -> with) in {len(moved)} conversations:")
        for m in moved:
            print(f"    {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
