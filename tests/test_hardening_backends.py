"""Hardening rows of the guard's backends, through the REAL gateway and guard under load: Redis down or slow
and PostgreSQL down (each cut through a loopback TCP proxy this test owns; the machine's servers are never
touched), SQLite locked, disk full, and SIGTERM with open streams (the stored samples are flushed).

Each row asserts that requests keep succeeding within a generous deadline, that the guard's records end in a
terminal state, and that nothing is left behind (memory, tasks, descriptors)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from guardproxy.decisions import read_log
from guardproxy.drills.recorder import DrillRecorder
from guardproxy.drills.sampling import Sampler, SamplingConfig
from guardproxy.drills.store import open_store
from guardproxy.drills.store.sqlite import SqliteStore
from guardproxy.fake_upstream import FakeUpstream
from tests.gateway_support import CHAT, sse_events, wait_ready
from tests.hardening_support import (
    POLICIES,
    ROOT,
    Guarded,
    body,
    chat,
    guarded,
    open_fds,
    settle,
)
from tests.servers import free_port, serve
from tests.tcpproxy import TcpCut

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEADLINE = 3.0  # seconds, per request: generous on two busy cores; an outage that blocked would take far longer


def deadline(healthy_slowest: float) -> float:
    """The per-request deadline under a fault: generous, and wider when the same run's healthy phase was
    slow (tracemalloc and a loaded machine slow every phase alike)."""
    return max(DEADLINE, 4 * healthy_slowest)


async def load(g: Guarded, n: int, concurrency: int = 20, *, prompts: int = 40) -> tuple[dict[int, int], float]:
    """``n`` chat requests, ``concurrency`` at a time, over ``prompts`` distinct conversations (plain and
    streaming): the status counts and the slowest request's seconds."""
    sem = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}
    slowest = 0.0

    async def one(i: int) -> None:
        nonlocal slowest
        async with sem:
            t0 = time.perf_counter()
            r = await chat(g, f"conversation {i % prompts}", stream=i % 4 == 0)
            slowest = max(slowest, time.perf_counter() - t0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200 and i % 4 == 0:
                assert sse_events(r.text)[-1] == "[DONE]"

    await asyncio.gather(*(one(i) for i in range(n)))
    return statuses, slowest


def traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


# --- Redis down and slow under load -----------------------------------------------------------------------


async def test_redis_down_then_slow_under_load(tmp_path: Path) -> None:
    tasks0, fds0 = len(asyncio.all_tasks()), open_fds()
    async with TcpCut(6379) as redis:
        state = {
            "url": f"redis://127.0.0.1:{redis.port}/0",
            "hmac_secret": uuid.uuid4().hex,  # fresh keys: nothing shared with other tests
            "prefix": f"gptest:{uuid.uuid4().hex}:",  # nor the secret's fingerprint (k:hmac)
            "ttl_seconds": 120,  # and they expire soon after
            "backend_timeout": 0.05,
        }
        async with guarded(tmp_path, state=state) as g:
            await load(g, 40)  # warm: pools, conversations, store
            tracemalloc.start()
            try:
                m0 = traced_now()
                statuses, slow = await load(g, 200)
                m1 = traced_now()
                assert statuses == {200: 200}
                limit = deadline(slow)
                report = [f"healthy {slow:.2f}s"]
                for fault in ("cut", "stall"):
                    getattr(redis, fault)()
                    statuses, slow = await load(g, 200)
                    report.append(f"{fault} {slow:.2f}s")
                    assert statuses == {200: 200}, (fault, statuses)
                    assert slow < limit, (fault, slow)
                    redis.restore()
                    await asyncio.sleep(1.1)  # the resilient backend probes Redis once a second
                statuses, slow = await load(g, 200)
                m2 = traced_now()
            finally:
                tracemalloc.stop()
            report.append(f"restored {slow:.2f}s")
            fell_back = _fallbacks(g)
            print(f"\nRedis under load (200 req, c=20), slowest request per phase: {', '.join(report)}; "
                  f"{fell_back:.0f} calls answered locally; traced memory +{(m1 - m0) / 1e6:.2f} MB over 200 "
                  f"healthy requests, +{(m2 - m1) / 1e6:.2f} MB over the 600 of the outage and recovery")  # fmt: skip
            assert statuses == {200: 200}
            assert fell_back > 0
            # What a healthy request leaves (bounded rings: recent decisions, conversation LRU) sets the
            # yardstick; an outage may leave nothing beyond it (no growing backlog, pool or task set).
            assert m2 - m1 < 3 * (m1 - m0) + 2_000_000
            tally = g.tally
        assert tally.finished == 40 + 4 * 200 and tally.all_terminal(), tally.outcomes
        inputs = [r for r in read_log(tmp_path / "decisions.jsonl") if r["stage"] == "input"]
        # the default policy fails open on state: every request answered, the degraded ones flagged
        assert len(inputs) == tally.finished
        assert {r["action"] for r in inputs} <= {"allow", "flag"}
        assert any(r["scores"].get("state_failed") == 1.0 for r in inputs)
    await settle()
    assert len(asyncio.all_tasks()) <= tasks0 and open_fds() <= fds0 + 2


async def test_redis_down_at_startup_starts_degraded_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="guardproxy.conversation.redis_backend")
    async with TcpCut(6379) as redis:
        redis.cut()
        state = {
            "url": f"redis://127.0.0.1:{redis.port}/0",
            "hmac_secret": uuid.uuid4().hex,
            "prefix": f"gptest:{uuid.uuid4().hex}:",  # its own fingerprint key too
            "ttl_seconds": 60,
        }
        async with guarded(tmp_path, state=state) as g:  # starts: the state backend is not a startup dependency
            assert (await g.client.get("/readyz")).status_code == 200
            down = [await chat(g, f"down {i}") for i in range(5)]
            assert all(r.status_code == 200 and r.headers["x-guardproxy-decision"] == "flag" for r in down)
            redis.restore()
            await asyncio.sleep(1.2)  # the next probe of the shared backend
            up = [await chat(g, f"up {i}") for i in range(3)]
            assert all(r.status_code == 200 and r.headers["x-guardproxy-decision"] == "allow" for r in up)
            assert redis.connections > 0
            # the one outage line names the server and the cause; the secret check ran once Redis answered
            (down_line,) = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
            assert f"at 127.0.0.1:{redis.port} db 0: ConnectionError" in down_line
            assert any("conversation state shared through redis" in r.getMessage() for r in caplog.records)
            exposition = g.metrics.render()
            assert b"guardproxy_state_secret_mismatch 0.0" in exposition
            for op in ("load", "append", "add_refused"):  # every operation's series exists from the start
                assert f'guardproxy_state_fallbacks_total{{op="{op}"}}'.encode() in exposition
    states = [r["scores"]["state_failed"] for r in read_log(tmp_path / "decisions.jsonl") if r["stage"] == "input"]
    assert states == [1.0] * 5 + [0.0] * 3


