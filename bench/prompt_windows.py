"""Harm over a whole long user turn, not just its head and tail (``OnnxClassifier.prompt_windows``).

A per-turn pass reads the first 63 and the last 191 ids of a user turn (``guardproxy.encoding.encode_prompt``, a
256-id model): a harmful ask in the middle of a long harmless paste is never read. Per-turn checks now also score
overlapping windows of that middle and take a window's harm where it reaches ``PROMPT_WINDOW_LINE``. This measures
what that changes, on the model's dev split (rows it never trained on; the trainer's own splitter):

- for the prompt rows longer than the model reads, by source and label: harm >= the default policy's line (0.5,
  ``block-harm``) with the head+tail pass alone and as a per-turn check scores them (windows included);
- the same had windows counted from each line of a grid (how ``PROMPT_WINDOW_LINE`` was chosen, on the
  calibration split: ``--split calibration``);
- a constructed probe: each long harmless row of the split with a short harmful ask of the split put in the middle
  of the ids the pass skips (recall), and with a short harmless ask there instead (the control: false flags);
- windows per long prompt (each is one more pass), and the time a 1,000- and a 2,000-id user turn takes to score,
  with and without windows (one classifier thread, result cache off).

    python -m bench.prompt_windows --data ../shared/data --json bench/results/prompt_windows.json
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

from bench.trainer_rows import trainer_rows
from guardproxy.classifier import PROMPT_WINDOW_LINE, OnnxClassifier
from guardproxy.encoding import HEAD_FRACTION
from guardproxy.normalize import normalize

ROOT = Path(__file__).resolve().parent.parent
LINE = 0.5  # policies/default.toml, block-harm
WINDOW_LINES = (0.5, 0.6, 0.7, 0.8, 0.9)
SHORT_IDS = 48  # an ask for the probe: at most this many ids
ASKS_PER_TEXT = 3  # harmful asks (and as many harmless ones) put into each long harmless text
COST_IDS = (1000, 2000)
COST_RUNS = 5


def _rows(examples: list[Any], split: str) -> list[Any]:
    """The split's prompt rows: no reply pairs, no conversation windows (the per-turn check never reads those)."""
    return [
        e
        for e in examples
        if e.split == split and not e.pair and e.newest is None and not e.text.startswith(("user: ", "assistant: "))
    ]


def _in_middle(clf: OnnxClassifier, text: str, ask: str) -> str:
    """``text`` with ``ask`` put at a word boundary in the middle of the ids the head+tail pass skips."""
    text = normalize(text)
    offsets = clf._tokenizer.encode(text, add_special_tokens=False).offsets
    budget = clf.info.max_length - 2
    head = int(budget * HEAD_FRACTION)
    at = offsets[(head + len(offsets) - (budget - head)) // 2][0]
    at = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at)) + 1
    return f"{text[:at]}{ask} {text[at:]}"


def _flag_rates(pairs: list[tuple[float, float, list[float]]]) -> dict[str, Any]:
    """(head+tail harm, served harm, window harms) per text: the share flagged at ``LINE`` each way and per line."""
    n = len(pairs)
    return {
        "n": n,
        "head_tail": sum(h >= LINE for h, _, _ in pairs) / n,
        "with_windows": sum(w >= LINE for _, w, _ in pairs) / n,
        "at_window_line": {
            f"{line:.2f}": sum(h >= LINE or max(ws, default=0.0) >= line for h, _, ws in pairs) / n
            for line in WINDOW_LINES
        },
    }


def _score(clf: OnnxClassifier, text: str) -> tuple[float, float, list[float], int]:
    """(head+tail harm, harm as a per-turn check scores it, the windows' harms, windows)."""
    length = clf.info.max_length
    (head,) = clf.score_prompts_sync([text], max_length=length)  # a call that names its length reads no windows
    windows = clf.prompt_windows(text)
    window_harms = [s.harm for s in clf.score_prompts_sync(windows, max_length=length)] if windows else []
    (served,) = clf.score_prompts_sync([text])
    return head.harm, served.harm, window_harms, len(windows)


def _text_of(clf: OnnxClassifier, texts: list[str], ids: int) -> str:
    """Harmless long texts joined and cut at ``ids`` ids."""
    text = normalize("\n\n".join(texts))
    offsets = clf._tokenizer.encode(text, add_special_tokens=False).offsets
    if len(offsets) < ids:
        raise SystemExit(f"the split's long harmless texts hold {len(offsets)} ids, fewer than {ids}")
    return text[: offsets[ids - 1][1]]


