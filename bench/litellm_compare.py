"""guardproxy beside LiteLLM's proxy, on the same FAKE upstream, in the same run.

    .venv/bin/python -m bench.litellm_compare [--concurrency 16] [--seconds 10] [--rounds 2] [--json FILE]

Targets, all on loopback against one FAKE upstream process (whole reply at once, no delay, so the proxies' CPU is
what limits them): ``direct`` (the upstream itself), ``litellm`` (LiteLLM's proxy, no guard, no callbacks),
``passthrough`` (guardproxy with no checks), ``guarded`` (guardproxy with the whole guard model and the default
policy: every request scores a new ~64-token user turn and the reply) and ``input-only`` (the same with
``guard.output_checks = false``: the user turn only, the configuration issue 7's throughput target names); both
set ``guard.early_exit = false``. With ``--early-exit`` also ``input-only-exit`` (the same with early exit, the
gateway's default: a turn the model's first layers already find clearly harmless skips the rest,
``guardproxy.early_exit``; the bench's turns are all ordinary asks).
``--refusals N`` has each guarded gateway block N plainly harmful asks before the runs, so the one tenant has
refused requests in memory, as a busy shared key does.
Each round gives every target the same number of seconds at each concurrency level, in rotating order, so a
shared machine's load drift is spread across them. Requests are plain (non-streaming) single-turn chat completions.

LiteLLM lives in its own virtual environment, never in guardproxy's (see bench/RESULTS.md for the exact setup)::

    python3.11 -m venv /tmp/litellm-venv
    /tmp/litellm-venv/bin/pip install 'litellm[proxy]==1.108.7'

It runs offline: ``LITELLM_TELEMETRY_DISABLED=true``, ``LITELLM_LOCAL_MODEL_COST_MAP=True``, no callbacks, a master
key. Without that venv (``--litellm-venv`` or ``$LITELLM_VENV``; default /tmp/litellm-venv) the script says so
and runs the other targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from guardproxy.benchmark.load import (
    Mix,
    MixSpec,
    Progress,
    Sample,
    Target,
    client_session,
    early_exits,
    percentiles,
    rephrase_deferred,
    run_pool,
    scrape,
    seed_refusals,
    send,
)
from guardproxy.benchmark.procs import (
    LOOPBACK,
    GatewaySpec,
    Proc,
    free_port,
    spawn,
    start_fake_upstream,
    start_gateway,
    tree_cpu_seconds,
    wait_ready,
)
from guardproxy.benchmark.run import machine_info
from guardproxy.settings import load_settings

MASTER_KEY = "sk-litellm-bench-master"  # a local, throwaway key for a loopback proxy


def litellm_config(upstream: str) -> str:
    return f"""model_list:
  - model_name: fake-model
    litellm_params:
      model: openai/fake-model
      api_base: {upstream}
      api_key: not-a-real-key
litellm_settings:
  telemetry: false
  callbacks: []
  success_callback: []
  failure_callback: []
  drop_params: true
general_settings:
  master_key: {MASTER_KEY}