def _fallbacks(g: Guarded) -> float:
    counter = g.metrics.counter("guardproxy_state_fallbacks", "", ["op"])
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


# --- PostgreSQL down under load ---------------------------------------------------------------------------


@pytest.fixture
def pg_schema() -> Iterator[str]:
    schema = f"gp_hard_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_postgres_down_under_load_drops_samples_not_requests(tmp_path: Path, pg_schema: str) -> None:
    tasks0, fds0 = len(asyncio.all_tasks()), open_fds()
    async with TcpCut(5432) as pg:
        drills = {"store": f"postgresql://postgres@127.0.0.1:{pg.port}/test?schema={pg_schema}"}
        async with guarded(tmp_path, drills=drills) as g:
            store = g.bundle.guard.drills.store  # type: ignore[union-attr]
            tracemalloc.start()
            try:
                m0 = traced_now()
                statuses, slow_ok = await load(g, 100)
                await store.flush()
                m1 = traced_now()
                assert statuses == {200: 100} and store.written == 100
                pg.cut()
                statuses, slow = await load(g, 200)
                await store.flush(wait_s=30)
                dropped = dict(store.dropped)
                pg.restore()
                await asyncio.sleep(1.5)  # the writer retries the database once a second
                statuses_after, slow_after = await load(g, 100)
                await store.flush()
                m2 = traced_now()
            finally:
                tracemalloc.stop()
            print(f"\nPostgreSQL down under load (200 req, c=20): slowest {slow:.2f}s (healthy {slow_ok:.2f}s, "
                  f"after {slow_after:.2f}s); dropped during the outage {dropped}, in all {dict(store.dropped)}; "
                  f"written {store.written}; traced memory +{(m1 - m0) / 1e6:.2f} MB over 100 healthy requests, "
                  f"+{(m2 - m1) / 1e6:.2f} MB over the 300 of the outage and recovery")  # fmt: skip
            assert statuses == {200: 200} and slow < deadline(slow_ok)
            assert statuses_after == {200: 100}
            assert sum(dropped.values()) > 0  # counted, not queued without bound
            assert store.written >= 200  # recovered by itself: the samples after the outage are stored
            assert store.written + sum(store.dropped.values()) == 400  # each sample stored or counted as dropped
            assert m2 - m1 < 3 * (m1 - m0) + 2_000_000
            tally = g.tally
        assert tally.finished == 400 and tally.all_terminal(), tally.outcomes
        assert sum(1 for r in read_log(tmp_path / "decisions.jsonl") if r["stage"] == "input") == 400
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        stored = conn.execute(f'SELECT count(*) FROM "{pg_schema}".drills').fetchone()
    assert stored is not None and stored[0] == store.written
    await settle()
    assert len(asyncio.all_tasks()) <= tasks0 and open_fds() <= fds0 + 2


