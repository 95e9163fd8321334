"""Soak: 100k requests through the full guard, with the gateway's RSS and open descriptors sampled.

    .venv/bin/python -m bench.soak [--requests 100000] [--concurrency 8] [--json FILE] [--png FILE]

One FAKE upstream (whole reply at once, no delay) and one gateway process exactly as ``guardproxy serve`` runs it
(guard model, default policy, in-memory conversation state, SQLite drill store), driven with the bench's mix:
single turns and growing conversations (up to 8 user turns, then a new one), 30% streaming, every user turn new
text. RSS and open file descriptors of the gateway are sampled every ``--interval`` seconds.

Growth is measured from the end of warm-up (``--warmup-share`` of the requests, 10% by default: caches and
allocator pools fill there) to the end: the median of the samples in the last 2% of requests over the median
of the samples around the end of warm-up (medians, so one sample caught mid-GC does not decide it). The target
(issue 7/8) is < 5%. A JSON snapshot is rewritten every 30 s, so a soak stopped early still leaves its numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from guardproxy.benchmark.load import (
    Mix,
    MixSpec,
    Progress,
    Sample,
    Target,
    client_session,
    counter_diff,
    percentiles,
    run_pool,
    scrape,
    send,
)
from guardproxy.benchmark.procs import (
    GatewaySpec,
    Proc,
    ProcessSampler,
    ProcSample,
    cpu_seconds,
    start_fake_upstream,
    start_gateway,
)
from guardproxy.benchmark.run import machine_info
from guardproxy.settings import load_settings


def _median(samples: list[ProcSample], lo: int, hi: int) -> tuple[float | None, float | None]:
    window = [s for s in samples if lo <= s.requests <= hi]
    if not window:  # a short run: the first sample at or after ``lo``
        window = [s for s in samples if s.requests >= lo][:1]
    if not window:
        return None, None
    fds = [s.fds for s in window if s.fds is not None]
    return statistics.median(s.rss_mib for s in window), (statistics.median(fds) if fds else None)


def analyse(samples: list[ProcSample], total: int, warmup: int, statuses: dict[str, int], wall: float,
            latency: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    span = max(1, total // 50)
    done = max((s.requests for s in samples), default=0)
    warm_rss, warm_fds = _median(samples, max(0, warmup - span), warmup + span)
    end_rss, end_fds = _median(samples, max(warmup, done - span), done)
    growth = (end_rss / warm_rss - 1.0) * 100.0 if warm_rss and end_rss else None
    return {
        "requests_done": done,
        "requests_planned": total,
        "warmup_requests": warmup,
        "wall_s": wall,
        "throughput_rps": done / wall if wall else None,
        "statuses": statuses,
        "latency_ms": latency,
        "rss_first_mib": samples[0].rss_mib if samples else None,
        "rss_after_warmup_mib": warm_rss,
        "rss_end_mib": end_rss,
        "rss_max_mib": max((s.rss_mib for s in samples), default=None),
        "rss_growth_after_warmup_pct": growth,
        "fds_after_warmup": warm_fds,
        "fds_end": end_fds,
        "fds_max": max((s.fds for s in samples if s.fds is not None), default=None),
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="guardproxy-soak-"))
    model_dir = args.model or load_settings().guard.model_dir
    procs: list[Proc] = []
    machine = machine_info()
    progress = Progress(enabled=not args.quiet)
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    t0 = time.monotonic()
    try:
        up = await start_fake_upstream(workdir, ttft_ms=0.0, tokens_per_s=0.0, reply_words=60)
        procs.append(up)
        spec = GatewaySpec("soak", max_conversations=args.max_conversations)
        gw = await start_gateway(spec, workdir, upstream=up.base + "/v1", model_dir=model_dir,
                                 policy=args.policy, capacity=512)  # fmt: skip
        procs.append(gw)
        headers = {"content-type": "application/json", "authorization": "Bearer soak-not-a-real-key"}
        target = Target("guarded", gw.base + "/v1/chat/completions", headers)
        sampler = ProcessSampler({"gateway": gw.pid}, interval=args.interval)
        sampler.phase = "warm-up"
        sampler.start()
        warmup = int(args.requests * args.warmup_share)
        mixes = [Mix(MixSpec(), seed=w) for w in range(args.concurrency)]
        last_write = time.monotonic()

        def snapshot(final: bool) -> dict[str, Any]:
            lat = percentiles(latencies[-50_000:])
            out = {
                "machine": machine,
                "config": {
                    "requests": args.requests,
                    "concurrency": args.concurrency,
                    "interval_s": args.interval,
                    "warmup_share": args.warmup_share,
                    "model_dir": str(model_dir),
                    "policy": str(args.policy) if args.policy else None,
                    "final": final,
                    "max_seconds": args.max_seconds,
                    "max_conversations": args.max_conversations,
                },  # fmt: skip
                "result": analyse(
                    sampler.samples,
                    args.requests,
                    warmup,
                    dict(statuses),
                    time.monotonic() - t0,
                    lat.to_dict() if lat else None,
                ),  # fmt: skip
                "samples": [[round(s.t, 1), round(s.rss_mib, 2), s.fds, s.requests] for s in sampler.samples],
            }
            return out

        def on_sample(s: Sample) -> None:
            nonlocal last_write
            key = str(s.status) if not s.error else f"{s.status or 'conn'}:{s.error}"
            statuses[key] = statuses.get(key, 0) + 1
            if s.ok:
                latencies.append(s.total_ms)
            sampler.requests += 1
            if sampler.requests == warmup:
                sampler.phase = "soak"
            progress.tick(s.ok)
            if args.json and time.monotonic() - last_write > 30:
                last_write = time.monotonic()
                args.json.write_text(json.dumps(snapshot(False)) + "\n")

        async with client_session() as session:
            before = await scrape(session, gw.base)
            cpu0 = cpu_seconds(gw.pid)

            async def job(w: int, i: int) -> Sample:
                planned = mixes[w].next("guarded")
                sample, text = await send(session, target, planned, want_text=planned.conversation is not None,
                                          ttft_ms=0, fast=True)  # fmt: skip
                mixes[w].settle("guarded", planned, text)
                return sample

            progress.phase(f"soak c={args.concurrency}", args.requests)
            await run_pool(
                job, concurrency=args.concurrency, jobs=args.requests, seconds=args.max_seconds, on_sample=on_sample
            )
            progress.end()
            after = await scrape(session, gw.base)
            cpu1 = cpu_seconds(gw.pid)
        await sampler.stop()
        result = snapshot(True)
        result["counters"] = counter_diff(before, after, "guardproxy_")
        if cpu0 is not None and cpu1 is not None:
            result["result"]["cpu_ms_per_request"] = (cpu1 - cpu0) * 1000.0 / max(1, sampler.requests)
    finally:
        for p in reversed(procs):
            p.stop()
    return result


def render(out: dict[str, Any]) -> str:
    r = out["result"]

    def f(v: Any, d: int = 1) -> str:
        return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    lat = r["latency_ms"] or {}
    return "\n".join([
        f"soak: {r['requests_done']} requests at c={out['config']['concurrency']} in {f(r['wall_s'], 0)} s "
        f"({f(r['throughput_rps'])} req/s); statuses {r['statuses']}",
        f"latency p50 {f(lat.get('p50'))} ms, p99 {f(lat.get('p99'))} ms",
        f"RSS MiB: first {f(r['rss_first_mib'])}, after warm-up ({r['warmup_requests']} requests) "
        f"{f(r['rss_after_warmup_mib'])}, end {f(r['rss_end_mib'])}, max {f(r['rss_max_mib'])}; "
        f"growth after warm-up {f(r['rss_growth_after_warmup_pct'], 2)}% (target < 5%)",
        f"open fds: after warm-up {f(r['fds_after_warmup'])}, end {f(r['fds_end'])}, max {f(r['fds_max'])}; "
        f"gateway CPU {f(r.get('cpu_ms_per_request'), 2)} ms per request",
    ])  # fmt: skip


def write_png(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = out["samples"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot([s[3] for s in samples], [s[1] for s in samples], color="tab:blue", label="RSS")
    ax.axvline(out["result"]["warmup_requests"], color="gray", ls="--", label="end of warm-up")
    ax.set_xlabel("requests completed")
    ax.set_ylabel("gateway RSS, MiB", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([s[3] for s in samples], [s[2] for s in samples], color="tab:orange", label="open fds")
    ax2.set_ylabel("open file descriptors", color="tab:orange")
    ax.set_title(f"soak: gateway RSS and fds over {out['result']['requests_done']} requests")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples (2)")
    parser.add_argument("--warmup-share", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, help="stop sending after this long (the report says how many ran)")
    parser.add_argument("--model", type=Path, help="guard model directory (default models/guard-v1)")
    parser.add_argument("--policy", type=Path, help="active policy (default policies/default.toml)")
    parser.add_argument(
        "--max-conversations",
        type=int,
        default=None,
        help="the gateway's state.max_conversations (the bench strips GUARDPROXY_* from its children's environment)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..1000000 and --concurrency 1..256")
    out = asyncio.run(soak(args))
    print(render(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"JSON: {args.json}")
    if args.png:
        write_png(out, args.png)
        print(f"chart: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