def _cost(clf: OnnxClassifier, texts: list[str]) -> dict[str, Any]:
    """Median seconds of ``COST_RUNS`` scorings of a ``COST_IDS`` user turn: head+tail only and with windows."""
    out: dict[str, Any] = {}
    for ids in COST_IDS:
        text = _text_of(clf, texts, ids)
        times: dict[str, list[float]] = {"head_tail": [], "with_windows": []}
        for _ in range(COST_RUNS):
            for kind, length in (("head_tail", clf.info.max_length), ("with_windows", None)):
                t0 = time.perf_counter()
                clf.score_prompts_sync([text], max_length=length)
                times[kind].append(time.perf_counter() - t0)
        out[str(ids)] = {
            "windows": len(clf.prompt_windows(text)),
            **{f"{k}_s": round(statistics.median(v), 4) for k, v in times.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    examples = trainer_rows(args.model, args.data)
    seed = int(json.loads((args.model / "config.json").read_text(encoding="utf-8")).get("data", {}).get("seed", 0))
    rows = _rows(examples, args.split)
    clf = OnnxClassifier.load(args.model, cache_size=0)  # the whole model: no early exit, nothing cached
    budget = clf.info.max_length - 2

    def ids(text: str) -> int:
        return len(clf._tokenizer.encode(normalize(text), add_special_tokens=False).ids)

    long_rows = [e for e in rows if len(e.text) > budget and ids(e.text) > budget]
    short = [e for e in rows if e.harm is not None and ids(e.text) <= SHORT_IDS]
    harmful_asks = [e.text for e in short if e.harm >= 0.5]
    harmless_asks = [e.text for e in short if e.harm < 0.5]
    long_harmless = [e.text for e in long_rows if e.harm is not None and e.harm < 0.5]
    started = time.perf_counter()

    def progress(what: str, i: int, n: int) -> None:
        if (i + 1) % 10 == 0 or i + 1 == n:
            print(f"\r  {what} {i + 1}/{n}, {time.perf_counter() - started:.0f} s", end="", file=sys.stderr)
            if i + 1 == n:
                print(file=sys.stderr)

    by_group: dict[tuple[str, str], list[tuple[float, float, list[float]]]] = defaultdict(list)
    windows_per_prompt: list[int] = []
    for i, e in enumerate(long_rows):
        head, served, window_harms, n_windows = _score(clf, e.text)
        by_group[(e.source, e.label)].append((head, served, window_harms))
        windows_per_prompt.append(n_windows)
        progress("long prompts", i, len(long_rows))

    rng = random.Random(seed)
    probe: dict[str, list[tuple[float, float, list[float]]]] = {"harmful_ask": [], "harmless_ask": []}
    plan = [
        (kind, text, ask)
        for text in long_harmless
        for kind, asks in (("harmful_ask", harmful_asks), ("harmless_ask", harmless_asks))
        for ask in rng.sample(asks, min(ASKS_PER_TEXT, len(asks)))
    ]
    for i, (kind, text, ask) in enumerate(plan):
        head, served, window_harms, _ = _score(clf, _in_middle(clf, text, ask))
        probe[kind].append((head, served, window_harms))
        progress("probe", i, len(plan))

    # what the model reads in the asks on their own: where a window reading an ask in its middle can get to
    alone = {
        kind: sum(s.harm >= LINE for s in clf.score_prompts_sync(sorted({a for k, _, a in plan if k == kind})))
        / len({a for k, _, a in plan if k == kind})
        for kind in probe
        if probe[kind]
    }
    report: dict[str, Any] = {
        "model": str(args.model),
        "split": args.split,
        "line": LINE,
        "window_line": PROMPT_WINDOW_LINE,
        "long_prompts": len(long_rows),
        "windows_per_prompt": {
            "mean": statistics.fmean(windows_per_prompt) if windows_per_prompt else 0.0,
            "max": max(windows_per_prompt, default=0),
        },
        "sources": {f"{source} / {label}": _flag_rates(pairs) for (source, label), pairs in sorted(by_group.items())},
        "probe": {
            "long_texts": len(long_harmless),
            "asks": {"harmful": len(harmful_asks), "harmless": len(harmless_asks)},
            **{kind: {**_flag_rates(pairs), "ask_alone": alone[kind]} for kind, pairs in probe.items() if pairs},
        },
    }
    print(f"{'rows':48} {'n':>5} {'head+tail':>10} {'windows':>8}  " + " ".join(f"w>={x:.1f}" for x in WINDOW_LINES))
    lines = [
        *report["sources"].items(),
        *((f"probe: {k}", v) for k, v in report["probe"].items() if isinstance(v, dict) and "n" in v),
    ]
    for name, r in lines:
        grid = " ".join(f"{v:6.1%}" for v in r["at_window_line"].values())
        print(f"{name:48} {r['n']:5} {r['head_tail']:10.1%} {r['with_windows']:8.1%}  {grid}")
    for kind, share in alone.items():
        print(f"probe: {kind}, the asks alone (each once): {share:.1%} flagged")
    wpp = report["windows_per_prompt"]
    print(f"windows per long prompt: mean {wpp['mean']:.1f}, max {wpp['max']}")
    if long_harmless:
        report["cost"] = _cost(clf, long_harmless)
        for n_ids, c in report["cost"].items():
            print(
                f"a {n_ids}-id user turn: {c['head_tail_s'] * 1000:.0f} ms head+tail, "
                f"{c['with_windows_s'] * 1000:.0f} ms with its {c['windows']} windows"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