# --- SQLite locked, disk full -----------------------------------------------------------------------------


async def test_sqlite_locked_under_load_drops_samples_not_requests(tmp_path: Path) -> None:
    async with guarded(tmp_path) as g:
        store = g.bundle.guard.drills.store  # type: ignore[union-attr]
        assert (await chat(g)).status_code == 200
        await store.flush()
        blocker = sqlite3.connect(tmp_path / "drills.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            statuses, slow = await load(g, 150)
            await asyncio.sleep(1.5)  # the writer meets the lock (busy timeout 1 s) and drops what it holds
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        print(f"\nSQLite locked (150 req, c=20): slowest {slow:.2f}s; dropped {dict(store.dropped)}")
        assert statuses == {200: 150} and slow < DEADLINE
        assert store.dropped["locked"] > 0
        written = store.written
        assert (await chat(g, "after the lock")).status_code == 200
        await store.flush()
        assert store.written > written  # recovered once the lock is gone: what waited is written now
        assert await store.count() == store.written
        assert g.tally.finished == 152 and g.tally.all_terminal()


async def test_disk_full_drops_samples_not_requests(tmp_path: Path) -> None:
    # SQLite's max_page_count makes the database full exactly as a full disk does (SQLITE_FULL), without
    # filling the machine's disk.
    path = tmp_path / "drills.db"
    probe = SqliteStore(path)
    await probe.start()
    await probe.aclose()
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    store = SqliteStore(path, pragmas={"max_page_count": pages + 30}, queue_size=100)
    sampler = Sampler(SamplingConfig(rate=1.0, per_tenant_hourly_cap=10_000, hourly_budget=10_000), secret="s")
    async with guarded(tmp_path, guard_parts={"drills": DrillRecorder(store, sampler)}) as g:
        big = "lorem ipsum dolor sit amet " * 600  # ~16 KB per prompt: the database fills after a few
        sem = asyncio.Semaphore(10)

        async def one(i: int) -> tuple[int, float]:
            async with sem:
                t0 = time.perf_counter()
                r = await chat(g, f"{i} {big}", stream=i % 2 == 0)
                return r.status_code, time.perf_counter() - t0

        results = await asyncio.gather(*(one(i) for i in range(60)))
        await store.flush()
        slow = max(t for _, t in results)
        print(f"\ndisk full (60 req of 16 KB): slowest {slow:.2f}s; written {store.written}, {dict(store.dropped)}")
        assert {s for s, _ in results} == {200} and slow < DEADLINE
        assert store.dropped["disk_full"] > 0 and 0 < store.written < 60
        assert await store.count() == store.written  # what was written is intact
        assert g.tally.finished == 60 and g.tally.all_terminal()
    # the decision log is a separate file: every decision is there
    assert sum(1 for r in read_log(tmp_path / "decisions.jsonl") if r["stage"] == "input") == 60


# --- SIGTERM with open streams: samples flushed -----------------------------------------------------------

CHILD = """
import sys
from guardproxy.server import run
from guardproxy.settings import load_settings
from tests.hardening_support import FakeClassifier
sys.exit(run(load_settings(), classifier=FakeClassifier()))
"""


def _child_env(upstream: str, port: int, store: str, **extra: str) -> dict[str, str]:
    """The environment of a ``serve`` child: drills sampled at rate 1 into ``store``, and no GUARDPROXY_ setting of
    the machine's own."""
    return {
        **{k: v for k, v in os.environ.items() if not k.upper().startswith("GUARDPROXY_")},
        "PYTHONPATH": str(ROOT),
        "GUARDPROXY_UPSTREAM__BASE_URL": upstream + "/v1",
        "GUARDPROXY_SERVER__PORT": str(port),
        "GUARDPROXY_SERVER__SHUTDOWN_TIMEOUT": "1.0",
        "GUARDPROXY_SERVER__LOG_LEVEL": "warning",
        "GUARDPROXY_POLICY__ACTIVE": str(POLICIES / "default.toml"),
        "GUARDPROXY_DRILLS__STORE": store,
        "GUARDPROXY_DRILLS__SAMPLE_RATE": "1.0",
        "GUARDPROXY_DRILLS__PER_TENANT_HOURLY_CAP": "1000",
        "GUARDPROXY_STATE__HMAC_SECRET": "hardening-test-secret",
        **extra,
    }


async def test_sigterm_with_open_guarded_streams_flushes_every_sample(tmp_path: Path) -> None:
    import httpx

    tasks0, fds0 = len(asyncio.all_tasks()), open_fds()
    fake = FakeUpstream(reply=" ".join(["word"] * 400), token_interval=0.05)
    async with serve(fake) as upstream:
        port = free_port()
        env = _child_env(
            upstream,
            port,
            f"sqlite:///{tmp_path / 'drills.db'}",
            GUARDPROXY_POLICY__DECISION_LOG=str(tmp_path / "decisions.jsonl"),
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, env=env, cwd=ROOT, stderr=subprocess.PIPE
        )
        try:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20, limits=limits) as client:
                await wait_ready(client, timeout_s=30)
                streams = [
                    asyncio.create_task(client.post(CHAT, json=body(f"stream {i}", stream=True))) for i in range(100)
                ]
                for _ in range(1000):
                    if len(fake.requests) == 100:
                        break
                    await asyncio.sleep(0.01)
                assert len(fake.requests) == 100
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                proc.send_signal(signal.SIGTERM)
                results = await asyncio.wait_for(asyncio.gather(*streams), timeout=15)
                elapsed = loop.time() - t0
            _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    print(f"\nSIGTERM with 100 guarded streams: all ended {elapsed:.2f}s after the signal (shutdown_timeout 1.0 s)")
    assert proc.returncode == 0, err.decode()[-2000:]
    for r in results:
        events = sse_events(r.text)
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "overloaded"
    assert 0.8 < elapsed < 8
    # every exchange was finished and flushed before the process exited
    store = open_store(f"sqlite:///{tmp_path / 'drills.db'}")
    await store.start()
    try:
        assert await store.count() == 100
    finally:
        await store.aclose()
    inputs = [r for r in read_log(tmp_path / "decisions.jsonl") if r["stage"] == "input"]
    assert len(inputs) == 100
    await settle()
    assert len(asyncio.all_tasks()) <= tasks0 and open_fds() <= fds0 + 2


