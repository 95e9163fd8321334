"""Both drill stores against real databases: SQLite in tmp_path and the machine's PostgreSQL.

Faults (a full queue, a locked database, a full disk) must drop samples, count them and keep
``submit`` prompt; nothing may block or fail the request path.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from guardproxy.drills.record import DrillRecord, PolicyDecision
from guardproxy.drills.store import DrillFilter, DrillStore, open_store
from guardproxy.drills.store.base import SCHEMA_VERSION
from guardproxy.drills.store.sqlite import SqliteStore
from guardproxy.errors import StoreError
from tests.tcpproxy import TcpCut

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
CANARY = "sk-canary-0d1e2f3a4b5c6d7e8f90"


def make(i: int = 0, **kw: Any) -> DrillRecord:
    base: dict[str, Any] = {
        "request_id": f"req-{i}",
        "tenant": "tenant-hash",
        "messages": ({"role": "user", "content": f"question {i}"},),
        "replies": (f"answer {i}",),
        "signals": {"harm": 0.1 * (i % 10)},
        "active": PolicyDecision("default", "1", "block" if i % 3 == 0 else "allow", category="privacy"),
        "shadows": (PolicyDecision("strict", "2", "block"),),
        "reasons": ("blocked",) if i % 3 == 0 else ("base_rate",),
        "created": 1_700_000_000.0 + i,
    }
    base.update(kw)
    return DrillRecord(**base)


def _file_bytes(folder: Path, pattern: str) -> bytes:
    """The database, its WAL and shared-memory files, as bytes."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob(pattern)))


@pytest.fixture
def pg_schema() -> Iterator[str]:
    schema = f"gp_test_{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DrillStore]:
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/drills.db", retention_days=30)
    else:
        schema = request.getfixturevalue("pg_schema")
        s = open_store(f"{PG_URL}?schema={schema}", retention_days=30)
    await s.start()
    yield s
    await s.aclose()


async def test_write_read_filter_label(store: DrillStore) -> None:
    for i in range(9):
        assert store.submit(make(i))
    await store.flush()
    assert store.written == 9
    assert await store.count() == 9
    assert await store.count(DrillFilter(action="block")) == 3
    assert await store.count(DrillFilter(reason="blocked")) == 3
    assert await store.count(DrillFilter(policy="strict")) == 9  # a shadow policy matches too
    assert await store.count(DrillFilter(policy="stri")) == 0
    assert await store.count(DrillFilter(reason="base_rate")) == 6
    assert await store.count(DrillFilter(reason="base%")) == 0  # LIKE wildcards are escaped
    assert await store.count(DrillFilter(category="privacy")) == 9
    page = await store.find(limit=4)
    assert [d.record.request_id for d in page] == ["req-8", "req-7", "req-6", "req-5"]  # newest first
    drill = page[1].record
    assert drill.shadows == (PolicyDecision("strict", "2", "block"),)
    assert drill.messages[0]["content"] == "question 7"
    newer, older = await store.neighbours(drill)
    assert (newer, older) == (page[0].record.id, page[2].record.id)

    await store.add_label(drill.id, "false_refusal", "asked about a public figure", "rev")
    await store.add_label(drill.id, "correct_answer", "second look", "rev")
    got = await store.get(drill.id)
    assert got is not None and got.label is not None and got.label.label == "correct_answer"
    assert [lab.label for lab in got.labels] == ["false_refusal", "correct_answer"]
    assert await store.count(DrillFilter(reviewed=True)) == 1
    assert await store.count(DrillFilter(reviewed=False)) == 8
    with pytest.raises(StoreError):
        await store.add_label(drill.id, "bogus")
    stats = await store.stats()
    assert stats.total == 9 and stats.labels == {"correct_answer": 1}
    assert stats.agreement["strict"] == {("block", "block"): 3, ("allow", "block"): 6}


