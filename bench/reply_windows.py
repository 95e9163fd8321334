"""Reply harm over the whole reply, not just its head (``OnnxClassifier.reply_windows``).

A pair pass reads the prompt's tail and the reply's head (``guardproxy.encoding.encode_pair``): with a 256-id model
about the first 170-230 ids of a reply. Harmful text after a long harmless opening is never read. The gateway now
also scores overlapping windows of the rest and takes the highest reply harm. This measures what that changes, on
the model's dev split (rows it never trained on; the trainer's own splitter), for every pair with a reply harm
label, by source:

- reply harm >= the default policy's line (0.5, ``block-harmful-reply``) with the head alone and as the gateway
  scores a reply (``OnnxClassifier.score_whole_replies``: windows count from ``REPLY_WINDOW_LINE``);
- the same had windows counted from each line of a grid (how ``REPLY_WINDOW_LINE`` was chosen, on the calibration
  split: ``--split calibration``);
- the AUROC of harmful compliance against the rest, both ways;
- windows per reply (each is one more pair pass).

    python -m bench.reply_windows --data ../shared/data --json bench/results/reply_windows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.trainer_rows import trainer_rows
from guardproxy.classifier import OnnxClassifier

ROOT = Path(__file__).resolve().parent.parent
LINE = 0.5  # policies/default.toml, block-harmful-reply
WINDOW_LINES = (0.5, 0.6, 0.7, 0.8, 0.9)


def auroc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    examples = trainer_rows(args.model, args.data)
    rows = [e for e in examples if e.pair and e.reply_harm is not None and e.split == args.split]
    clf = OnnxClassifier.load(args.model)
    by_source: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    started = time.perf_counter()
    for i, e in enumerate(rows):
        head_text, windows = clf.reply_parts(e.reply)
        scores = clf.score_replies_sync([(e.text, e.reply)] + [(e.text, w) for w in windows])
        head = scores[0].reply_harm
        tail = max([s.reply_harm for s in scores[1:]], default=0.0)
        (whole_score,) = clf.score_whole_replies_sync([(e.text, e.reply)])  # the gateway's rule
        whole = whole_score.reply_harm
        d = by_source[e.source]
        d["harmful" if e.reply_harm >= 0.5 else "harmless"].append((head, whole))
        d["tails_harmful" if e.reply_harm >= 0.5 else "tails_harmless"].append((head, tail))
        d["windows"].append(len(windows))
        if (i + 1) % 50 == 0 or i + 1 == len(rows):
            print(f"\r  {i + 1}/{len(rows)} pairs, {time.perf_counter() - started:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    report: dict[str, Any] = {"model": str(args.model), "split": args.split, "line": LINE, "sources": {}}
    print(f"{'source':32} {'kind':9} {'n':>5} {'head':>6} {'whole':>6} {'AUROC head':>11} {'whole':>6} {'windows':>8}")
    for source, d in sorted(by_source.items()):
        pos, neg = d["harmful"], d["harmless"]
        out: dict[str, Any] = {"windows_mean": sum(d["windows"]) / len(d["windows"])}
        for kind, pairs in (("harmful", pos), ("harmless", neg)):
            if pairs:
                out[kind] = {
                    "n": len(pairs),
                    "at_line_head": sum(h >= LINE for h, _ in pairs) / len(pairs),
                    "at_line_whole": sum(w >= LINE for _, w in pairs) / len(pairs),
                }
        # a separate, higher line for the windows (they read a reply from its middle, out of its context)
        out["flagged_at_window_line"] = {
            kind: {
                f"{line:.2f}": sum(h >= LINE or t >= line for h, t in d[f"tails_{kind}"]) / len(d[f"tails_{kind}"])
                for line in WINDOW_LINES
            }
            for kind in ("harmful", "harmless")
            if d[f"tails_{kind}"]
        }
        out["auroc_head"] = auroc([h for h, _ in pos], [h for h, _ in neg])
        out["auroc_whole"] = auroc([w for _, w in pos], [w for _, w in neg])
        report["sources"][source] = out
        for kind in ("harmful", "harmless"):
            if kind in out:
                k = out[kind]
                ah = "-" if out["auroc_head"] is None else f"{out['auroc_head']:.3f}"
                aw = "-" if out["auroc_whole"] is None else f"{out['auroc_whole']:.3f}"
                head, whole, windows = k["at_line_head"], k["at_line_whole"], out["windows_mean"]
                print(f"{source:32} {kind:9} {k['n']:5} {head:6.1%} {whole:6.1%} {ah:>11} {aw:>6} {windows:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