# --- PostgreSQL hung at SIGTERM; event counters at 0 ------------------------------------------------------


async def test_sigterm_with_postgres_hung_exits_promptly_and_counts_the_samples_it_loses(
    tmp_path: Path, pg_schema: str
) -> None:
    import httpx

    async with serve(FakeUpstream()) as upstream, TcpCut(5432) as pg:
        port = free_port()
        env = _child_env(upstream, port, f"postgresql://postgres@127.0.0.1:{pg.port}/test?schema={pg_schema}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, env=env, cwd=ROOT, stderr=subprocess.PIPE
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
                await wait_ready(client, timeout_s=30)
                for i in range(2):
                    assert (await client.post(CHAT, json=body(f"before {i}"))).status_code == 200
                await asyncio.sleep(0.5)  # written
                pg.stall()  # PostgreSQL hangs: connections stay open, nothing gets through
                for i in range(3):
                    assert (await client.post(CHAT, json=body(f"during {i}"))).status_code == 200
                await asyncio.sleep(0.5)  # the writer is blocked on the hung insert
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
            elapsed = time.perf_counter() - t0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    log = err.decode()
    print(f"\nSIGTERM with PostgreSQL hung: exited {elapsed:.2f}s after the signal (shutdown_timeout 1.0 s)")
    assert proc.returncode == 0, log[-2000:]
    # drain (1 s, nothing open) + the store's close budget (3 s) + its grace (1 s), not a database timeout
    assert elapsed < 8, (elapsed, log[-2000:])
    closed = [line for line in log.splitlines() if "drill store: closed in" in line]
    assert len(closed) == 1 and "with 3 samples not written" in closed[0], log[-2000:]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        stored = conn.execute(f'SELECT count(*) FROM "{pg_schema}".drills').fetchone()
    assert stored is not None and stored[0] == 2


async def test_labelled_event_counters_are_exported_at_zero_from_the_start(tmp_path: Path) -> None:
    from tests.hardening_support import TERMINAL

    async with guarded(tmp_path) as g:
        text = (await g.client.get("/metrics")).text
    drops = ("queue_full", "unavailable", "locked", "disk_full", "write_failed", "redaction_failed", "closed")
    for reason in drops:
        assert f'guardproxy_drill_samples_dropped_total{{reason="{reason}"}} 0.0' in text
    rejections = ("capacity", "AuthError", "RateLimited", "RouteNotGuarded", "RequestError", "PayloadTooLarge")
    for reason in (*rejections, "HeadersTooLarge"):
        assert f'guardproxy_rejected_total{{reason="{reason}"}} 0.0' in text
    for outcome in sorted(TERMINAL):
        assert f'guardproxy_exchange_outcomes_total{{outcome="{outcome}"}} 0.0' in text
    from guardproxy.drills.sampling import REASONS

    for reason in REASONS:
        assert f'guardproxy_drill_samples_total{{reason="{reason}"}}' in text
    for cap in ("tenant_cap", "hourly_budget"):
        assert f'guardproxy_drill_samples_capped_total{{reason="{cap}"}} 0.0' in text
