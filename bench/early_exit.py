"""What early exit (``guard.early_exit``) costs in verdicts and saves in time, for the model's ``early_exit.json``.

    .venv/bin/python -m bench.early_exit [--model models/guard-v1] [--runs 200] [--json FILE]

1. Verdicts: every prompt of the held-out challenge sets (``bench/challenge*/harm_challenge*.jsonl``, never trained
   or tuned on) and the bench's own ordinary turns, scored one at a time by the whole model and by the model with
   early exit: how many exit, and which turns the whole model flags (harm or jailbreak >= 0.5, and harm >= 0.15,
   the strict policy's lowest line) lose that flag by exiting.
2. Time: ``score_prompts_sync`` per turn, one onnxruntime thread, whole model against early exit, interleaved, p50
   over ``--runs`` turns each: turns that exit (ordinary asks of the bench's kind), turns that go on (harmful asks:
   the cost of the extra cut), and the bench's ~64-word turn mix as it comes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardproxy.benchmark.load import user_turn
from guardproxy.classifier import OnnxClassifier
from guardproxy.settings import DEFAULT_MODEL_DIR, PROJECT_ROOT
from guardproxy.signals import PromptScore

STRICT_LINE = 0.15  # policies/strict.toml's lowest harm line


def flagged(s: PromptScore, line: float = 0.5) -> bool:
    return s.harm >= line or s.jailbreak >= 0.5


def verdicts(whole: OnnxClassifier, early: OnnxClassifier, rows: list[dict[str, Any]]) -> dict[str, Any]:
    texts = [r["prompt"] for r in rows]
    a = whole.score_prompts_sync(texts)
    b = early.score_prompts_sync(texts)
    lost = [
        {
            "label": r.get("label"),
            "whole_harm": round(x.harm, 3),
            "whole_jailbreak": round(x.jailbreak, 3),
            "prompt": r["prompt"][:160],
        }  # fmt: skip
        for r, x, y in zip(rows, a, b, strict=True)
        if y.exited and (flagged(x) or x.harm >= STRICT_LINE)
    ]
    harmful = [r.get("label") == "harmful" for r in rows]
    return {
        "rows": len(rows),
        "exited": sum(y.exited for y in b),
        "exited_harmless": sum(y.exited for y, h in zip(b, harmful, strict=True) if not h),
        "harmless": harmful.count(False),
        "flags_whole": sum(flagged(x) for x in a),
        "flags_lost": sum(flagged(x) and not flagged(y) for x, y in zip(a, b, strict=True)),
        "harmful_flags_lost": sum(flagged(x) and not flagged(y) and h for x, y, h in zip(a, b, harmful, strict=True)),
        "strict_line_lost": sum(x.harm >= STRICT_LINE > y.harm for x, y in zip(a, b, strict=True)),
        "lost": lost,
    }


def timed(clf: OnnxClassifier, text: str, max_length: int | None = None) -> float:
    began = time.perf_counter()
    clf.score_prompts_sync([text], max_length=max_length)
    return (time.perf_counter() - began) * 1000.0


def timings(
    whole: OnnxClassifier, early: OnnxClassifier, texts: Sequence[str], max_length: int | None = None
) -> dict[str, Any]:
    """ms per pass, whole model against early exit, interleaved, one text at a time: p50 and mean, and the early
    exit's p50 over the texts that exit and those that go on. ``max_length``: a window's length (the window head),
    None for per-turn checks. The classifiers must cache nothing (``cache_size=0``)."""
    w: list[float] = []
    e: list[float] = []
    for i, text in enumerate(texts):
        pair = [(whole, w), (early, e)]
        for clf, out in pair if i % 2 else pair[::-1]:
            out.append(timed(clf, text, max_length))
    exited = [s.exited for s in early.score_prompts_sync(list(texts), max_length=max_length)]

    def p50(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 3) if xs else None

    return {
        "passes": len(texts),  # turns or windows, as the caller timed
        "exited": sum(exited),
        "whole_p50_ms": p50(w),
        "early_exit_p50_ms": p50(e),
        "ratio": round(statistics.median(e) / statistics.median(w), 3) if w else None,
        "whole_mean_ms": round(statistics.fmean(w), 3) if w else None,
        "early_exit_mean_ms": round(statistics.fmean(e), 3) if e else None,
        "exited_p50_ms": p50([t for t, x in zip(e, exited, strict=True) if x]),
        "went_on_p50_ms": p50([t for t, x in zip(e, exited, strict=True) if not x]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.early_exit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--runs", type=int, default=200, help="turns timed per kind (200)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    whole = OnnxClassifier.load(args.model, cache_size=0)
    early = OnnxClassifier.load(args.model, cache_size=0, early_exit=True)
    spec = early.early_exit
    assert spec is not None
    result: dict[str, Any] = {
        "model": str(args.model),
        "spec": {k: getattr(spec, k) for k in ("layer", "threshold", "harm_line", "jailbreak_line", "min_ids")},
        "verdicts": {},
    }
    files = sorted((PROJECT_ROOT / "bench").glob("challenge*/harm_challenge*.jsonl"))
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        result["verdicts"][path.parent.name] = verdicts(whole, early, rows)
        v = result["verdicts"][path.parent.name]
        print(f"  {path.parent.name:12s} {v['rows']:4d} prompts, {v['exited']:4d} exit "
              f"({v['exited_harmless']} of {v['harmless']} harmless), flags lost {v['flags_lost']} of "
              f"{v['flags_whole']} ({v['harmful_flags_lost']} harmful), strict line lost {v['strict_line_lost']}",
              file=sys.stderr, flush=True)  # fmt: skip
    rng = random.Random(7)
    bench_turns = [user_turn(rng, i, 64) for i in range(args.runs)]
    bench_rows = [{"prompt": t, "label": "benign"} for t in bench_turns]
    result["verdicts"]["bench_turns"] = verdicts(whole, early, bench_rows)
    harmful = [
        r["prompt"]
        for path in files
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("label") == "harmful" and len(r["prompt"]) > 120
    ]
    exits = [t for t, s in zip(bench_turns, early.score_prompts_sync(bench_turns), strict=True) if s.exited]
    long_harmful = random.Random(3).sample(harmful, min(len(harmful), args.runs))
    kinds = {
        "turns that exit (the bench's ordinary turns that do)": exits,
        "turns that go on (harmful asks over 120 characters)": long_harmful,
        "the bench's turn mix": [user_turn(rng, 10_000 + i, 64) for i in range(args.runs)],
    }
    for text in bench_turns[:20]:  # warm both sessions
        timed(whole, text), timed(early, text)
    result["timings"] = {}
    for kind, texts in kinds.items():
        # a text scored once is cached nowhere (cache_size 0), but vary it anyway so no layer below can reuse it
        result["timings"][kind] = t = timings(whole, early, [f"{x} ({i})" for i, x in enumerate(texts)])
        print(f"  {kind}: whole {t['whole_p50_ms']:.2f} ms, early exit {t['early_exit_p50_ms']:.2f} ms "
              f"(x{t['ratio']:.2f}), {t['exited']} of {t['passes']} exit", file=sys.stderr, flush=True)  # fmt: skip
    whole.close()
    early.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"JSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
