"""A harmful ask diluted in one pass: a short ask with a paragraph of harmless prose before or after it, in a user turn
the per-turn pass reads whole (at most the model's 256 ids).

The pass pools over the whole turn, so prose around a short ask dilutes it: on dev, 192 ids of prose before an ask
found half the asks that are found alone. Per-turn checks now also read such a turn in windows over its whole
length (``OnnxClassifier.prompt_windows``), a window's harm counting from ``WHOLE_TURN_WINDOW_LINE``. This measures,
on the model's calibration or dev split (the trainer's own splitter; dev rows were never trained on):

- the probe: each of ``ASKS`` short harmful asks of the split (label ``harmful``, at most 48 ids), and as many short
  harmless ones (the control), with ``PADDING`` ids of a long harmless text of the split before or after it: the
  share at the default policy's block line (0.5) for the pass alone and with windows counted from each line of a
  grid;
- natural prompts of the split that such windows read (65 to 254 ids), by source and label, the same way: what
  ordinary traffic of that length pays.

The line was chosen on the calibration split by a rule written before any window figure was read
(bench/RESULTS.md, "A harmful ask diluted in one pass").

    python -m bench.prompt_dilution --split dev --json bench/results/prompt_dilution_dev.json

``--cost`` measures instead what the windows cost: the median time of a turn of ``COST_IDS`` ids read by the pass
alone, by the pass and its windows (a turn whose pass reads ``WHOLE_TURN_WINDOW_GATE`` or more), and by a per-turn
check of this harmless turn (below the gate: the pass only), interleaved (one classifier thread, nothing cached).

    python -m bench.prompt_dilution --cost
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.trainer_rows import prompt_rows, trainer_rows
from guardproxy.classifier import PROMPT_WINDOW_IDS, WHOLE_TURN_WINDOW_GATE, WHOLE_TURN_WINDOW_LINE, OnnxClassifier
from guardproxy.normalize import normalize

ROOT = Path(__file__).resolve().parent.parent
LINE = 0.5  # policies/default.toml, block-harm
WINDOW_LINES = (0.7, 0.8, 0.9, 0.95)
SHORT_IDS = 48
ASKS = 120
PADDING = (64, 128, 192)
NATURAL_PER_GROUP = 200
LONG_CHARS = 1500  # a harmless row this long gives the padding
COST_IDS = (64, 96, 128, 192, 254)
COST_RUNS = 15
COST_TEXT = (
    "The history of railways began with wooden wagonways in the sixteenth century. Steam locomotives appeared in "
    "the early nineteenth century, and by 1850 Britain had thousands of miles of track. Railways changed trade, "
    "time zones and the shape of cities. "
) * 8


def cost(clf: OnnxClassifier) -> dict[str, Any]:
    """Median seconds of a per-turn check of a ``COST_IDS`` turn: the pass alone and with its windows."""
    text = normalize(COST_TEXT)
    offsets = clf._tokenizer.encode(text, add_special_tokens=False).offsets
    out: dict[str, Any] = {}
    for n in COST_IDS:
        turn = text[: offsets[n - 1][1]]
        windows = clf.prompt_windows(turn)
        times: dict[str, list[float]] = {"pass": [], "with_windows": [], "check": []}
        for _ in range(COST_RUNS):
            t0 = time.perf_counter()
            clf.score_prompts_sync([turn], max_length=clf.info.max_length)
            t1 = time.perf_counter()
            if windows:  # what a turn whose pass reads harm over WHOLE_TURN_WINDOW_GATE costs
                clf.score_prompts_sync(windows, max_length=clf.info.max_length)
            t2 = time.perf_counter()
            clf.score_prompts_sync([turn])  # the per-turn check of this harmless turn: below the gate, no windows
            t3 = time.perf_counter()
            times["pass"].append(t1 - t0)
            times["with_windows"].append(t2 - t0)
            times["check"].append(t3 - t2)
        out[str(n)] = {
            "windows": len(windows),
            **{f"{k}_ms": round(1000 * statistics.median(v), 2) for k, v in times.items()},
        }
        print(f"{n:4} ids: {out[str(n)]}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", default="dev", choices=("calibration", "dev"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cost", action="store_true", help="time the windows instead (no data read)")
    args = ap.parse_args(argv)
    if args.cost:
        _write(args.json, {"model": str(args.model), "cost": cost(OnnxClassifier.load(args.model, cache_size=0))})
        return 0
    examples = trainer_rows(args.model, args.data)
    rows = prompt_rows(examples, args.split)
    clf = OnnxClassifier.load(args.model, cache_size=0)  # the whole model: no early exit, nothing cached
    budget = clf.info.max_length - 2
    size = min(PROMPT_WINDOW_IDS, budget)

    def ids(text: str) -> int:
        return len(clf._tokenizer.encode(normalize(text), add_special_tokens=False).ids)

    started = time.perf_counter()

    def rates(texts: list[str], what: str) -> dict[str, Any]:
        passes = clf.score_prompts_sync(texts, max_length=clf.info.max_length)
        best = []
        for i, text in enumerate(texts):
            w = clf.prompt_windows(text)  # over the whole turn: these turns are read whole by the pass
            best.append(max((s.harm for s in clf.score_prompts_sync(w, max_length=clf.info.max_length)), default=0.0))
            if (i + 1) % 20 == 0 or i + 1 == len(texts):
                print(
                    f"\r  {what}: {i + 1}/{len(texts)}, {time.perf_counter() - started:.0f} s", end="", file=sys.stderr
                )
        print(file=sys.stderr)
        n = len(texts)
        return {
            "n": n,
            "pass": sum(p.harm >= LINE for p in passes) / n,
            "shipped": sum(  # the shipped line, windows read only where the pass reads the gate or more
                p.harm >= LINE or (p.harm >= WHOLE_TURN_WINDOW_GATE and b >= WHOLE_TURN_WINDOW_LINE)
                for p, b in zip(passes, best, strict=True)
            )
            / n,
            "windows_skipped": sum(p.harm < WHOLE_TURN_WINDOW_GATE for p in passes) / n,
            "at_window_line": {
                f"{line:.2f}": sum(p.harm >= LINE or b >= line for p, b in zip(passes, best, strict=True)) / n
                for line in WINDOW_LINES
            },
        }

    short = [e for e in rows if ids(e.text) <= SHORT_IDS]
    harmful = [e.text for e in short if e.label == "harmful" and e.harm >= 0.5]
    harmless = [e.text for e in short if e.harm < 0.5]
    long_texts = [normalize(e.text) for e in rows if e.harm < 0.5 and len(e.text) > LONG_CHARS]
    rng = random.Random(args.seed)
    asks = {
        "harmful": rng.sample(harmful, min(ASKS, len(harmful))),
        "harmless": rng.sample(harmless, min(ASKS, len(harmless))),
    }

    def cut(text: str, n: int) -> str:
        offsets = clf._tokenizer.encode(text, add_special_tokens=False).offsets
        return text[: offsets[min(n, len(offsets)) - 1][1]]

    probe: dict[str, Any] = {}
    for pad in PADDING:
        for where in ("before", "after"):
            for kind, chosen in asks.items():
                texts = []
                for ask in chosen:
                    prose = cut(rng.choice(long_texts), pad)
                    texts.append(f"{prose}\n\n{ask}" if where == "before" else f"{ask}\n\n{prose}")
                probe[f"{pad} ids {where}, {kind} ask"] = rates(texts, f"probe {pad} {where} {kind}")
    groups: dict[str, list[str]] = defaultdict(list)
    for e in rows:
        if size < ids(e.text) <= budget:
            groups[f"{e.source} / {e.label}"].append(e.text)
    natural = {
        name: rates(texts if len(texts) <= NATURAL_PER_GROUP else rng.sample(texts, NATURAL_PER_GROUP), name)
        for name, texts in sorted(groups.items())
    }
    report = {
        "model": str(args.model),
        "split": args.split,
        "line": LINE,
        "shipped_window_line": WHOLE_TURN_WINDOW_LINE,
        "shipped_window_gate": WHOLE_TURN_WINDOW_GATE,
        "padding_texts": len(long_texts),
        "probe": probe,
        "natural": natural,
    }
    print(
        f"{'rows':56} {'n':>5} {'pass':>7}  "
        + " ".join(f"w>={x:.2f}" for x in WINDOW_LINES)
        + f" {'shipped':>8} {'skipped':>8}"
    )
    for name, r in [*probe.items(), *natural.items()]:
        grid = " ".join(f"{v:7.1%}" for v in r["at_window_line"].values())
        print(f"{name:56} {r['n']:5} {r['pass']:7.1%}  {grid} {r['shipped']:8.1%} {r['windows_skipped']:8.1%}")
    _write(args.json, report)
    return 0


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