"""


def litellm_missing(venv: Path) -> str | None:
    """Why LiteLLM cannot run from ``venv``, in words for the report; None when it can."""
    if (venv / "bin" / "litellm").is_file():
        return None
    return (
        f"LiteLLM is not installed at {venv} (no bin/litellm), so its row is missing. Install it in a separate venv: "
        f"python3.11 -m venv {venv} && {venv}/bin/pip install 'litellm[proxy]==1.108.7' (see bench/RESULTS.md)."
    )


def litellm_version(venv: Path) -> str | None:
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
                              "print(m.version('litellm'))"], capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


async def start_litellm(venv: Path, workdir: Path, upstream: str) -> Proc:
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(litellm_config(upstream))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "OPENAI"))}
    env.update(LITELLM_TELEMETRY_DISABLED="true", LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1")
    argv = [str(venv / "bin" / "litellm"), "--config", str(cfg), "--host", LOOPBACK, "--port", str(port),
            "--num_workers", "1"]  # fmt: skip
    proc = spawn("litellm", argv, workdir, port, cfg, env)
    try:
        await wait_ready(proc, "/health/liveliness", 180.0)
    except BaseException:
        proc.stop()
        raise
    return proc


async def drive(
    target: Target, concurrency: int, seconds: float, seed: int, progress: Progress | None = None
) -> tuple[list[Sample], float]:
    """``concurrency`` workers on one target for ``seconds``; the samples and the wall time (in-flight included)."""
    spec = MixSpec(stream_share=0.0, conversation_share=0.0)
    mixes = [Mix(spec, seed + w) for w in range(concurrency)]
    async with client_session() as session:

        async def job(w: int, i: int) -> Sample:
            sample, _ = await send(session, target, mixes[w].next(target.name), want_text=False, ttft_ms=0, fast=True)
            return sample

        on_sample = (lambda s: progress.tick(s.ok)) if progress is not None else None
        return await run_pool(job, concurrency=concurrency, jobs=None, seconds=seconds, on_sample=on_sample)


def summarize(samples: list[Sample], seconds: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    lat = percentiles(s.total_ms for s in ok)
    over = percentiles(s.overhead_ms for s in ok if s.overhead_ms is not None)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "not_ok": len(samples) - len(ok),
        "seconds": seconds,
        "throughput_rps": len(ok) / seconds,
        "latency_ms": lat.to_dict() if lat else None,
        "overhead_ms": over.to_dict() if over else None,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="guardproxy-litellm-"))
    venv = Path(args.litellm_venv)
    missing = litellm_missing(venv)
    has_litellm = missing is None
    version = await asyncio.to_thread(litellm_version, venv) if has_litellm else None
    procs: list[Proc] = []
    notes: list[str] = []
    progress = Progress(enabled=not args.quiet)
    try:
        up = await start_fake_upstream(workdir, ttft_ms=0.0, tokens_per_s=0.0, reply_words=60)
        procs.append(up)
        upstream = up.base + "/v1"
        headers = {"content-type": "application/json", "authorization": "Bearer bench-not-a-real-key"}
        targets = [Target("direct", upstream + "/chat/completions", headers)]
        if has_litellm:
            print(f"starting LiteLLM from {venv} ...", file=sys.stderr, flush=True)
            ll = await start_litellm(venv, workdir, upstream)
            procs.append(ll)
            targets.append(Target("litellm", ll.base + "/v1/chat/completions",
                                  {**headers, "authorization": f"Bearer {MASTER_KEY}"}))  # fmt: skip
        else:
            assert missing is not None
            notes.append(missing)
            print("NOTE: " + missing, file=sys.stderr)
        model_dir = args.model or load_settings().guard.model_dir
        specs = (
            GatewaySpec("passthrough", guard=False),
            GatewaySpec("guarded", workers=args.workers, early_exit=False),
            GatewaySpec("input-only", output_checks=False, workers=args.workers, early_exit=False),
        )
        if args.early_exit:
            specs += (GatewaySpec("input-only-exit", output_checks=False, workers=args.workers, early_exit=True),)
        for spec in specs:
            name = spec.name
            print(f"starting guardproxy '{name}' ...", file=sys.stderr, flush=True)
            gw = await start_gateway(spec, workdir, upstream=upstream, model_dir=model_dir, policy=None, capacity=512)
            procs.append(gw)
            targets.append(Target(name, gw.base + "/v1/chat/completions", headers))
        pids = {
            "direct": up.pid,
            **{p.name: p.pid for p in procs if p.name in ("litellm", *(spec.name for spec in specs))},
        }
        # warm-up: every target, briefly
        for t in targets:
            await drive(t, 2, 1.5, seed=1)
        if args.refusals:
            for t in targets:
                if t.name in ("direct", "litellm", "passthrough"):
                    continue
                async with client_session() as session:
                    blocked = await seed_refusals(session, t, args.refusals)
                notes.append(f"{t.name}: {blocked} of {args.refusals} --refusals asks blocked before the runs")
        results: dict[tuple[str, int], list[Sample]] = {}
        seconds: dict[tuple[str, int], float] = {}
        cpu: dict[tuple[str, int], float] = {}
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for c in args.concurrency:
                for t in order:
                    progress.phase(f"round {rnd + 1}/{args.rounds} c={c} {t.name}", None)
                    cpu0 = tree_cpu_seconds(pids[t.name])
                    samples, wall = await drive(t, c, args.seconds, seed=100 * rnd + c, progress=progress)
                    cpu1 = tree_cpu_seconds(pids[t.name])
                    key = (t.name, c)
                    results.setdefault(key, []).extend(samples)
                    seconds[key] = seconds.get(key, 0.0) + wall
                    if cpu0 is not None and cpu1 is not None:
                        cpu[key] = cpu.get(key, 0.0) + cpu1 - cpu0
        progress.end()
        exits = None
        if args.early_exit:
            gw = next(p for p in procs if p.name == "input-only-exit")
            async with client_session() as session:
                counters = (await scrape(session, gw.base)).counters
            exited, went_on = early_exits(counters)
            lower_bound, whole_model = rephrase_deferred(counters)
            answered = counters.get("guardproxy_requests_total|route=/v1/chat/completions|status=200", 0.0)
            exits = {
                "exited": exited,
                "went_on": went_on,
                "requests": int(answered),
                "rephrase_lower_bound": lower_bound,
                "rephrase_whole_model": whole_model,
            }
            # Requests (warm-up and --refusals asks included) beyond exited + went_on had no per-turn check on the
            # exit path: a turn answered from the score cache.
            notes.append(
                f"input-only-exit: {exited} turns exited and {went_on} went on of {exits['requests']} requests; "
                f"with refusals in memory, {lower_bound} requests' exited turns kept a lower bound of rephrase "
                f"similarity and {whole_model} then ran the whole model for it"
            )
        rows = []
        for (name, c), samples in results.items():
            row = {"target": name, "concurrency": c, **summarize(samples, seconds[(name, c)])}
            spent = cpu.get((name, c))
            # direct: the FAKE upstream's own CPU; the others: the proxy's (the upstream's comes on top)
            row["cpu_ms_per_request"] = spent * 1000.0 / len(samples) if spent is not None and samples else None
            rows.append(row)
    finally:
        for p in reversed(procs):
            p.stop()
    return {
        "machine": machine_info(),
        "litellm": {"installed": has_litellm, "venv": str(venv), "version": version},
        "config": {
            "concurrency": list(args.concurrency),
            "seconds": args.seconds,
            "rounds": args.rounds,
            "model_dir": str(args.model or load_settings().guard.model_dir),
            "workers": args.workers,
            "early_exit": args.early_exit,
            "refusals": args.refusals,
        },  # fmt: skip
        "rows": rows,
        "early_exit_counts": exits,
        "notes": notes,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = ("c", "target", "req/s", "ok", "not ok", "p50 ms", "p99 ms", "vs litellm", "CPU ms/req")
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, loadavg {m['loadavg_at_start']}",
             "{:>4} {:>15} {:>8} {:>7} {:>6} {:>8} {:>8} {:>10} {:>10}".format(*head)]  # fmt: skip
    by = {(r["target"], r["concurrency"]): r for r in result["rows"]}
    for r in sorted(result["rows"], key=lambda r: (r["concurrency"], r["target"])):
        ll = by.get(("litellm", r["concurrency"]))
        ratio = f"{r['throughput_rps'] / ll['throughput_rps']:.1f}x" if ll and ll["throughput_rps"] else "-"
        lat = r["latency_ms"] or {}
        lines.append(f"{r['concurrency']:>4} {r['target']:>15} {r['throughput_rps']:>8.1f} {r['ok']:>7} "
                     f"{r['not_ok']:>6} {lat.get('p50', float('nan')):>8.1f} {lat.get('p99', float('nan')):>8.1f} "
                     f"{ratio:>10} {_ms(r.get('cpu_ms_per_request')):>10}")  # fmt: skip
    lines.append("CPU ms/req: the proxy process's own CPU per request (for direct: the FAKE upstream's), from /proc")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per target, level and round (10)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--litellm-venv", default=os.environ.get("LITELLM_VENV", "/tmp/litellm-venv"))
    parser.add_argument("--model", type=Path, help="guard model directory (default models/guard-v1)")
    parser.add_argument(
        "--workers", type=int, help="the guarded gateways' guard.workers (default: the setting's, min(2, usable cores))"
    )
    parser.add_argument(
        "--early-exit",
        action="store_true",
        help="also an input-checked gateway with guard.early_exit (the model directory's early_exit.json)",
    )
    parser.add_argument(
        "--refusals",
        type=int,
        default=0,
        help="before the runs, have each guarded gateway block N plainly harmful asks, so the bench's tenant has "
        "refused requests in memory, as a busy shared key does (0)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
