"""Drill store numbers: the request-path cost of ``DrillRecorder.submit``, the writer's throughput into SQLite
and PostgreSQL, and the review page's latency over a store of N drills. Prints numbers; never pass/fail.

    .venv/bin/python -m bench.drills_store [--drills 10000] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from starlette.applications import Starlette

from guardproxy.drills.record import DrillRecord, PolicyDecision
from guardproxy.drills.recorder import DrillRecorder
from guardproxy.drills.review import review_routes
from guardproxy.drills.sampling import Sampler, SamplingConfig
from guardproxy.drills.store import DrillStore, open_store
from guardproxy.settings import Settings
from tests.servers import serve

TOKEN = "bench-token"
TEXT = (
    "I'm writing a mystery novel and need the detective to explain, in some detail, how the poisoner avoided "
    "detection; contact me at writer@example.com or +44 20 7946 0958. "
) * 6  # ~1.4 kB of user text, with PII for the redactor to find


def record(i: int) -> DrillRecord:
    action = ("allow", "allow", "flag", "block")[i % 4]
    return DrillRecord(
        request_id=f"bench-{i}",
        tenant=f"tenant-{i % 20}",
        messages=({"role": "system", "content": "You are helpful."}, {"role": "user", "content": TEXT}),
        replies=("I can't help with that, but here is how detectives usually work... " * 4,),
        signals={"harm": (i % 100) / 100, "jailbreak": 0.01, "reply_harm": ((i * 7) % 100) / 100},
        refusal="full" if i % 3 == 0 else "none",
        active=PolicyDecision("default", "3", action, category="violent_crimes"),
        shadows=(PolicyDecision("strict", "1", "block" if i % 2 else action),),
        reasons=("base_rate",),
        thresholds={"harm": 0.5},
        created=time.time() - (i % 48) * 3600,
    )


def quiet(i: int) -> DrillRecord:
    """The common exchange: allowed, far from every threshold, shadows agree: not sampled."""
    r = record(i)
    calm = PolicyDecision("default", "3", "allow")
    return dataclasses.replace(r, active=calm, shadows=(calm,), refusal="none", signals={"harm": 0.05})


def submit_cost(store: DrillStore, rate: float, records: list[DrillRecord]) -> float:
    recorder = DrillRecorder(
        store, Sampler(SamplingConfig(rate=rate, per_tenant_hourly_cap=10**9, hourly_budget=10**9), secret=b"k")
    )
    t0 = time.perf_counter()
    for r in records:
        recorder.submit(r)
    return (time.perf_counter() - t0) / len(records) * 1e6


async def request_path(tmp: Path, n: int = 20000) -> None:
    quiet_records = [quiet(i) for i in range(n)]
    sampled_records = [record(i) for i in range(n)]
    sink = open_store(f"sqlite:///{tmp / 'sink.db'}", queue_size=10**6, queue_bytes=2**34)
    await sink.start()
    print(f"submit, not sampled:                {submit_cost(sink, 0.0, quiet_records):6.2f} µs per exchange")
    blocker = sqlite3.connect(tmp / "sink.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer waits on the lock: measures sampling + enqueue alone
    idle = submit_cost(sink, 1.0, sampled_records)
    blocker.execute("ROLLBACK")
    blocker.close()
    print(f"submit, sampled, writer waiting:    {idle:6.2f} µs per exchange")
    await sink.flush(wait_s=300)
    busy = submit_cost(sink, 1.0, sampled_records)  # the writer redacts and writes alongside (GIL shared)
    print(f"submit, sampled, writer busy:       {busy:6.2f} µs per exchange")
    await sink.aclose()


async def writer_throughput(store: DrillStore, n: int, chunk: int = 500) -> float:
    """Drills per second through redaction and the database, in chunks that fit the queue (nothing dropped)."""
    t0 = time.perf_counter()
    written = store.written
    for start in range(0, n, chunk):
        for i in range(start, min(n, start + chunk)):
            store.submit(record(i))
        await store.flush(wait_s=300)
    assert store.written - written == n and not store.dropped, store.dropped
    return n / (time.perf_counter() - t0)


async def page_latency(store: DrillStore) -> dict[str, float]:
    app = Starlette(routes=review_routes(store, Settings(admin_token=TOKEN)))
    out: dict[str, float] = {}
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=60) as client:
        login = await client.get("/guard/review/login")
        csrf = login.text.split('name="csrf" value="')[1].split('"')[0]
        await client.post("/guard/review/login", data={"csrf": csrf, "token": TOKEN}, headers={"origin": base})
        first = (await client.get("/guard/review")).text.split('href="/guard/review/drill/')[1].split('"')[0]
        for name, path in [
            ("queue", "/guard/review"),
            ("queue filtered", "/guard/review?reason=base_rate&action=block&policy=strict"),
            ("drill", f"/guard/review/drill/{first}"),
            ("dashboard", "/guard/review/dashboard"),
        ]:
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                resp = await client.get(path)
                times.append(time.perf_counter() - t0)
                assert resp.status_code == 200, (path, resp.status_code)
            out[name] = statistics.median(times) * 1000
    return out


async def run_store(name: str, store: DrillStore, n: int) -> None:
    await store.start()
    rate = await writer_throughput(store, n)
    print(f"{name}: writer {rate:,.0f} drills/s ({n} drills of ~2 kB, redaction included)")
    for label, ms in (await page_latency(store)).items():
        print(f"{name}: GET {label}: median {ms:.1f} ms over {n} drills")
    await store.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drills", type=int, default=10000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        await request_path(Path(tmp))
        await run_store("sqlite", open_store(f"sqlite:///{Path(tmp) / 'bench.db'}", queue_size=1000), args.drills)
    schema = f"gp_bench_{uuid.uuid4().hex[:8]}"
    try:
        await run_store("postgresql", open_store(f"{args.pg}?schema={schema}", queue_size=1000), args.drills)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    asyncio.run(main())