async def test_retention_deletes_old_drills_and_their_labels(store: DrillStore) -> None:
    now = time.time()
    old, new = make(1, created=now - 40 * 86400), make(2, created=now - 86400)
    store.submit(old)
    store.submit(new)
    await store.flush()
    await store.add_label(old.id, "unclear")
    assert await store.purge(now) == 1
    assert await store.get(old.id) is None
    assert await store.get(new.id) is not None
    assert (await store.stats()).labels == {}


async def test_canary_key_never_reaches_the_store(store: DrillStore, tmp_path: Path) -> None:
    record = make(
        1,
        request_id=f"rid-{CANARY}",
        messages=(
            {"role": "user", "content": f"my key is {CANARY}, debug my code"},
            {"role": "user", "content": [{"type": "text", "text": f"Authorization: Bearer {CANARY}"}]},
        ),
        replies=(f"Never share {CANARY}.",),
        model=f"gpt-{CANARY}",
    )
    assert store.submit(record)
    await store.flush()
    got = await store.get(record.id)
    assert got is not None and "[REDACTED]" in got.record.messages[0]["content"]
    if isinstance(store, SqliteStore):
        raw = _file_bytes(tmp_path, "drills.db*")
        assert b"canary" not in raw and b"debug my code" in raw
    else:
        assert isinstance(store.schema, str)
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{store.schema}"')
            rows = conn.execute("SELECT d::text FROM drills d").fetchall()
        text = " ".join(r[0] for r in rows)
        assert "debug my code" in text and "canary" not in text


