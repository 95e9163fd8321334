"""Drill stores: ``open_store(url)`` picks SQLite (``sqlite:///path``) or PostgreSQL (``postgresql://...``).

A ``?schema=NAME`` query parameter on a PostgreSQL URL puts the tables in that schema (created if
missing, except by a store opened ``read_only=True``, which creates nothing); the rest of the URL goes to
psycopg unchanged.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from guardproxy.drills.store.base import DrillFilter, DrillStats, DrillStore, LabelEntry, StoredDrill
from guardproxy.errors import ConfigError

__all__ = ["DrillFilter", "DrillStats", "DrillStore", "LabelEntry", "StoredDrill", "open_store"]


def open_store(url: str, **kwargs: Any) -> DrillStore:
    """Build (not yet open) the store at ``url``; ``kwargs`` go to the store (redactor, queue_size, read_only, ...).

    ``read_only=True`` is for commands that only read (export, report, policy compare): ``open`` starts no writer,
    runs no migration, creates no schema, and a missing schema, table or database is one line naming it."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from guardproxy.drills.store.sqlite import SqliteStore

        # sqlite:///relative.db and sqlite:////absolute/path.db, as SQLAlchemy spells them
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path:
            raise ConfigError(f"drill store URL {url!r}: use sqlite:///relative/path or sqlite:////absolute/path")
        return SqliteStore(path, **kwargs)
    if parts.scheme in ("postgresql", "postgres"):
        from guardproxy.drills.store.postgres import PostgresStore

        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in query if k == "schema"), None)
        rest = urlencode([(k, v) for k, v in query if k != "schema"])
        clean = urlunsplit(("postgresql", parts.netloc, parts.path, rest, parts.fragment))
        return PostgresStore(clean, schema=schema, **kwargs)
    raise ConfigError(f"drill store URL {redact_url(url)!r}: expected sqlite:///path or postgresql://...")


def redact_url(url: str) -> str:
    """The URL without its password, for logs and pages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
