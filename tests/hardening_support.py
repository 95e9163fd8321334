"""Shared by the hardening tests: the REAL gateway with the REAL guard (policies, conversation tracker, decision
log, drill store) in front of a FAKE upstream, with a scripted fake classifier injected through ``build_guard``.

Nothing of ours is patched: faults come from the fake classifier's script, from the fake upstream's fault
headers, and from loopback TCP proxies the tests own in front of the machine's Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from guardproxy.app import create_app
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.guard import GuardBundle, build_guard
from guardproxy.metrics import Metrics
from guardproxy.pipeline import Exchange, Verdict
from guardproxy.settings import Settings
from guardproxy.signals import PromptScore, ReplyScore
from tests.gateway_support import CHAT
from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
ADMIN = "admin-token-for-hardening-tests"
TERMINAL = {"ok", "blocked_input", "blocked_output", "upstream_error", "client_disconnected", "error", "shutdown"}


@dataclass
class FakeClassifier:
    """``signals.Classifier`` with a scripted failure mode, switchable between requests.

    ``ok``: every text is benign. ``raise``: every call raises. ``hang``: every call awaits forever (counts the
    cancellations it gets). ``hang_thread``: every call blocks a thread of a one-thread executor, as a stuck
    ONNX session would block the real classifier's one bounded executor (released by ``aclose``).
    """

    mode: str = "ok"
    calls: int = 0
    cancelled: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="fakeclf"))

    async def _maybe_fail(self) -> None:
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("scripted classifier failure")
        if self.mode == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.mode == "hang_thread":
            await asyncio.get_running_loop().run_in_executor(self.executor, self.release.wait, 30.0)
        elif self.mode != "ok":
            raise AssertionError(f"unknown mode {self.mode}")

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        await self._maybe_fail()
        return [PromptScore(0.02, "none", 0.0, np.zeros(4, dtype=np.float32)) for _ in texts]

    async def score_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        await self._maybe_fail()
        return [ReplyScore("none", (1.0, 0.0, 0.0), 0.0) for _ in pairs]

    async def aclose(self) -> None:
        self.release.set()
        self.executor.shutdown(wait=False)


class OutcomeTally:
    """A check after the guard (``pipeline.Check``): it allows everything and counts each finished exchange's
    outcome, keeping no exchange (the memory rows measure the gateway, not this tally)."""

    name = "outcome-tally"

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()

    async def start(self) -> None:
        pass

    async def check_input(self, exchange: Exchange) -> Verdict:
        return Verdict()

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict:
        return Verdict()

    async def finish(self, exchange: Exchange) -> None:
        self.outcomes[exchange.outcome] += 1

    async def aclose(self) -> None:
        pass

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values())

    def all_terminal(self) -> bool:
        return set(self.outcomes) <= TERMINAL


@dataclass
class Guarded:
    url: str
    client: httpx.AsyncClient
    fake: FakeUpstream
    bundle: GuardBundle
    settings: Settings
    tally: OutcomeTally  # a second check after the guard: it sees every exchange's final outcome
    metrics: Metrics
    app: Any


def guard_settings(tmp_path: Path, upstream_url: str, policy: str = "default", **sections: Any) -> Settings:
    merged: dict[str, Any] = {
        "upstream": {"base_url": upstream_url + "/v1"},
        "guard": {"timeout": 0.2},
        "policy": {"active": POLICIES / f"{policy}.toml", "decision_log": tmp_path / "decisions.jsonl"},
        # every exchange sampled, no hourly cap: each one must reach the store or be counted as dropped
        "drills": {
            "store": f"sqlite:///{tmp_path / 'drills.db'}",
            "sample_rate": 1.0,
            "per_tenant_hourly_cap": 100_000,
            "hourly_budget": 100_000,
        },
        "admin_token": ADMIN,
    }
    for key, value in sections.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    return Settings(**merged)


@asynccontextmanager
async def guarded(
    tmp_path: Path,
    classifier: FakeClassifier | None = None,
    policy: str = "default",
    *,
    guard_parts: dict[str, Any] | None = None,
    **sections: Any,
) -> AsyncIterator[Guarded]:
    """The full guarded gateway; on exit the app has shut down (decision log and drill store flushed)."""
    fake = FakeUpstream(record=False)
    async with serve(fake) as fake_url:
        settings = guard_settings(tmp_path, fake_url, policy, **sections)
        metrics = Metrics()
        bundle = build_guard(
            settings, classifier=classifier or FakeClassifier(), metrics=metrics, **(guard_parts or {})
        )
        tally = OutcomeTally()
        bundle.pipeline.checks.append(tally)
        app = create_app(settings, pipeline=bundle.pipeline, extra_routes=bundle.routes, metrics=metrics)
        limits = httpx.Limits(max_connections=100)
        # uvicorn closes a keep-alive connection idle for 5 s by default; the client's pool may hand that very
        # connection to a new request as it closes (a ReadError no gateway behaviour causes). The server keeps
        # idle connections longer than any test phase, so the race cannot occur.
        async with (
            serve(app, timeout_keep_alive=120) as url,
            httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as client,
        ):
            yield Guarded(url, client, fake, bundle, settings, tally, metrics, app)


def body(text: str = "hello", *, stream: bool = False) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], "stream": stream}


async def chat(g: Guarded, text: str = "hello", *, stream: bool = False, **headers: str) -> httpx.Response:
    return await g.client.post(CHAT, json=body(text, stream=stream), headers=headers)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle() -> None:
    """Let closed sockets and finished tasks go."""
    for _ in range(5):
        await asyncio.sleep(0.05)
