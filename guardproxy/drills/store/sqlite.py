"""SQLite drill store: the default, one file, WAL mode so reviewers read while the writer writes."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guardproxy.drills.store.base import DrillStore
from guardproxy.errors import StoreError


class SqliteStore(DrillStore):
    """``pragmas`` are applied to the writer connection (tests use ``max_page_count`` to fill the "disk")."""

    serial_type = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 1.0,
        pragmas: Mapping[str, int | str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.pragmas = dict(pragmas or {})

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    @property
    def where(self) -> str:
        return str(self.path)

    def _check_readable(self) -> None:
        if not self.path.is_file():  # connecting would create it
            raise StoreError(f"drill store {self.where}: no such database file")
        super()._check_readable()

    def _tables(self, conn: Any) -> set[str]:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}

    def _connect(self, *, write: bool) -> sqlite3.Connection:
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # The writer waits at most busy_timeout on a lock: a locked database drops samples, never stalls
        # the queue for long. Readers get a longer grace: a reviewer would rather wait than see an error.
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout if write else 5.0, isolation_level=None, check_same_thread=True
        )
        conn.execute("PRAGMA foreign_keys=ON")
        if write:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for name, value in self.pragmas.items():
                if not name.replace("_", "").isalnum():
                    raise ValueError(f"bad pragma name {name!r}")
                conn.execute(f"PRAGMA {name}={int(value) if isinstance(value, int) else repr(str(value))}")
        else:
            conn.execute("PRAGMA query_only=1")
        return conn

    def _sql(self, sql: str) -> str:
        return sql

    def _begin(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")  # take the write lock up front: no deadlock upgrading a read lock

    def _lock_migrations(self, conn: Any) -> None:
        pass  # BEGIN IMMEDIATE already serialises writers

    def _drop_reason(self, exc: BaseException) -> str:
        text = str(exc).lower()
        if "full" in text:
            return "disk_full"
        if "locked" in text or "busy" in text:
            return "locked"
        return "write_failed"
