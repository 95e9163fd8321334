"""The inference executor: jobs go to the lowest-numbered idle thread, the rest wait in order."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from guardproxy.workers import LowestIdleExecutor


def _name() -> str:
    return threading.current_thread().name


def _hold(pool: LowestIdleExecutor) -> tuple[threading.Event, Future[None]]:
    """Keep ``pool``'s first thread busy until the returned gate is set: (gate, the busy job)."""
    gate, started = threading.Event(), threading.Event()

    def held() -> None:
        started.set()
        assert gate.wait(10)

    busy = pool.submit(held)
    assert started.wait(10)
    return gate, busy


def test_jobs_one_after_another_all_run_on_the_first_thread() -> None:
    pool = LowestIdleExecutor(2, thread_name_prefix="t")
    try:
        names = [pool.submit(_name).result(timeout=10) for _ in range(20)]
    finally:
        pool.shutdown()
    assert set(names) == {"t_0"}
    assert [t for t in threading.enumerate() if t.name == "t_1"] == []  # the second thread never started


def test_a_second_thread_takes_work_only_while_the_first_is_busy_and_the_backlog_runs_in_order() -> None:
    pool = LowestIdleExecutor(2, thread_name_prefix="b")
    gate, started = threading.Event(), threading.Semaphore(0)
    order: list[str] = []

    def held() -> str:
        started.release()
        assert gate.wait(10)
        return _name()

    def note(tag: str) -> str:
        order.append(tag)
        return _name()

    try:
        first = pool.submit(held)
        assert started.acquire(timeout=10)
        second = pool.submit(held)  # thread 0 is busy: thread 1 takes it (and waits at the same gate)
        assert started.acquire(timeout=10)
        third, fourth = pool.submit(note, "third"), pool.submit(note, "fourth")
        assert pool.queued() == 2  # both threads are busy: these two wait
        assert not third.done()
        gate.set()
        assert (first.result(10), second.result(10)) == ("b_0", "b_1")
        assert third.result(10) in ("b_0", "b_1") and fourth.result(10) in ("b_0", "b_1")
        assert order == ["third", "fourth"]
        assert pool.queued() == 0
        # idle again: the next job goes back to thread 0
        assert pool.submit(_name).result(10) == "b_0"
    finally:
        gate.set()
        pool.shutdown()


def test_a_job_that_raises_fails_its_future_and_the_thread_goes_on() -> None:
    pool = LowestIdleExecutor(1)
    try:
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 // 0).result(10)
        assert pool.submit(lambda: 41 + 1).result(10) == 42
    finally:
        pool.shutdown()


def test_shutdown_cancels_the_backlog_on_request_and_refuses_new_work() -> None:
    pool = LowestIdleExecutor(1, thread_name_prefix="s")
    gate, started = threading.Event(), threading.Event()

    def held() -> int:
        started.set()
        assert gate.wait(10)
        return 1

    running = pool.submit(held)
    assert started.wait(10)
    waiting = pool.submit(lambda: 2)
    threading.Timer(0.2, gate.set).start()
    pool.shutdown(wait=True, cancel_futures=True)  # returns once the running job is done and the thread stopped
    assert running.result(0) == 1
    assert waiting.cancelled()
    assert [t for t in threading.enumerate() if t.name.startswith("s_")] == []
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: 3)


def test_shutdown_without_cancelling_runs_what_was_queued() -> None:
    pool = LowestIdleExecutor(1)
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    rest = [pool.submit(lambda i=i: i) for i in range(3)]
    gate.set()
    pool.shutdown(wait=True)
    assert first.result(0) is True
    assert [f.result(0) for f in rest] == [0, 1, 2]


def test_at_least_one_thread() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        LowestIdleExecutor(0)


def test_the_default_is_the_cpus_this_process_may_use_at_most_two(monkeypatch: pytest.MonkeyPatch) -> None:
    from guardproxy.settings import Settings, default_workers

    for cpus, expected in (({0}, 1), ({0, 1}, 2), (set(range(16)), 2)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, cpus=cpus: cpus, raising=False)
        assert default_workers() == expected
        assert Settings().guard.workers == expected
    monkeypatch.setenv("GUARDPROXY_GUARD__WORKERS", "1")
    assert Settings().guard.workers == 1  # the setting still wins


def test_many_submitters_at_once_every_job_runs_once_and_never_more_than_n_at_a_time() -> None:
    pool = LowestIdleExecutor(2)
    lock = threading.Lock()
    running, most, ran = 0, 0, []

    def job(k: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.0005)
        with lock:
            running -= 1
            ran.append(k)
        return k * k

    def submitter(base: int) -> list[int]:
        return [f.result(10) for f in [pool.submit(job, base + i) for i in range(150)]]

    try:
        with ThreadPoolExecutor(max_workers=8) as callers:
            results = list(callers.map(submitter, range(0, 8 * 150, 150)))
    finally:
        pool.shutdown()
    assert [r for rs in results for r in rs] == [k * k for k in range(8 * 150)]
    assert sorted(ran) == list(range(8 * 150))  # each job ran exactly once
    assert most == 2
    assert pool.queued() == 0


def test_a_running_heavy_job_lets_a_light_job_submitted_meanwhile_run_between_its_steps() -> None:
    pool = LowestIdleExecutor(1, thread_name_prefix="h")
    order: list[str] = []
    step, light_queued = threading.Event(), threading.Event()

    def heavy() -> int:
        order.append("heavy starts")
        step.set()
        assert light_queued.wait(10)
        ran = pool.run_light()  # between two of its passes
        order.append("heavy ends")
        return ran

    try:
        done = pool.submit_heavy(heavy)
        assert step.wait(10)
        light = pool.submit(lambda: order.append("light") or _name())
        assert pool.queued() == 1
        light_queued.set()
        assert done.result(10) == 1
        assert light.result(10) == "h_0"  # on the heavy job's own thread, before it ended
        assert order == ["heavy starts", "light", "heavy ends"]
        assert pool.queued() == 0
    finally:
        pool.shutdown()


def test_a_freed_thread_takes_waiting_light_jobs_before_heavy_ones_submitted_earlier() -> None:
    pool = LowestIdleExecutor(1)
    order: list[str] = []
    gate, first = _hold(pool)
    try:
        jobs = [pool.submit_heavy(order.append, "heavy"), pool.submit(order.append, "light")]
        gate.set()
        first.result(10)
        for job in jobs:
            job.result(10)
        assert order == ["light", "heavy"]
    finally:
        gate.set()
        pool.shutdown()


def test_run_light_does_nothing_outside_a_heavy_job() -> None:
    pool = LowestIdleExecutor(1)
    gate, first = _hold(pool)
    try:
        waiting = pool.submit(_name)
        # a light job, and a thread that is not the pool's, lend nothing: the waiting job stays queued
        assert pool.run_light() == 0
        assert pool.queued() == 1 and not waiting.done()
        gate.set()
        first.result(10)
        waiting.result(10)
    finally:
        gate.set()
        pool.shutdown()


def test_shutdown_cancels_waiting_heavy_jobs_too() -> None:
    pool = LowestIdleExecutor(1)
    gate, running = _hold(pool)
    heavy = pool.submit_heavy(_name)
    pool.shutdown(wait=False, cancel_futures=True)
    assert heavy.cancelled()
    assert pool.queued() == 0
    gate.set()
    assert running.result(10) is None
