"""Shared by the gateway tests: a FAKE upstream and the gateway, both real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest_asyncio
from starlette.applications import Starlette

from guardproxy.app import create_app
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.pipeline import Check, Exchange, Pipeline, Verdict
from guardproxy.settings import Settings
from tests.servers import serve

CHAT = "/v1/chat/completions"
HELLO = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class Env:
    fake: FakeUpstream
    upstream_url: str
    url: str
    client: httpx.AsyncClient
    app: Starlette

    @property
    def pipeline(self) -> Pipeline:
        pipeline: Pipeline = self.app.state.pipeline
        return pipeline


Headers = dict[str, str]
Answer = tuple[int, list[tuple[str, str]], list[bytes]]  # status, headers, body chunks


def _no_answer(headers: Headers) -> Answer:
    raise AssertionError("Canned.answer was not set")


@dataclass
class Canned:
    """A FAKE upstream for one-off replies: ``answer(request headers)`` gives each response (status, headers and
    the body's chunks, each its own write); the headers of every request are kept in ``seen``."""

    answer: Callable[[Headers], Answer] = _no_answer
    seen: list[Headers] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(headers)
        status, extra, chunks = self.answer(headers)
        raw = [(k.encode(), v.encode()) for k, v in extra]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def canned_gateway(**sections: dict[str, Any]) -> AsyncIterator[tuple[Env, Canned]]:
    """The gateway in front of a ``Canned`` upstream."""
    canned = Canned()
    async with serve(canned) as url, gateway(upstream_url=url, **sections) as env:
        yield env, canned


def settings_for(upstream_url: str, **sections: dict[str, Any]) -> Settings:
    merged: dict[str, Any] = {"guard": {"enabled": False}, **sections}
    merged["upstream"] = {"base_url": upstream_url + "/v1", **sections.get("upstream", {})}
    return Settings(**merged)


@asynccontextmanager
async def gateway(
    fake: FakeUpstream | None = None,
    *,
    checks: Sequence[Check] = (),
    output_check_chars: int = 256,
    upstream_url: str | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[Env]:
    """The gateway in front of a FAKE upstream (or ``upstream_url``), with a client pointed at it."""
    fake = fake or FakeUpstream()
    async with serve(fake) as fake_url:
        settings = settings_for(upstream_url or fake_url, **sections)
        app = create_app(settings, pipeline=Pipeline(checks, output_check_chars=output_check_chars))
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            yield Env(fake, fake_url, url, client, app)


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 30.0) -> None:
    """Poll ``/readyz`` of a gateway process started by the test until it answers 200; fail loudly if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway was not ready within {timeout_s} s")


def sse_events(text: str) -> list[Any]:
    """The data of each event of an SSE body, JSON-decoded where it is JSON."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        lines = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if lines:
            data = "\n".join(lines)
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(events: list[Any], choice: int = 0) -> str:
    text = ""
    for ev in events:
        if isinstance(ev, dict):
            for ch in ev.get("choices", []):
                if ch.get("index", 0) == choice:
                    text += ch.get("delta", {}).get("content") or ""
    return text


class ScriptedCheck:
    """A fake of the Check interface: verdicts by rule, and a record of every call."""

    name = "scripted"

    def __init__(
        self,
        *,
        input_verdict: Verdict | None = None,
        block_output_on: str | None = None,
        output_verdict: Verdict | None = None,
        retry_note_on: str | None = None,
        input_delay: float = 0.0,
    ) -> None:
        self.input_verdict = input_verdict or Verdict()
        self.block_output_on = block_output_on
        self.output_verdict = output_verdict or Verdict()
        self.retry_note_on = retry_note_on
        self.input_delay = input_delay
        self.inputs: list[Exchange] = []
        self.outputs: list[tuple[int, str, bool]] = []
        self.finished: list[Exchange] = []
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def check_input(self, exchange: Exchange) -> Verdict:
        import asyncio

        self.inputs.append(exchange)
        if self.input_delay:
            await asyncio.sleep(self.input_delay)
        return self.input_verdict

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict:
        self.outputs.append((choice, text, final))
        reasoning = exchange.reply_reasoning.get(choice, "")
        if self.block_output_on is not None and (self.block_output_on in text or self.block_output_on in reasoning):
            return self.output_verdict
        if self.retry_note_on is not None and self.retry_note_on in text:
            return Verdict(retry_note="Please answer the question helpfully.")
        return Verdict()

    async def finish(self, exchange: Exchange) -> None:
        self.finished.append(exchange)

    async def aclose(self) -> None:
        self.closed = True


# A gateway shared by the tests of one module (starting and stopping two servers per test costs ~0.5 s).
# Modules using it set ``pytestmark = pytest.mark.asyncio(loop_scope="module")``; each test gets it reset:
# FAKE upstream back to its defaults, no checks (a passthrough), default check step. A test that needs
# checks sets ``env.pipeline.checks``; tests that need other settings start their own gateway.


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_env() -> AsyncIterator[Env]:
    async with gateway() as env:
        yield env


@pytest_asyncio.fixture(loop_scope="module")
async def env(shared_env: Env) -> Env:
    shared_env.fake.reset()
    shared_env.pipeline.checks = []
    shared_env.pipeline.output_check_chars = 256
    shared_env.client.cookies.clear()
    return shared_env
