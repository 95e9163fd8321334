"""A deadline on the writer thread's database calls, enforced on the client.

A database server that accepts a connection and never answers (a hung process, a stalled network path) holds
a blocking call for ever: the server's own ``statement_timeout`` never fires, and TCP keepalives are answered
by the kernel of a host whose database is hung. ``Watchdog`` is one thread per store: ``bound(conn, seconds)``
arms it around a call, and past the deadline it calls ``interrupt(conn)`` (the store's dialect hook), which
breaks the connection so the blocked call raises at once. ``expire()`` breaks the call under way now (a store
that is closing and cannot wait any longer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class Expired(Exception):
    """The call was broken off at its deadline (the connection is unusable)."""


class Watchdog:
    def __init__(self, interrupt: Callable[[Any], None], *, name: str = "drill-watchdog") -> None:
        self._interrupt = interrupt
        self._cond = threading.Condition()
        self._armed: tuple[int, Any, float] | None = None  # (call number, connection, monotonic deadline)
        self._calls = 0
        self._fired: int | None = None  # the call number the watchdog broke off
        self._forced: int | None = None  # the call number ``expire`` broke off
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @contextmanager
    def bound(self, conn: Any, seconds: float) -> Iterator[None]:
        """Run the body with ``conn`` broken off after ``seconds``. Raises ``Expired`` (from the driver's error)
        when the deadline broke it; also when the body finished just as it did, since the connection is then
        unusable although the call went through."""
        with self._cond:
            self._calls += 1
            call = self._calls
            self._armed = (call, conn, time.monotonic() + seconds)
            self._cond.notify()
        try:
            yield
        except BaseException as exc:
            if self._disarm(call) and isinstance(exc, Exception):
                raise Expired(self._why(call, seconds)) from exc
            raise
        if self._disarm(call):
            raise Expired(self._why(call, seconds))

    def _why(self, call: int, seconds: float) -> str:
        return (
            "broken off: the store is closing"
            if self._forced == call
            else f"no answer from the database within {seconds:g} s"
        )

    def _disarm(self, call: int) -> bool:
        """Whether the watchdog broke off ``call``. Under the lock: once this returns, it cannot fire for it."""
        with self._cond:
            if self._armed is not None and self._armed[0] == call:
                self._armed = None
            return self._fired == call

    def expire(self) -> None:
        """Break off the call under way now, if there is one."""
        with self._cond:
            if self._armed is not None:
                call, conn, _ = self._armed
                self._armed = (call, conn, 0.0)
                self._forced = call
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=1.0)

    def _main(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._armed is None:
                    self._cond.wait()
                    continue
                call, conn, at = self._armed
                left = at - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                # Under the lock, so the call cannot end and its connection be reused in between.
                self._armed = None
                self._fired = call
                try:
                    self._interrupt(conn)
                except Exception as exc:  # a connection already closed: the call is failing by itself
                    log.debug("drill store: interrupting a database call failed: %s", exc)
