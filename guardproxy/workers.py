"""The inference executor: up to ``n`` threads, and a job always goes to the lowest-numbered idle one.

``concurrent.futures.ThreadPoolExecutor`` hands a job to whichever idle thread wakes first, so once a burst has
started a second thread, one request's model calls alternate between threads and each finds the other's CPU cache
cold. On a 2-core machine that cost 1-5 ms at concurrency 1 with ``guard.workers = 2`` (``bench/RESULTS.md``, "Two
inference workers"), which is why one worker was the default. Here, at low load every job runs on thread 0, as with
one worker; thread 1 takes a job only while thread 0 is busy, so under load both cores run the model.

Heavy jobs (``submit_heavy``: a call with many texts or long ones) wait in a backlog of their own, and a thread that
frees takes the waiting light jobs first. A heavy job that is running calls ``run_light`` between its model passes,
which runs the light jobs waiting by then on its own thread before it goes on: two oversized requests that hold both
threads for seconds delay another tenant's one-pass check by a pass, not by their whole length (without this, that
check timed out waiting and the policy's ``on_classifier_failure`` decided it: a red-team walkthrough, 2026-12-08).

Threads start on first use and are daemons: ``shutdown`` stops them; an executor nobody shut down does not hold up the
interpreter's exit.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from queue import SimpleQueue
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_local = threading.local()  # per worker thread: whether the job it runs is heavy, and whether it runs light ones now


class LowestIdleExecutor(Executor):
    """``n`` worker threads; ``submit`` runs a job on the lowest-numbered idle thread, or queues it (FIFO) for the
    first thread to finish when all are busy. ``submit_heavy`` queues behind every light job, and the heavy job
    lets waiting light ones run between its passes (``run_light``)."""

    def __init__(self, n: int, thread_name_prefix: str = "worker") -> None:
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._idle = list(range(n))  # sorted: the lowest index is the first choice
        self._inboxes: list[SimpleQueue[_Item | None]] = [SimpleQueue() for _ in range(n)]
        self._threads: list[threading.Thread | None] = [None] * n
        self._backlog: deque[_Item] = deque()
        self._heavy_backlog: deque[_Item] = deque()
        self._waiting = 0  # submitted, not yet started (in the backlog or handed to a thread)
        self._shut = False

    def queued(self) -> int:
        """Jobs submitted and not yet started."""
        with self._lock:
            return self._waiting

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return self._submit(False, fn, args, kwargs)

    def submit_heavy(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """``submit`` for a long job: it waits behind every light job, and should call ``run_light`` between its
        steps."""
        return self._submit(True, fn, args, kwargs)

    def _submit(self, heavy: bool, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[T]:
        future: Future[T] = Future()
        item: _Item = (future, _heavy(fn) if heavy else fn, args, kwargs)
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._waiting += 1
            if not self._idle:
                (self._heavy_backlog if heavy else self._backlog).append(item)
                return future
            i = self._idle.pop(0)
            if self._threads[i] is None:
                thread = threading.Thread(target=self._work, args=(i,), name=f"{self._prefix}_{i}", daemon=True)
                self._threads[i] = thread
                thread.start()
            self._inboxes[i].put(item)
        return future

    def run_light(self) -> int:
        """Called by a heavy job on its worker thread: run the light jobs waiting now, here, then return (how many
        ran). A no-op anywhere else (a light job, a light job run here, another thread)."""
        if not getattr(_local, "heavy", False) or getattr(_local, "lending", False):
            return 0
        ran = 0
        _local.lending = True
        try:
            while True:
                with self._lock:
                    if not self._backlog:
                        return ran
                    item = self._backlog.popleft()
                    self._waiting -= 1
                _run(item)
                ran += 1
        finally:
            _local.lending = False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; queued ones still run unless ``cancel_futures``; ``wait``: until every thread has stopped."""
        with self._lock:
            self._shut = True
            if cancel_futures:
                for backlog in (self._backlog, self._heavy_backlog):
                    while backlog:
                        backlog.popleft()[0].cancel()
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
            with self._lock:
                self._waiting -= 1
            future, settle = _call(item)
            # Back on the idle list before the caller hears of the result: the caller's next job (a request's
            # window or reply check follows its turn check) then finds this thread idle and runs here again.
            with self._lock:
                backlog = self._backlog or self._heavy_backlog
                item = backlog.popleft() if backlog else None
                if item is None:
                    bisect.insort(self._idle, i)
            settle()
            if item is None:
                item = inbox.get()


def _heavy(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run with this thread marked as running a heavy job (``LowestIdleExecutor.run_light``)."""

    def marked(*args: Any, **kwargs: Any) -> T:
        _local.heavy = True
        try:
            return fn(*args, **kwargs)
        finally:
            _local.heavy = False

    return marked


def _call(item: _Item) -> tuple[Future[Any], Callable[[], None]]:
    """Run ``item``'s job if its future was not cancelled; returns the future and what settles it (the caller hears
    of the result when that runs)."""
    future, fn, args, kwargs = item
    if not future.set_running_or_notify_cancel():
        return future, lambda: None
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the future carries it to the caller, as ThreadPoolExecutor does
        return future, functools.partial(future.set_exception, exc)
    return future, functools.partial(future.set_result, result)


def _run(item: _Item) -> None:
    """Run ``item`` and settle its future at once."""
    _call(item)[1]()
