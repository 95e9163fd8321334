"""The drill store: one schema, one writer thread, two databases (SQLite, PostgreSQL).

Writes never touch the request path. ``submit`` puts the record on a bounded in-memory queue and returns
at once; one writer thread owns the write connection, redacts each record (``Redactor``) and writes it in
batches. If the queue is full, or the database fails (locked, disk full, server down, or no answer within
the store's ``op_timeout``: a deadline the client enforces, ``deadline.Watchdog``), the sample is dropped and
counted in ``guardproxy_drill_samples_dropped{reason}`` (every reason in ``DROP_REASONS`` is exported at 0 from
the start): a drill store never delays or fails a request. Drops are logged in one line when an outage starts
and one when the store writes again. ``close`` is bounded too: what it cannot write in time is dropped,
counted and logged. Review labels and retention purges go through the same writer thread (callers await
them). Reads open short-lived connections in worker threads (``asyncio.to_thread``).

A store opened with ``read_only=True`` (the CLI's export and report) starts no writer: ``open`` checks that the
tables are there, at this guardproxy's schema version, and creates nothing (no schema, no migration).

Schema changes are numbered migrations in ``MIGRATIONS``, applied at open under a lock and recorded in
``schema_version``; both databases run the same statements (types chosen to mean the same in both).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter

from guardproxy.drills.record import LABELS, DrillRecord, message_text
from guardproxy.drills.redaction import Redactor
from guardproxy.drills.store.deadline import Expired, Watchdog
from guardproxy.drills.store.schema import (
    ANY_DRILL,
    COLUMNS,
    INSERT,
    MIGRATIONS,
    SCHEMA_VERSION,
    SHADOW_DECISION_SQL,
    DrillFilter,
    filter_sql,
    record_from_row,
    row_params,
)
from guardproxy.errors import StoreError

__all__ = [
    "DROP_REASONS",
    "DrillFilter",
    "DrillStats",
    "DrillStore",
    "LabelEntry",
    "MetricsLike",
    "StoredDrill",
    "SCHEMA_VERSION",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()
# Every reason a sample is dropped for (``guardproxy_drill_samples_dropped{reason}``): locked and disk_full come
# from SQLite, unavailable mostly from PostgreSQL; all are exported by both stores, so dashboards match.
DROP_REASONS = ("queue_full", "unavailable", "locked", "disk_full", "write_failed", "redaction_failed", "closed")
# Not an outage: logged once per process (a bug in redaction; samples arriving after close).
_LOGGED_ONCE = frozenset({"redaction_failed", "closed"})
_TABLES = ("drills", "labels", "schema_version")
_ABANDON_GRACE = 1.0  # seconds close waits for the writer after breaking off its database call


def one_line(exc: BaseException) -> str:
    """An error's text on one line (libpq's messages span several)."""
    return " ".join(str(exc).split())


class MetricsLike(Protocol):
    """``guardproxy.metrics.Metrics`` as the store uses it (its registry is what /metrics serves)."""

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter: ...


@dataclass(frozen=True)
class LabelEntry:
    id: int
    drill_id: str
    label: str
    note: str
    reviewer: str
    created: float


@dataclass(frozen=True)
class StoredDrill:
    record: DrillRecord
    labels: tuple[LabelEntry, ...] = ()

    @property
    def label(self) -> LabelEntry | None:
        return self.labels[-1] if self.labels else None

    @property
    def reviewer_labels(self) -> dict[str, LabelEntry]:
        """Each reviewer's latest label, in the order they first labelled."""
        out: dict[str, LabelEntry] = {}
        for entry in self.labels:
            out.pop(entry.reviewer, None)
            out[entry.reviewer] = entry
        return out

    @property
    def disputed(self) -> bool:
        """Whether two reviewers' latest labels differ: then ``label`` (the newest) is only who spoke last. Two
        reviewers on two replicas labelled one drill differently and the export kept the later, with no sign of the
        other (an operator walkthrough, 2026-12-08)."""
        return len({e.label for e in self.reviewer_labels.values()}) > 1


@dataclass(frozen=True)
class DrillStats:
    """What the dashboard draws, over the most recent drills."""

    rows: tuple[tuple[float, str, float, float | None], ...]  # created, active action, harm, reply_harm
    agreement: dict[str, dict[tuple[str, str], int]]  # shadow policy -> (active, shadow) -> count
    labels: dict[str, int]
    total: int


