"""The project's published guard-latency numbers (bench/RESULTS.md, "Guard latency").

    .venv/bin/python -m bench.guard_latency [--model DIR] [--out bench/results] [--quick]

Runs ``guardproxy bench`` with the published configuration: the FAKE upstream with a 50 ms time to first token
and 500 tokens/s; targets ``direct`` (reference), ``passthrough`` (the gateway with no checks), ``guarded`` (the
guard model with the default policy, input check before the upstream call) and ``speculative`` (the same with
speculative forwarding), interleaved request by request; concurrency 1, 4 and 16 with 200 requests per level and
target; conversations grown to 100 turns (5 of them); a throughput sweep until saturation. Writes
``guard_latency.json`` and the charts to ``--out`` and prints the RESULTS.md section (a text block) to stdout.
``--quick`` is a one-minute smoke version of the same.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from guardproxy.benchmark.load import MixSpec
from guardproxy.benchmark.report import render, write_json, write_pngs
from guardproxy.benchmark.run import BenchConfig, run_bench
from guardproxy.settings import PROJECT_ROOT, load_settings


def published(model_dir: Path, quick: bool) -> BenchConfig:
    return BenchConfig(
        ttft_ms=50.0,
        tokens_per_s=500.0,
        reply_words=60,
        concurrency=(1, 4, 16),
        requests=20 if quick else 200,
        modes=("direct", "passthrough", "guarded", "speculative"),
        sweep=(1, 4, 16) if quick else None,
        sweep_seconds=1.0 if quick else 5.0,
        max_concurrency=256,
        lengths=(0, 1, 2, 5, 10) if quick else (0, 1, 2, 5, 10, 20, 50, 100),
        conversations=2 if quick else 5,
        model_dir=model_dir,
        warmup=5 if quick else 30,
        mix=MixSpec(),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="guard model directory (default models/guard-v1)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model_dir = args.model or load_settings().guard.model_dir
    result = asyncio.run(run_bench(published(model_dir, args.quick))).to_dict()
    result["config"]["workdir"] = None  # a temp dir: not worth publishing
    text = render(result)
    stem = "guard_latency_quick" if args.quick else "guard_latency"
    write_json(result, args.out / f"{stem}.json")
    charts = write_pngs(result, args.out / (stem + "_png"))
    command = ".venv/bin/python -m bench.guard_latency " + shlex.join(sys.argv[1:])
    print(f"Command: `{command.strip()}`\n")
    print("```text\n" + text + "\n```")
    print("\nCharts: " + ", ".join(str(p.relative_to(PROJECT_ROOT)) for p in charts if p.is_relative_to(PROJECT_ROOT)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
