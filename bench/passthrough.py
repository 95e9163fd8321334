"""Passthrough benchmark: the gateway with no checks against the same FAKE upstream directly.

    python -m bench.passthrough [--seconds 4] [--concurrency 1,16,64] [--transports aiohttp,httpx]

Starts the FAKE upstream and one gateway per upstream transport as separate processes on loopback
(uvloop + httptools), then drives each target with an aiohttp load generator (this process) at each
concurrency, plain JSON and streaming, interleaving direct and gateway runs in the same run. Reports
requests/s, p50/p99 latency (and time to first byte for streams) and the gateway/direct ratio. Progress
goes to stderr; results, with the machine described, replace the "Passthrough" section of
bench/RESULTS.md. Numbers, not pass/fail: on a 2-core machine the load generator, the gateway and the
fake upstream share the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Passthrough"
BODY = b'{"model":"fake-model","messages":[{"role":"user","content":"Say something short."}]}'
STREAM_BODY = b'{"model":"fake-model","stream":true,"messages":[{"role":"user","content":"Say something short."}]}'
# About 20 tokens: a short chat reply.
REPLY = "The quick brown fox jumps over the lazy dog while the cat watches from a sunny window ledge nearby."


@dataclass
class Run:
    target: str
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    ttfb: list[float]
    cpu_ms: float | None = None  # the target process's CPU time per request (user + system)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float, values: list[float] | None = None) -> float:
        vals = sorted(values if values is not None else self.latencies)
        if not vals:
            return float("nan")
        return vals[min(len(vals) - 1, int(q * len(vals)))] * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (independent of what else the machine runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve_upstream(port: int) -> None:
    """--role upstream: the FAKE upstream alone in this process."""
    import uvicorn

    from guardproxy.fake_upstream import FakeUpstream

    uvicorn.run(FakeUpstream(reply=REPLY, record=False), host="127.0.0.1", port=port, log_level="warning",
                loop="uvloop", http="httptools", lifespan="off", access_log=False)  # fmt: skip


def start_processes(transports: list[str]) -> tuple[list[subprocess.Popen[bytes]], str, dict[str, str]]:
    """The FAKE upstream and one gateway per transport; gateways map name -> URL (pids in ``procs``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up_port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.passthrough", "--role", "upstream", "--port", str(up_port)],
                              cwd=ROOT, env=env)]  # fmt: skip
    upstream = f"http://127.0.0.1:{up_port}"
    gateways: dict[str, str] = {}
    for transport in transports:
        port = free_port()
        genv = {**env, "GUARDPROXY_GUARD__ENABLED": "false", "GUARDPROXY_UPSTREAM__TRANSPORT": transport,
                "GUARDPROXY_SERVER__LOG_LEVEL": "warning"}  # fmt: skip
        cmd = [sys.executable, "-m", "guardproxy.cli", "serve", "--upstream", upstream + "/v1", "--port", str(port)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=genv))
        gateways[transport] = f"http://127.0.0.1:{port}"
    return procs, upstream, gateways


async def wait_ready(urls: list[str]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for url in urls:
            for _ in range(400):
                try:
                    async with session.get(url + "/v1/models") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"{url} did not come up")


async def drive(url: str, target: str, mode: str, concurrency: int, seconds: float) -> Run:
    import aiohttp

    body = STREAM_BODY if mode == "stream" else BODY
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    latencies: list[float] = []
    ttfb: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                    first = None
                    async for _ in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                    if r.status != 200:
                        errors += 1
                        return
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                ttfb.append((first or t1) - t0)
            except aiohttp.ClientError:
                errors += 1

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        # Warm-up: fill the pools, then measure.
        warm = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(warm) for _ in range(concurrency)))
        latencies.clear()
        ttfb.clear()
        errors = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return Run(target, mode, concurrency, len(latencies), errors, elapsed, latencies, ttfb)


def machine() -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, {platform.system()} "
            f"{platform.release()}; load generator, gateway and FAKE upstream on the same machine; load average "
            f"at the end of the run {load}")  # fmt: skip


def render(runs: list[Run], args: argparse.Namespace, transports: list[str]) -> str:
    lines = [
        SECTION,
        "",
        f"`python -m bench.passthrough --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--concurrency {args.concurrency} --transports {','.join(transports)}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Machine: {machine()}.",
        "",
        "Gateway with no checks (`guardproxy serve --no-guard`, uvloop + httptools) in front of the FAKE upstream",
        "(`guardproxy.fake_upstream`, ~20-token reply, no delay), each in its own process; `direct` is the same",
        "load against the FAKE upstream itself, measured in the same run. Latency is the whole response (for",
        "streams: through `[DONE]`); TTFB is the first body byte. `added p50` is gateway p50 minus direct p50.",
        "`CPU ms/req` is the CPU time (user + system, from /proc) the target process (the gateway, or the FAKE",
        "upstream for `direct`) spent per request, warm-up included: unlike latency it does not depend on what",
        "else the machine is running.",
        "",
        "| mode | c | target | req/s | p50 ms | p99 ms | TTFB p50 ms | added p50 ms | req/s vs direct "
        "| CPU ms/req | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct = {(r.mode, r.concurrency): r for r in runs if r.target == "direct"}
    for r in runs:
        d = direct[(r.mode, r.concurrency)]
        added = "" if r.target == "direct" else f"{r.pct(0.5) - d.pct(0.5):+.2f}"
        ratio = "" if r.target == "direct" else f"{r.rps / d.rps:.2f}"
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.target} | {r.rps:.0f} | {r.pct(0.5):.2f} | {r.pct(0.99):.2f} "
            f"| {r.pct(0.5, r.ttfb):.2f} | {added} | {ratio} | {r.cpu_ms:.3f} | {r.errors} |"
        )
    lines.append("")
    lines.extend(summary(runs, transports))
    return "\n".join(lines)