class _Backoff(StoreError):
    """The writer is waiting before it tries to reconnect."""


@dataclass
class _Outage:
    """Samples are being dropped since ``since`` (monotonic); the store logged it once, and logs its end."""

    since: float
    dropped: Tally[str] = field(default_factory=Tally)


@dataclass
class _Op:
    fn: Callable[[Any], Any]
    future: concurrent.futures.Future[Any]
    needs_connection: bool = True  # a flush marker does not: it must answer while the database is down


def _approx_size(record: DrillRecord) -> int:
    """Characters of text a queued record holds (cheap: no serialisation on the request path)."""
    size = 512 + sum(len(r) for r in record.replies)
    for m in record.messages:
        size += len(message_text(m))
        if m.get("tool_calls"):
            size += len(str(m["tool_calls"]))
    return size


def _rollback(conn: Any) -> None:
    # SQLite rolls back by itself on SQLITE_FULL; a failing ROLLBACK must not hide the real error
    with contextlib.suppress(Exception):
        conn.execute("ROLLBACK")


class DrillStore(ABC):
    """A drill database behind one writer thread. Subclasses supply connections and dialect details."""

    serial_type = "INTEGER PRIMARY KEY"
    shadow_decision_sql = SHADOW_DECISION_SQL  # the queue's policy-and-action filter, in this database's dialect
    # Errors at open that mean "the database is down", not "misconfigured": the store starts degraded.
    degraded_start_errors: tuple[type[Exception], ...] = ()
    # Seconds each database call of the writer may take before the client breaks it off (``_interrupt``); None: the
    # driver's own timeouts bound it.
    op_timeout: float | None = None

    def __init__(
        self,
        *,
        redactor: Redactor | None = None,
        queue_size: int = 1000,
        queue_bytes: int = 64 * 1024 * 1024,
        retention_days: int = 30,
        metrics: MetricsLike | None = None,
        batch_size: int = 200,
        read_only: bool = False,
    ) -> None:
        self.redactor = redactor or Redactor()
        self.read_only = read_only
        self.retention_days = retention_days
        # drills retention removed since this store opened: when the connection opens, every hour, and on ``purge``
        self.retention_removed = 0
        self.batch_size = batch_size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        # The queue is bounded in bytes too: a thousand 4 MB conversations must not become 4 GB of memory.
        self.queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watchdog: Watchdog | None = None
        self._closed = False
        self._closing = False  # close is under way: it logs what is lost in one line
        self._stopping = threading.Event()  # the writer stops once the queue is empty
        self._abandon = threading.Event()  # close ran out of time: the writer drops what it takes, unwritten
        self._drop_lock = threading.Lock()  # drops come from the event loop (queue full) and the writer
        self._logged: set[str] = set()
        self._outage: _Outage | None = None
        self._retry_at = 0.0
        self._migrated = False
        self._writer_done = threading.Event()
        self.dropped: Tally[str] = Tally()  # reason -> samples dropped (also in the prometheus counter)
        self.written = 0
        self.bind_metrics(metrics)

    # -- dialect hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _connect(self, *, write: bool) -> Any:
        """A new DB-API connection in autocommit mode (transactions are explicit)."""

    @abstractmethod
    def _sql(self, sql: str) -> str:
        """Adapt ``?`` placeholders to the driver."""

    @abstractmethod
    def _lock_migrations(self, conn: Any) -> None:
        """Take the lock that serialises migrations between processes, inside the open transaction."""

    def _begin(self, conn: Any) -> None:
        conn.execute("BEGIN")

    def _drop_reason(self, exc: BaseException) -> str:
        return "write_failed"

    def _interrupt(self, conn: Any) -> None:
        """Break ``conn`` from another thread so that the call blocked on it raises. Only a store with ``op_timeout``
        (PostgreSQL) sets up the watchdog that calls it; SQLite's calls are bounded by its busy timeout."""
        raise TypeError(f"{type(self).__name__} has no client-side deadline to enforce")

    @abstractmethod
    def _tables(self, conn: Any) -> set[str]:
        """The names of the tables the store's connection sees."""

    @property
    def where(self) -> str:
        """The store as messages name it (never a password)."""
        return repr(self)

    # -- lifecycle --------------------------------------------------------------------------------------
    def bind_metrics(self, metrics: MetricsLike | None) -> None:
        """Count drops in the gateway's registry (``app.state.metrics``) or, without one, a private one."""
        if metrics is not None:
            self._dropped_metric = metrics.counter(
                "guardproxy_drill_samples_dropped", "drill samples dropped (queue full, store failing)", ["reason"]
            )
            self._written_metric = metrics.counter("guardproxy_drill_samples_written", "drill samples written")
        else:
            registry = CollectorRegistry(auto_describe=True)
            self._dropped_metric = Counter(
                "guardproxy_drill_samples_dropped", "drill samples dropped", ["reason"], registry=registry
            )
            self._written_metric = Counter(
                "guardproxy_drill_samples_written", "drill samples written", registry=registry
            )
        for reason in DROP_REASONS:  # at 0 from the start: rate() and absent() alerts work before a first drop
            self._dropped_metric.labels(reason)

    def open(self) -> None:
        """Start the writer thread; it opens the database and applies migrations. Raises StoreError.

        Read-only: start nothing; check that the tables are there and readable (``_check_readable``)."""
        if self.read_only:
            self._check_readable()
            return
        if self._thread is not None:
            return
        if self.op_timeout is not None:
            self._watchdog = Watchdog(self._interrupt)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._writer_main, args=(ready,), name="drill-writer", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=60)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            self._stop_watchdog()
            raise

    async def start(self) -> None:
        await asyncio.to_thread(self.open)

    def close(self, timeout: float = 3.0) -> None:
        """Write what is queued and stop the writer thread, in about ``timeout`` seconds at most (plus one second
        of grace). Past it, the database call under way is broken off and what is still queued is dropped: a hung
        database must not hold a shutdown. What was not written is counted, and logged in one line."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        t0 = time.monotonic()
        self._closing = True
        with self._drop_lock:
            before = Tally(self.dropped)
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            # wakes an idle writer; a full queue has no room for it, and the writer stops once it has emptied it
            self._queue.put_nowait(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            self._abandon.set()
            if self._watchdog is not None:
                self._watchdog.expire()
            thread.join(_ABANDON_GRACE)
        stuck = thread.is_alive()
        if stuck:  # blocked where no deadline reaches (a connection attempt): count what it will not take
            self._fail_leftovers()
        self._thread = None
        self._stop_watchdog()
        with self._drop_lock:
            lost = Tally(self.dropped)
        lost.subtract(before)
        lost = +lost
        self._closing = False
        if lost:
            log.warning(
                "drill store: closed in %.1f s with %d samples not written (%s)%s",
                time.monotonic() - t0,
                sum(lost.values()),
                ", ".join(f"{reason} {n}" for reason, n in sorted(lost.items())),
                "; the writer thread is still blocked" if stuck else "",
            )

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- the request path -------------------------------------------------------------------------------
    def submit(self, record: DrillRecord) -> bool:
        """Queue a sampled record for writing. Never blocks, never raises; False when dropped."""
        if self._closed or self._thread is None:
            self._drop("closed", 1, None)
            return False
        size = _approx_size(record)
        with self._bytes_lock:
            if self._queued_bytes + size > self.queue_bytes:
                full = True
            else:
                full = False
                self._queued_bytes += size
        if full:
            self._drop("queue_full", 1, None)
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._release(size)
            self._drop("queue_full", 1, None)
            return False
        return True

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    def queued(self) -> int:
        return self._queue.qsize()

    def _drop(self, reason: str, n: int, exc: BaseException | None) -> None:
        """Count dropped samples. One line when an outage starts (``_recovered`` logs its end): a failing disk or
        a flood must not flood the log too; the guardproxy_drill_samples_dropped{reason} counter has every drop."""
        with self._drop_lock:
            self.dropped[reason] += n
            once = reason in _LOGGED_ONCE
            if once:
                first = reason not in self._logged and not self._closing
                if first:
                    self._logged.add(reason)
            else:
                outage = self._outage
                first = outage is None
                if outage is None:
                    outage = self._outage = _Outage(time.monotonic())
                outage.dropped[reason] += n
        self._dropped_metric.labels(reason).inc(n)
        if not first or self._closing:  # close logs what it lost in one line
            return
        detail = f": {one_line(exc)}" if exc else ""
        if once:
            log.warning("drill store: dropping samples (%s)%s; further drops are only counted", reason, detail)
        else:
            log.warning("drill store: dropping samples (%s)%s; counting drops until it writes again", reason, detail)

    def _recovered(self) -> None:
        """After a write: end the outage, if there is one and the queue has room again (a queue that stays full
        under load is one long outage, not one per batch)."""
        if self._outage is None:
            return
        if self._queue.qsize() * 2 > self._queue.maxsize or self._queued_bytes * 2 > self.queue_bytes:
            return
        with self._drop_lock:
            outage, self._outage = self._outage, None
        if outage is not None:
            dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(outage.dropped.items())) or "none"
            elapsed = time.monotonic() - outage.since
            log.warning("drill store: writing again after %.1f s; dropped meanwhile: %s", elapsed, dropped)

    # -- the writer thread ------------------------------------------------------------------------------
    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        conn: Any = None
        degraded: tuple[type[Exception], ...] = (Expired, *self.degraded_start_errors)
        try:
            conn = self._open_connection()
        except degraded as exc:
            # The database is down at startup: serve anyway, drop samples, connect (and migrate) when it is back.
            log.warning(
                "drill store: database unavailable at startup, samples are dropped until it returns: %s", one_line(exc)
            )
            self._outage = _Outage(time.monotonic())  # logged: the drops that follow are counted, the return logged
            self._retry_at = time.monotonic() + 1.0
        except Exception as exc:
            ready.set_exception(StoreError(f"cannot open drill store: {one_line(exc)}"))
            return
        ready.set_result(None)
        last_purge = time.monotonic()
        stop = False
        while not stop:
            if self._stopping.is_set() and self._queue.empty():  # close found the queue full: _STOP did not fit
                break
            try:
                batch = [self._queue.get(timeout=1.0)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records: list[DrillRecord] = []
            for it in batch:
                if it is _STOP:
                    stop = True
                elif isinstance(it, _Op):
                    conn = self._flush_and_release(conn, records)
                    records = []
                    conn = self._run_op(conn, it)
                else:
                    records.append(it)
            conn = self._flush_and_release(conn, records)
            if time.monotonic() - last_purge > 3600:  # retention, also under constant traffic
                conn = self._guarded(conn, lambda c: self._purge(c, time.time()), None)
                last_purge = time.monotonic()
        self._fail_leftovers()
        self._writer_done.set()
        if conn is not None:
            conn.close()

    def _flush_and_release(self, conn: Any, records: list[DrillRecord]) -> Any:
        """Write a batch. Its records count against ``queue_bytes`` until then, not only while queued: a batch the
        writer holds while the database is slow or locked is memory too, and releasing it on dequeue let the queue
        take another batch's worth behind it."""
        written = self.written
        try:
            return self._flush_records(conn, records)
        finally:
            self._release(sum(_approx_size(r) for r in records))
            if self.written > written:
                self._recovered()

    def _fail_leftovers(self) -> None:
        """After stop: nothing may wait forever on an op the writer will never run."""
        while True:
            try:
                it = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(it, _Op):
                if it.future.set_running_or_notify_cancel():
                    it.future.set_exception(StoreError("drill store is closed"))
            elif it is not _STOP:
                self._release(_approx_size(it))
                self._drop("closed", 1, None)

    def _deadline(self, conn: Any) -> AbstractContextManager[None]:
        """Bound a call of the writer on ``conn`` by ``op_timeout``, on the client (raises ``Expired``)."""
        if self._watchdog is None or conn is None or self.op_timeout is None:
            return nullcontext()
        return self._watchdog.bound(conn, self.op_timeout)

    def _discard(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def _open_connection(self) -> Any:
        conn = self._connect(write=True)
        try:
            if not self._migrated:
                with self._deadline(conn):
                    self._migrate(conn)
                    self._purge(conn, time.time())
                self._migrated = True
        except BaseException:
            conn.close()
            raise
        return conn

    def _flush_records(self, conn: Any, records: list[DrillRecord]) -> Any:
        if not records:
            return conn
        if self._abandon.is_set():  # close ran out of time: no more database calls
            self._drop("closed", len(records), None)
            return conn
        try:
            rows = [row_params(self.redactor.record(r)) for r in records]
        except Exception as exc:  # a bug in redaction must drop the sample, not write it unredacted
            self._drop("redaction_failed", len(records), exc)
            return conn

        def write(c: Any) -> None:
            self._begin(c)
            try:
                c.cursor().executemany(self._sql(INSERT), rows)
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise

        conn = self._guarded(conn, write, len(rows))
        return conn

    def _guarded(self, conn: Any, fn: Callable[[Any], Any], n_records: int | None) -> Any:
        """Run a write; on failure drop (and count) the records, and reconnect next time if need be."""
        if self._abandon.is_set():
            if n_records:
                self._drop("closed", n_records, None)
            return conn
        try:
            if conn is None:
                conn = self._reconnect()
            with self._deadline(conn):
                fn(conn)
        except Exception as exc:
            if n_records:
                reason = "unavailable" if isinstance(exc, _Backoff | Expired) else self._drop_reason(exc)
                self._drop(reason, n_records, exc)
            else:
                log.warning("drill store: maintenance failed: %s", one_line(exc))
            if isinstance(exc, Expired) or not self._usable(conn):
                if conn is not None:
                    self._discard(conn)
                conn = None
            return conn
        if n_records:
            self.written += n_records
            self._written_metric.inc(n_records)
        return conn

    def _usable(self, conn: Any) -> bool:
        return conn is not None

    def _reconnect(self) -> Any:
        # After a failed connect, wait a second before the next try: a database that is down (or a host that
        # swallows packets until connect_timeout) must not cost every batch a connection attempt.
        now = time.monotonic()
        if now < self._retry_at:
            raise _Backoff("database unavailable; retrying shortly")
        try:
            return self._open_connection()
        except Exception:
            self._retry_at = now + 1.0
            raise

    def _run_op(self, conn: Any, op: _Op) -> Any:
        if not op.future.set_running_or_notify_cancel():
            return conn
        if self._abandon.is_set():
            op.future.set_exception(StoreError("drill store is closed"))
            return conn
        try:
            if conn is None and op.needs_connection:
                conn = self._reconnect()
            with self._deadline(conn if op.needs_connection else None):
                result = op.fn(conn)
        except Exception as exc:
            op.future.set_exception(StoreError(f"drill store: {one_line(exc)}"))
            if isinstance(exc, Expired) or not self._usable(conn):
                if conn is not None:
                    self._discard(conn)
                conn = None
            return conn
        op.future.set_result(result)
        return conn

    async def _write_op(self, fn: Callable[[Any], T], wait_s: float = 10.0, *, needs_connection: bool = True) -> T:
        """Run ``fn(write_connection)`` on the writer thread and wait for it (labels, purges, flush)."""
        if self.read_only:
            raise StoreError("drill store is open read-only")
        if self._thread is None or self._closed:
            raise StoreError("drill store is not open")
        op = _Op(fn, concurrent.futures.Future(), needs_connection)
        try:
            await asyncio.to_thread(self._queue.put, op, True, wait_s)
        except queue.Full as exc:
            raise StoreError("drill store is busy; try again") from exc
        if self._writer_done.is_set():  # the writer stopped while this op was being queued
            self._fail_leftovers()
        return await asyncio.wait_for(asyncio.wrap_future(op.future), timeout=wait_s + 30)

    # -- schema -----------------------------------------------------------------------------------------
    def check_exists(self) -> None:
        """Raise ``StoreError`` (one line naming the store and what is missing) unless a gateway created this store:
        for a command that writes to a store (``guardproxy drills purge``, which migrates an older one) but must
        not create one where a URL has a typo. Creates nothing."""
        try:
            with self._reader() as conn:
                self._check_namespace(conn)
                if "schema_version" not in self._tables(conn):
                    raise StoreError(
                        f"drill store {self.where}: no table schema_version (not a drill store, or never opened by a"
                        " gateway)"
                    )
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"drill store {self.where}: {one_line(exc)}") from exc

    def _check_namespace(self, conn: Any) -> None:
        """Raise ``StoreError`` if what holds the tables is missing (PostgreSQL: the schema; SQLite: nothing, the
        CLI checks the file)."""
        return None

    def _check_readable(self) -> None:
        """Read-only open: the tables are there, at this guardproxy's schema version. Creates nothing; each problem
        is one line naming the store and what is missing."""
        try:
            with self._reader() as conn:
                self._check_namespace(conn)
                self._check_tables(conn)
                version = int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"drill store {self.where}: {one_line(exc)}") from exc
        where = f"drill store {self.where}: schema {version} is"
        if version > SCHEMA_VERSION:
            raise StoreError(f"{where} newer than this guardproxy ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            raise StoreError(
                f"{where} older than this guardproxy ({SCHEMA_VERSION}); a gateway or `guardproxy drills purge`"
                " migrates it"
            )

    def _check_tables(self, conn: Any) -> None:
        tables = self._tables(conn)
        missing = [t for t in _TABLES if t not in tables]
        if missing:
            raise StoreError(
                f"drill store {self.where}: no table {', '.join(missing)} (not a drill store, or never opened by a"
                " gateway)"
            )

    def _migrate(self, conn: Any) -> None:
        self._begin(conn)
        try:
            self._lock_migrations(conn)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION)"
            )
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                raise StoreError(f"drill store schema {current} is newer than this guardproxy ({SCHEMA_VERSION})")
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    conn.execute(statement.replace("{serial}", self.serial_type))
                conn.execute(
                    self._sql("INSERT INTO schema_version (version, applied) VALUES (?, ?)"), (version, time.time())
                )
                log.info("drill store: applied migration %d", version)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _purge(self, conn: Any, now: float) -> int:
        cutoff = now - self.retention_days * 86400
        cur = conn.execute(self._sql("DELETE FROM drills WHERE created < ?"), (cutoff,))
        n = max(int(cur.rowcount), 0)
        if n:
            log.info("drill store: retention removed %d drills older than %d days", n, self.retention_days)
        self.retention_removed += n
        return n

    # -- writes callers wait for ------------------------------------------------------------------------
    async def add_label(self, drill_id: str, label: str, note: str = "", reviewer: str = "") -> LabelEntry:
        if label not in LABELS:
            raise StoreError(f"unknown label {label!r}")
        created = time.time()

        def insert(c: Any) -> LabelEntry:
            row = c.execute(
                self._sql(
                    "INSERT INTO labels (drill_id, label, note, reviewer, created) VALUES (?, ?, ?, ?, ?) RETURNING id"
                ),
                (drill_id, label, note, reviewer, created),
            ).fetchone()
            return LabelEntry(int(row[0]), drill_id, label, note, reviewer, created)

        return await self._write_op(insert)

    async def purge(self, now: float | None = None) -> int:
        """Delete drills (and their labels) older than ``retention_days``."""
        return await self._write_op(lambda c: self._purge(c, time.time() if now is None else now))

    async def flush(self, wait_s: float = 30.0) -> None:
        """Wait until everything queued before this call has been written (or dropped)."""
        await self._write_op(lambda c: None, wait_s=wait_s, needs_connection=False)

    # -- reads ------------------------------------------------------------------------------------------
    @contextmanager
    def _reader(self) -> Iterator[Any]:
        conn = self._connect(write=False)
        try:
            yield conn
        finally:
            conn.close()

    async def _read(self, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            try:
                with self._reader() as conn:
                    return fn(conn)
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"drill store read failed: {one_line(exc)}") from exc

        return await asyncio.to_thread(run)

    def _labels_for(self, conn: Any, ids: Sequence[str]) -> dict[str, list[LabelEntry]]:
        out: dict[str, list[LabelEntry]] = {i: [] for i in ids}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ", ".join("?" * len(chunk))
            rows = conn.execute(
                self._sql(
                    "SELECT id, drill_id, label, note, reviewer, created FROM labels"
                    f" WHERE drill_id IN ({marks}) ORDER BY id"
                ),
                chunk,
            ).fetchall()
            for r in rows:
                out[r[1]].append(LabelEntry(int(r[0]), r[1], r[2], r[3], r[4], float(r[5])))
        return out

    def _query(self, conn: Any, where: str, params: Sequence[Any], tail: str) -> list[StoredDrill]:
        rows = conn.execute(self._sql(f"SELECT {COLUMNS} FROM drills{where} {tail}"), list(params)).fetchall()
        records = [record_from_row(r) for r in rows]
        labels = self._labels_for(conn, [r.id for r in records])
        return [StoredDrill(r, tuple(labels[r.id])) for r in records]

    async def get(self, drill_id: str) -> StoredDrill | None:
        found = await self._read(lambda c: self._query(c, " WHERE id = ?", [drill_id], ""))
        return found[0] if found else None

    async def find(self, f: DrillFilter = ANY_DRILL, *, limit: int = 50, offset: int = 0) -> list[StoredDrill]:
        where, params = filter_sql(f, self.shadow_decision_sql)
        tail = "ORDER BY created DESC, id DESC LIMIT ? OFFSET ?"
        return await self._read(lambda c: self._query(c, where, [*params, limit, offset], tail))

    async def count(self, f: DrillFilter = ANY_DRILL) -> int:
        where, params = filter_sql(f, self.shadow_decision_sql)
        return await self._read(
            lambda c: int(c.execute(self._sql(f"SELECT count(*) FROM drills{where}"), params).fetchone()[0])
        )

    async def neighbours(self, drill: DrillRecord, f: DrillFilter = ANY_DRILL) -> tuple[str | None, str | None]:
        """(newer, older) drill ids around ``drill`` in queue order, under the same filter."""
        where, params = filter_sql(f, self.shadow_decision_sql)
        joiner = " AND " if where else " WHERE "

        def run(c: Any) -> tuple[str | None, str | None]:
            # row values compare (created, id) in one range both databases can walk on the (created, id) index
            newer = c.execute(
                self._sql(
                    f"SELECT id FROM drills{where}{joiner}(created, id) > (?, ?) ORDER BY created ASC, id ASC LIMIT 1"
                ),
                [*params, drill.created, drill.id],
            ).fetchone()
            older = c.execute(
                self._sql(
                    f"SELECT id FROM drills{where}{joiner}(created, id) < (?, ?) ORDER BY created DESC, id DESC LIMIT 1"
                ),
                [*params, drill.created, drill.id],
            ).fetchone()
            return (newer[0] if newer else None, older[0] if older else None)

        return await self._read(run)

    async def all_drills(self, *, reviewed_only: bool = False, chunk: int = 1000) -> list[StoredDrill]:
        """Every drill, oldest first (export, report)."""
        f = DrillFilter(reviewed=True if reviewed_only else None)
        where, params = filter_sql(f, self.shadow_decision_sql)

        def run(c: Any) -> list[StoredDrill]:
            out: list[StoredDrill] = []
            offset = 0
            while True:
                page = self._query(c, where, [*params, chunk, offset], "ORDER BY created ASC, id ASC LIMIT ? OFFSET ?")
                out += page
                if len(page) < chunk:
                    return out
                offset += chunk

        return await self._read(run)

    async def stats(self, limit: int = 20000) -> DrillStats:
        def run(c: Any) -> DrillStats:
            rows = c.execute(
                self._sql(
                    "SELECT created, active_action, harm, signals, shadows FROM drills ORDER BY created DESC LIMIT ?"
                ),
                [limit],
            ).fetchall()
            agreement: dict[str, dict[tuple[str, str], int]] = {}
            out_rows: list[tuple[float, str, float, float | None]] = []
            for created, action, harm, signals, shadows in rows:
                reply_harm = json.loads(signals).get("reply_harm")
                out_rows.append((float(created), action, float(harm), reply_harm))
                for d in json.loads(shadows):
                    cell = agreement.setdefault(str(d.get("policy")), {})
                    key = (action, str(d.get("action")))
                    cell[key] = cell.get(key, 0) + 1
            latest: dict[str, str] = {}
            for drill_id, label in c.execute("SELECT drill_id, label FROM labels ORDER BY id").fetchall():
                latest[drill_id] = label
            total = int(c.execute("SELECT count(*) FROM drills").fetchone()[0])
            return DrillStats(tuple(out_rows), agreement, dict(Tally(latest.values())), total)

        return await self._read(run)
