"""Would a harm line of its own for text in other languages, set on the calibration split, serve the challenge sets?

    .venv/bin/python -m bench.own_line_other_languages --model DIR [--model DIR ...] [--data ../shared/data]
        [--calibrate-on FILE ...] [--miss R ...] [--json OUT]

One line, calibrated on English-heavy rows, sets every language's operating point; candidate 2.28.0 showed that the
other languages then sit wherever the training labels' language cue puts them (`bench/results/candidates/README.md`).
This asks whether a second line would do better. For each model and each miss rate R it takes the highest harm score
that misses at most R of the calibration split's harmful prompts in other languages (the authored rows' `language`
field; split seed 0, as the shipped recipe), then reports what that line flags of the calibration split's harmless
prompts in other languages and of the three multilingual challenge sets pooled (challenge4, 9, 10; never trained
on). With ``--calibrate-on`` the line is set on those files' prompts in other languages instead. It assumes the
language is known. The gateway has no language signal today. Prints, never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.candidate_compare import prompt_records, set_metrics
from guardproxy.settings import PROJECT_ROOT

CHALLENGE_SETS = tuple(
    PROJECT_ROOT / "bench" / d / f"harm_{d}.jsonl" for d in ("challenge4", "challenge9", "challenge10")
)


def calibration_rows(data: Path) -> list[dict[str, str]]:
    """The calibration split's single prompts in languages other than English, with a hard harm label."""
    from guardproxy.training.augment import language_of
    from guardproxy.training.sources import load_all
    from guardproxy.training.splits import assign_splits

    examples = load_all(data, authored=True, seed=0, chat_turns=True)
    assign_splits(examples, 0)
    return [
        {"id": f"cal-{i}", "prompt": e.text, "label": "harmful" if e.harm == 1.0 else "benign"}
        for i, e in enumerate(examples)
        if e.split == "calibration"
        and e.reply is None
        and e.newest is None
        and e.harm in (0.0, 1.0)
        and language_of(e) != "en"
    ]


def file_rows(paths: Sequence[Path]) -> list[dict[str, str]]:
    """The harmful and harmless prompts of ``paths`` that are not in English."""
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    return [
        {"id": r["id"], "prompt": r["prompt"], "label": r["label"]}
        for r in rows
        if r.get("language", "en") != "en" and r["label"] in ("harmful", "benign")
    ]


def own_line(harmful: np.ndarray, miss: float) -> float:
    """The highest score that leaves at most ``miss`` of ``harmful`` below it."""
    return float(np.sort(harmful)[int(np.floor(miss * len(harmful)))])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.own_line_other_languages", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", type=Path, action="append", required=True, help="a model directory (repeatable)")
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--calibrate-on",
        type=Path,
        nargs="+",
        help="set the line on these prompt files (rows with a `language` other than English) instead of the "
        "calibration split, e.g. the held authored batches in other languages (never trained on)",
    )
    parser.add_argument("--miss", type=float, nargs="+", default=[39 / 284, 0.2, 0.25])
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    rows = calibration_rows(args.data) if not args.calibrate_on else file_rows(args.calibrate_on)
    n_bad = sum(r["label"] == "harmful" for r in rows)
    where = "calibration split" if not args.calibrate_on else ", ".join(p.name for p in args.calibrate_on)
    print(f"{where}, prompts in other languages: {n_bad} harmful, {len(rows) - n_bad} harmless", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cal_path = Path(tmp) / "calibration_other_languages.jsonl"
        cal_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        challenge_path = Path(tmp) / "multilingual_pooled.jsonl"
        challenge_path.write_text("".join(p.read_text() for p in CHALLENGE_SETS))
        out: list[dict[str, Any]] = []
        for model in args.model:
            cal = set_metrics(prompt_records(model, cal_path))
            challenge = set_metrics(prompt_records(model, challenge_path))
            for miss in args.miss:
                t = own_line(cal["_pos"], miss)
                row = {
                    "model": str(model),
                    "miss": miss,
                    "line": t,
                    "calibration_harmless_flagged": float(np.mean(cal["_neg"] >= t)),
                    "challenge_harmful_flagged": float(np.mean(challenge["_pos"] >= t)),
                    "challenge_harmless_flagged": float(np.mean(challenge["_neg"] >= t)),
                }
                out.append(row)
                print(
                    f"{model}: miss <= {miss:.3f}: line {t:.3f} (operating scale; the one line is 0.5); calibration "
                    f"harmless flagged {row['calibration_harmless_flagged']:.1%}; challenge sets' harmful / harmless "
                    f"flagged {row['challenge_harmful_flagged']:.1%} / {row['challenge_harmless_flagged']:.1%}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"calibrated_on": where, "rows": {"harmful": n_bad, "harmless": len(rows) - n_bad}, "lines": out},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
