"""The harm line a candidate rule names, read off a finished run: ``python -m bench.rule_line METRICS.json...``.

Since 2.25.1 the rules in ``bench/results/candidates/README.md`` set each seed's harm line as the highest threshold
at which the calibration split's harmful groups miss no more than the shipped model's rows did, counted without
the sources a rule names (a new batch of easy asks would otherwise let the line rise)::

    python -m bench.rule_line /tmp/cand/metrics.json --leave-out authored/prompts_identity15 \\
        --leave-out-if-present authored/responses_quiet17 \\
        --max-miss harmful_authored=39/284 --max-miss harmful_public=22/269

It reads the curve the trainer keeps in ``metrics.json`` (``harm_calibration_curve``), so nothing is scored again:
``curve_without`` and ``highest_line_within`` from ``guardproxy.training.calibration``. Per file it prints the line
and, per named group, the rows kept and how many of them the line misses, so a rule's "the groups must hold 284 and
269 rows" is checked in the same look. ``--json`` writes the same. A limit of ``k/n`` is a miss rate (k of n rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

from guardproxy.training.calibration import curve_without, highest_line_within


def _limit(text: str) -> tuple[str, float]:
    group, sep, value = text.partition("=")
    if not sep or not group:
        raise argparse.ArgumentTypeError(f"expected GROUP=RATE or GROUP=K/N, got {text!r}")
    try:
        rate = float(Fraction(value))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{group}: {value!r} is not a rate (0.14) or a count (39/284)") from None
    return group, rate


def rule_line(
    metrics: dict[str, Any], leave_out: list[str], if_present: list[str], max_miss: dict[str, float]
) -> dict[str, Any]:
    """The line and, per limited group, the rows kept and the rows missed at it (raises KeyError on a source or
    group the curve lacks)."""
    curve = metrics["harm_calibration_curve"]
    per_source = curve["harmful_sources"]
    dropped = leave_out + [s for s in if_present if s in per_source and s not in leave_out]
    kept_curve = curve_without(curve, dropped)
    # Limits are miss rates, so only the harmful groups (those with per-source counts) can carry one.
    missing = sorted(set(max_miss) - {v["group"] for v in per_source.values()})
    if missing:
        raise KeyError(f"no harmful calibration group {', '.join(missing)}")
    line = highest_line_within(kept_curve, max_miss)
    groups: dict[str, Any] = {}
    for group in max_miss:
        kept = [v for s, v in per_source.items() if v["group"] == group and s not in dropped]
        row: dict[str, Any] = {"rows": sum(v["n"] for v in kept), "limit": max_miss[group]}
        if line is not None:
            i = curve["grid"].index(line)
            row["missed"] = sum(v["missed"][i] for v in kept)
        groups[group] = row
    return {"line": line, "left_out": dropped, "groups": groups}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rule_line", description=__doc__.split("\n")[0])
    ap.add_argument("metrics", nargs="+", type=Path, help="a run's metrics.json")
    ap.add_argument("--leave-out", action="append", default=[], metavar="SOURCE", help="a harmful source not counted")
    ap.add_argument(
        "--leave-out-if-present",
        action="append",
        default=[],
        metavar="SOURCE",
        help="left out where the curve has it (a batch whose asks may or may not enter the harm curve)",
    )
    ap.add_argument(
        "--max-miss", action="append", type=_limit, required=True, metavar="GROUP=K/N", help="a group's miss limit"
    )
    ap.add_argument("--json", type=Path, help="write the lines here as well")
    args = ap.parse_args(argv)
    limits = dict(args.max_miss)
    out: dict[str, Any] = {}
    for path in args.metrics:
        try:
            metrics = json.loads(path.read_text())
            res = rule_line(metrics, args.leave_out, args.leave_out_if_present, limits)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"bench.rule_line: {path}: {exc}", file=sys.stderr)
            return 2
        except (KeyError, TypeError) as exc:
            what = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"bench.rule_line: {path}: {what} (not a trainer's metrics.json with a harm curve?)", file=sys.stderr)
            return 2
        out[str(path)] = res
        line = "none holds" if res["line"] is None else f"{res['line']:.2f}"
        parts = [
            f"{g} {r['missed']} of {r['rows']} missed" if "missed" in r else f"{g} {r['rows']} rows"
            for g, r in res["groups"].items()
        ]
        print(f"{path}: line {line}; " + "; ".join(parts) + f" (left out: {', '.join(res['left_out']) or 'none'})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