async def test_migrations_run_once_and_refuse_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    for _ in range(2):
        s = SqliteStore(path)
        await s.start()
        await s.aclose()
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == list(
        range(1, SCHEMA_VERSION + 1)
    )
    conn.execute("INSERT INTO schema_version VALUES (999, 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(path).start()


async def test_postgres_migrations_are_shared_by_replicas(pg_schema: str) -> None:
    a = open_store(f"{PG_URL}?schema={pg_schema}")
    b = open_store(f"{PG_URL}?schema={pg_schema}")
    await asyncio.gather(a.start(), b.start())  # two replicas starting at once: one migrates
    a.submit(make(1))
    await a.flush()
    assert (await b.get(make(1).id)) is None  # a fresh id: nothing shared by accident
    assert await b.count() == 1
    await a.aclose()
    await b.aclose()


async def _submit_many(store: DrillStore, n: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    accepted = sum(store.submit(make(i)) for i in range(n))
    return accepted, time.perf_counter() - t0


async def test_sqlite_locked_database_and_full_queue(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SqliteStore(path, queue_size=20, busy_timeout=0.3)
    await store.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        accepted, elapsed = await _submit_many(store, 500)
        await asyncio.sleep(1.0)  # the writer meets the lock and drops what it took
        accepted2, elapsed2 = await _submit_many(store, 500)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # submits stayed prompt while the database was locked (generous bound: no waiting on the lock)
    assert elapsed < 0.5 and elapsed2 < 0.5
    assert store.dropped["queue_full"] > 0
    assert store.dropped["locked"] > 0
    assert accepted + accepted2 < 1000
    await store.flush()
    # the store recovers by itself once the lock is gone
    after = make(10_000)
    assert store.submit(after)
    await store.flush()
    assert await store.get(after.id) is not None
    await store.aclose()


async def test_sqlite_full_disk_drops_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    probe = SqliteStore(path)
    await probe.start()
    await probe.aclose()
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
    store = SqliteStore(path, pragmas={"max_page_count": pages + 40}, queue_size=50)
    await store.start()
    big = "lorem ipsum dolor " * 1200
    for i in range(3):
        assert store.submit(make(i, replies=(big,)))
    await store.flush()
    assert store.written == 3
    t0 = time.perf_counter()
    for i in range(3, 80):
        store.submit(make(i, replies=(big,)))
        await asyncio.sleep(0)
    assert time.perf_counter() - t0 < 0.5
    await store.flush()
    assert store.dropped["disk_full"] > 0
    assert 3 <= store.written < 80
    assert await store.count() == store.written  # what was written is intact and readable
    await store.aclose()


async def test_postgres_locked_table_drops_and_recovers(pg_schema: str) -> None:
    store = open_store(f"{PG_URL}?schema={pg_schema}", queue_size=20)
    await store.start()
    blocker = psycopg.connect(PG_URL, autocommit=True)
    try:
        blocker.execute(f'SET search_path TO "{pg_schema}"')
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE drills IN ACCESS EXCLUSIVE MODE")
        accepted, elapsed = await _submit_many(store, 300)
        await asyncio.sleep(2.5)  # lock_timeout is 2 s
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert elapsed < 0.5
    assert store.dropped["queue_full"] > 0
    await store.flush()
    assert sum(store.dropped.values()) > 0
    after = make(5000)
    assert store.submit(after)
    await store.flush()
    assert await store.get(after.id) is not None
    await store.aclose()


async def test_closed_store_drops_instead_of_raising(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    assert store.submit(make(1)) is False  # never opened
    await store.start()
    await store.aclose()
    assert store.submit(make(2)) is False
    assert store.dropped["closed"] == 2


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://host/x.db", "sqlite:///"])
def test_bad_urls(url: str) -> None:
    from guardproxy.errors import ConfigError

    with pytest.raises(ConfigError):
        open_store(url)


async def test_postgres_outage_drops_promptly_and_recovers(pg_schema: str) -> None:
    proxy = TcpCut(5432)
    await proxy.start()
    store = open_store(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={pg_schema}", queue_size=50)
    await store.start()
    first = make(1)
    assert store.submit(first)
    await store.flush()
    proxy.cut()
    t0 = time.perf_counter()
    accepted = 0
    for i in range(200):
        accepted += store.submit(make(100 + i))
        await asyncio.sleep(0.005)  # requests keep arriving during the outage
    assert time.perf_counter() - t0 < 5.0
    await store.flush(wait_s=30)
    assert store.dropped["unavailable"] > 0
    with pytest.raises(StoreError):
        await store.count()  # reads fail cleanly while the database is away
    proxy.restore()
    await asyncio.sleep(1.1)  # the writer waits a second between reconnection attempts
    after = make(999)
    assert store.submit(after)
    await store.flush()
    assert await store.get(after.id) is not None and await store.get(first.id) is not None
    await store.aclose()
    await proxy.aclose()


async def test_hash_only_stores_no_readable_text(tmp_path: Path) -> None:
    from guardproxy.drills.export import build_rows
    from guardproxy.drills.redaction import Redactor

    store = SqliteStore(tmp_path / "h.db", redactor=Redactor(hash_only=True))
    await store.start()
    record = make(1, messages=({"role": "user", "content": "my secret plan is pineapples"},), replies=("ok sure",))
    assert store.submit(record)
    await store.flush()
    got = await store.get(record.id)
    assert got is not None and got.record.hashed
    assert got.record.messages[0]["role"] == "user"
    assert str(got.record.messages[0]["content"]).startswith("sha256:")
    await store.aclose()
    assert b"pineapples" not in _file_bytes(tmp_path, "h.db*")
    rows = build_rows([got])
    assert not rows.prompts and rows.skipped["hash_only"] == 1


async def test_queue_is_bounded_in_bytes_and_long_texts_are_clipped(tmp_path: Path) -> None:
    path = tmp_path / "bytes.db"
    store = SqliteStore(path, queue_size=1000, queue_bytes=3 * 1024 * 1024, busy_timeout=0.2)
    await store.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer is stuck: only the byte bound limits the queue
    try:
        huge = "A" * 1_000_000
        accepted = [store.submit(make(i, replies=(huge,))) for i in range(10)]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sum(accepted) <= 4 and store.dropped["queue_full"] >= 6
    await store.flush()
    tail_ask = "tell me how to do the harmful thing"
    record = make(50, messages=({"role": "user", "content": "wrapper " * 20_000 + tail_ask},))
    assert store.submit(record)
    await store.flush()
    got = await store.get(record.id)
    assert got is not None
    text = got.record.messages[0]["content"]
    assert len(text) < 70_000 and text.endswith(tail_ask) and "characters cut" in text
    await store.aclose()


async def test_postgres_down_at_startup_starts_degraded_and_migrates_later(pg_schema: str) -> None:
    proxy = TcpCut(5432)
    await proxy.start()
    proxy.cut()  # every connection to the proxy is reset: PostgreSQL is "down"
    store = open_store(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={pg_schema}")
    await store.start()  # the gateway still starts
    assert store.submit(make(1))
    await store.flush()
    assert store.dropped["unavailable"] == 1
    proxy.restore()
    await asyncio.sleep(1.1)
    after = make(2)
    assert store.submit(after)
    await store.flush()
    assert await store.get(after.id) is not None  # connected, migrated, written
    await store.aclose()
    await proxy.aclose()


async def test_label_waiting_at_close_fails_instead_of_hanging(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "close.db")
    await store.start()
    record = make(1)
    store.submit(record)
    await store.flush()
    label = asyncio.create_task(store.add_label(record.id, "unclear"))
    await store.aclose()
    try:
        await asyncio.wait_for(label, timeout=5)
    except StoreError:
        pass  # queued behind the stop marker: refused, not left hanging


# --- a hung server, outages in the log, counters at 0, read-only opening -----------------------------------

DROP_REASONS = ("queue_full", "unavailable", "locked", "disk_full", "write_failed", "redaction_failed", "closed")


def _store_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("guardproxy.drills.store")]


async def test_postgres_stall_is_bounded_on_the_client_counted_and_logged(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="guardproxy.drills.store")
    async with TcpCut(5432) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={pg_schema}"
        store = open_store(url, op_timeout=1.0, connect_timeout=2)
        await store.start()
        assert store.submit(make(1))
        await store.flush()
        proxy.stall()  # connections stay open and nothing gets through: the server's statement_timeout never fires
        t0 = time.perf_counter()
        for i in range(3):
            assert store.submit(make(10 + i))
        await asyncio.wait_for(store.flush(), timeout=15)  # the writer is not held by the call that got no answer
        assert time.perf_counter() - t0 < 10
        assert store.dropped["unavailable"] == 3 and store.written == 1
        lines = _store_lines(caplog)
        assert len(lines) == 1 and "no answer from the database within 1 s" in lines[0], lines
        proxy.restore()
        await asyncio.sleep(1.1)  # the writer waits a second between reconnection attempts
        after = make(99)
        assert store.submit(after)
        await store.flush()
        assert await store.get(after.id) is not None
        lines = _store_lines(caplog)
        assert len(lines) == 2 and "writing again" in lines[1] and "unavailable 3" in lines[1], lines
        await store.aclose()


async def test_postgres_close_during_a_stall_is_bounded_and_counts_what_it_loses(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="guardproxy.drills.store")
    async with TcpCut(5432) as proxy:
        # the default op_timeout (longer than the test): close itself must break the call off
        store = open_store(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={pg_schema}", queue_size=50)
        await store.start()
        assert store.submit(make(1))
        await store.flush()
        proxy.stall()
        for i in range(5):
            assert store.submit(make(10 + i))
        await asyncio.sleep(0.5)  # the writer is blocked on the stalled insert
        for i in range(3):
            assert store.submit(make(20 + i))
        t0 = time.perf_counter()
        await asyncio.to_thread(store.close, 1.0)
        elapsed = time.perf_counter() - t0
    assert elapsed < 5, elapsed
    assert store.written == 1 and sum(store.dropped.values()) == 8, store.dropped
    lines = _store_lines(caplog)
    assert len(lines) == 1 and "with 8 samples not written" in lines[0], lines
    assert store.submit(make(30)) is False  # after close: dropped, counted, logged once
    assert store.dropped["closed"] >= 1 and len(_store_lines(caplog)) == 2


async def test_each_outage_is_one_log_line_and_its_end_another(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="guardproxy.drills.store")
    async with TcpCut(5432) as proxy:
        store = open_store(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={pg_schema}", queue_size=50)
        await store.start()
        for outage in range(2):
            proxy.cut()
            for i in range(3):
                assert store.submit(make(100 * outage + i))
                await store.flush()
            proxy.restore()
            await asyncio.sleep(1.1)  # the writer waits a second between reconnection attempts
            assert store.submit(make(100 * outage + 50))
            await store.flush()
        await store.aclose()
    lines = _store_lines(caplog)
    assert store.dropped["unavailable"] == 6 and store.written == 2
    assert len(lines) == 4, lines
    assert all("\n" not in line for line in lines)  # libpq's three-line messages on one line
    assert ["dropping samples (unavailable)" in line for line in lines] == [True, False, True, False]
    assert ["writing again" in line and "unavailable 3" in line for line in lines] == [False, True, False, True]


def test_every_drop_reason_is_exported_at_zero_from_the_start(tmp_path: Path) -> None:
    from guardproxy.metrics import Metrics

    metrics = Metrics()
    SqliteStore(tmp_path / "m.db", metrics=metrics)
    text = metrics.render().decode()
    for reason in DROP_REASONS:
        assert f'guardproxy_drill_samples_dropped_total{{reason="{reason}"}} 0.0' in text


def _schema_exists(schema: str) -> bool:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


@pytest.mark.parametrize("action", ["export", "report"])
def test_export_and_report_never_create_a_misspelt_schema(
    action: str, pg_schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guardproxy.cli import main

    assert main(["drills", action, "--store", f"{PG_URL}?schema={pg_schema}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no schema '{pg_schema}'" in err, err
    assert not _schema_exists(pg_schema)  # no schema, no migration, no tables


async def test_read_only_open_of_a_database_that_is_down_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from guardproxy.cli import main

    async with TcpCut(5432) as proxy:
        proxy.cut()
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema=gp_never_created"
        code = await asyncio.to_thread(main, ["drills", "export", "--store", url, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"127.0.0.1:{proxy.port}/test (schema gp_never_created):" in err, err
    # not the gateway's "samples are dropped until it returns": this command starts no writer
    assert not [r for r in caplog.records if r.name.startswith("guardproxy.drills")]


async def test_read_only_store_names_missing_tables_and_reads_without_writing(tmp_path: Path, pg_schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
    empty = open_store(f"{PG_URL}?schema={pg_schema}", read_only=True)
    with pytest.raises(StoreError, match="no table drills, labels, schema_version"):
        await empty.start()
    not_drills = tmp_path / "other.db"
    with sqlite3.connect(not_drills) as conn:
        conn.execute("CREATE TABLE drills (x)")
    with pytest.raises(StoreError, match=f"{not_drills}: no table labels, schema_version"):
        await open_store(f"sqlite:///{not_drills}", read_only=True).start()
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="no such database file"):
        await open_store(f"sqlite:///{missing}", read_only=True).start()
    assert not missing.exists()

    record = make(1)
    writer = SqliteStore(tmp_path / "drills.db")
    await writer.start()
    writer.submit(record)
    await writer.flush()
    await writer.aclose()
    reader = open_store(f"sqlite:///{tmp_path / 'drills.db'}", read_only=True)
    await reader.start()
    assert [d.record.id for d in await reader.all_drills()] == [record.id]
    assert reader.submit(make(2)) is False
    with pytest.raises(StoreError, match="read-only"):
        await reader.add_label(record.id, "unclear")
    await reader.aclose()
