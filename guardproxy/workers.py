"""The inference executor: up to ``n`` threads, and a job always goes to the lowest-numbered idle one.

``concurrent.futures.ThreadPoolExecutor`` hands a job to whichever idle thread wakes first, so once a burst has
started a second thread, one request's model calls alternate between threads and each finds the other's CPU cache
cold. On a 2-core machine that cost 1-5 ms at concurrency 1 with ``guard.workers = 2`` (``bench/RESULTS.md``, "Two
inference workers"), which is why one worker was the default. Here, at low load every job runs on thread 0, as with
one worker; thread 1 takes a job only while thread 0 is busy, so under load both cores run the model.

Threads start on first use and are daemons: ``shutdown`` stops them; an executor nobody shut down does not hold up the
interpreter's exit.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import SimpleQueue
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class LowestIdleExecutor(Executor):
    """``n`` worker threads; ``submit`` runs a job on the lowest-numbered idle thread, or queues it (FIFO) for the
    first thread to finish when all are busy."""

    def __init__(self, n: int, thread_name_prefix: str = "worker") -> None:
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle = list(range(n))  # sorted: the lowest index is the first choice
        self._inboxes: list[SimpleQueue[_Item | None]] = [SimpleQueue() for _ in range(n)]
        self._threads: list[threading.Thread | None] = [None] * n
        self._backlog: deque[_Item] = deque()
        self._waiting = 0  # submitted, not yet started (in the backlog or handed to a thread)
        self._shut = False

    def queued(self) -> int:
        """Jobs submitted and not yet started."""
        with self._lock:
            return self._waiting

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        item: _Item = (future, fn, args, kwargs)
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._waiting += 1
            if not self._idle:
                self._backlog.append(item)
                return future
            i = self._idle.pop(0)
            if self._threads[i] is None:
                thread = threading.Thread(target=self._work, args=(i,), name=f"{self._prefix}_{i}", daemon=True)
                self._threads[i] = thread
                thread.start()
            self._inboxes[i].put(item)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; queued ones still run unless ``cancel_futures``; ``wait``: until every thread has stopped."""
        with self._lock:
            self._shut = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
                    self._waiting -= 1
            started = [(i, t) for i, t in enumerate(self._threads) if t is not None]
            for i, _ in started:
                self._inboxes[i].put(None)  # read after the thread's current job and the backlog
        if wait:
            for _, thread in started:
                if thread is not threading.current_thread():
                    thread.join()

    def _work(self, i: int) -> None:
        inbox = self._inboxes[i]
        item = inbox.get()
        while item is not None:
            future, fn, args, kwargs = item
            with self._lock:
                self._waiting -= 1
            ran = future.set_running_or_notify_cancel()
            result: Any = None
            error: BaseException | None = None
            if ran:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # the future carries it to the caller, as ThreadPoolExecutor does
                    error = exc
            # Back on the idle list before the caller hears of the result: the caller's next job (a request's
            # window or reply check follows its turn check) then finds this thread idle and runs here again.
            with self._lock:
                item = self._backlog.popleft() if self._backlog else None
                if item is None:
                    bisect.insort(self._idle, i)
            if ran and error is not None:
                future.set_exception(error)
            elif ran:
                future.set_result(result)
            if item is None:
                item = inbox.get()