def summary(runs: list[Run], transports: list[str]) -> list[str]:
    """The transport choice and the issue's targets, computed from this run's numbers."""
    out: list[str] = []
    by = {(r.target, r.mode, r.concurrency): r for r in runs}
    levels = sorted({(r.mode, r.concurrency) for r in runs})
    if len(transports) > 1:
        wins: dict[str, int] = dict.fromkeys(transports, 0)
        for mode, c in levels:
            best = max(transports, key=lambda t: by[(f"gateway ({t})", mode, c)].rps)
            wins[best] += 1
        ranked = sorted(wins.items(), key=lambda kv: -kv[1])
        cheaper = dict.fromkeys(transports, 0)
        for mode, c in levels:
            best = min(transports, key=lambda t: by[(f"gateway ({t})", mode, c)].cpu_ms or float("inf"))
            cheaper[best] += 1
        out.append(
            f"Upstream transport: `{ranked[0][0]}` had the higher throughput in {ranked[0][1]} of {len(levels)} "
            "mode/concurrency cells (" + ", ".join(f"`{t}` {n}" for t, n in ranked) + ") and the lower CPU per "
            "request in " + ", ".join(f"`{t}` {n}" for t, n in cheaper.items()) + ". The gateway's default "
            '(`upstream.transport = "aiohttp"`) is httpx\'s API over `httpx_aiohttp.AiohttpTransport` with one '
            "`aiohttp.TCPConnector(limit=upstream.max_connections)` per process and no cookie jar."
        )
    t = transports[0]
    one = by.get((f"gateway ({t})", "plain", 1)), by.get(("direct", "plain", 1))
    if one[0] and one[1]:
        added = one[0].pct(0.5) - one[1].pct(0.5)
        out.append(f'Target "adds <= 1 ms p50 at c=1" (`{t}`, plain): measured {added:+.2f} ms.')
    c16 = by.get((f"gateway ({t})", "plain", 16))
    if c16:
        out.append(f'Target ">= 600 req/s JSON at c=16 on 2 cores" (`{t}`): measured {c16.rps:.0f} req/s.')
    out.append("")
    return out


def chart(runs: list[Run], path: Path) -> None:
    """req/s and p50 by concurrency, direct vs each gateway, plain and streaming."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, mode in enumerate(("plain", "stream")):
        for target in dict.fromkeys(r.target for r in runs):
            sel = [r for r in runs if r.mode == mode and r.target == target]
            xs = [r.concurrency for r in sel]
            axes[0][col].plot(xs, [r.rps for r in sel], marker="o", label=target)
            axes[1][col].plot(xs, [r.pct(0.5) for r in sel], marker="o", label=target)
        axes[0][col].set_title(f"{mode}: requests/s")
        axes[1][col].set_title(f"{mode}: p50 latency (ms)")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel("concurrency")
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("guardproxy passthrough (no checks) vs the FAKE upstream directly")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


async def bench(args: argparse.Namespace) -> list[Run]:
    transports = args.transports.split(",")
    procs, upstream, gateways = start_processes(transports)
    runs: list[Run] = []
    try:
        await wait_ready([upstream, *gateways.values()])
        levels = [int(c) for c in args.concurrency.split(",")]
        targets = [("direct", upstream, procs[0].pid)] + [
            (f"gateway ({t})", u, procs[i + 1].pid) for i, (t, u) in enumerate(gateways.items())
        ]
        total = 2 * len(levels) * len(targets) * args.rounds
        done = 0
        merged: dict[tuple[str, str, int], Run] = {}
        cpu: dict[tuple[str, str, int], float] = {}
        # Rounds interleave the targets, so a burst of load from elsewhere on the machine hits all of them.
        for rnd in range(args.rounds):
            for mode in ("plain", "stream"):
                for c in levels:
                    for name, url, pid in targets:
                        done += 1
                        log(f"[{done}/{total}] round {rnd + 1} {mode} c={c} {name} ...")
                        cpu0 = cpu_seconds(pid)
                        run = await drive(url, name, mode, c, args.seconds / args.rounds)
                        key = (name, mode, c)
                        # Includes the warm-up requests' CPU: a slight overestimate, the same for every target.
                        cpu[key] = cpu.get(key, 0.0) + cpu_seconds(pid) - cpu0
                        log(f"    {run.rps:.0f} req/s  p50 {run.pct(0.5):.2f} ms  p99 {run.pct(0.99):.2f} ms  "
                            f"errors {run.errors}")  # fmt: skip
                        if key in merged:
                            m = merged[key]
                            m.requests += run.requests
                            m.errors += run.errors
                            m.seconds += run.seconds
                            m.latencies += run.latencies
                            m.ttfb += run.ttfb
                        else:
                            merged[key] = run
        for key, run in merged.items():
            run.cpu_ms = cpu[key] * 1000 / max(1, run.requests)
        runs = [merged[(name, mode, c)] for mode in ("plain", "stream") for c in levels for name, _, _ in targets]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell (after warm-ups)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell (seconds split across them)")
    parser.add_argument("--transports", default="aiohttp,httpx", help="gateway upstream transports to compare")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave bench/RESULTS.md alone")
    parser.add_argument("--role", choices=["bench", "upstream"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "upstream":
        serve_upstream(args.port)
        return 0
    import uvloop

    runs = uvloop.run(bench(args))
    section = render(runs, args, args.transports.split(","))
    print(section)
    if not args.no_write:
        chart(runs, RESULTS.parent / "passthrough.png")
        write_section(section + "\n![passthrough](passthrough.png)\n")
        log(f"wrote the Passthrough section of {RESULTS} and bench/passthrough.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
