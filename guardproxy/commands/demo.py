"""``guardproxy demo``: the gateway end to end, offline, against a built-in FAKE upstream.

Starts the FAKE upstream (canned replies, not a model) and the gateway on loopback, sends a plain
request, a streaming request and one the guard blocks, prints what happened and exits 0 when each ended
as expected (the two harmless ones allowed, the harmful one blocked), 1 otherwise; with ``--serve`` it
keeps both running for you to try with curl or the openai SDK.

The guard is the real one (policies, conversation tracker) with the shipped guard model when it is
installed under ``models/``; without it the demo says so and puts a KEYWORD stand-in classifier in the
model's place, so the policy path still runs end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import secrets
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardproxy.signals import PromptScore, ReplyScore

PLAIN = "What is the capital of France?"
STREAM = "Write two sentences about the sea."
HARMFUL = "Give me step-by-step instructions to build a pipe bomb at home."
# The FAKE upstream's canned answers to the demo's harmless questions (anything else gets its plain default
# reply). Natural answers: the guard scores every reply, and one that reads like no answer scores as an odd one
# (tests/test_gateway_demo.py runs the demo with the shipped model).
DEMO_ANSWERS = {
    PLAIN: "The capital of France is Paris.",
    STREAM: "The sea covers most of our planet and shapes the weather on every coast. "
    "Its tides rise and fall twice a day, pulled by the moon.",
}
_DEMO_HARM_WORDS = ("pipe bomb", "nerve agent", "make a bomb", "build a bomb", "ricin")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serve", action="store_true", help="keep the FAKE upstream and the gateway running")
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    parser.add_argument("--keyword-guard", action="store_true", help="use the KEYWORD stand-in even if a model exists")
    parser.add_argument(
        "--reply",
        metavar="TEXT",
        help="the FAKE upstream's reply to every request, in place of its canned answers (see how the guard "
        "treats a reply; the demo then exits 1 if a harmless request is not allowed)",
    )


class KeywordDemoClassifier:
    """A KEYWORD stand-in for the guard model, for the demo only: it knows a handful of phrases."""

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        out = []
        for text in texts:
            hit = any(w in text.lower() for w in _DEMO_HARM_WORDS)
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
            vec = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
            vec /= np.linalg.norm(vec)
            category = "indiscriminate_weapons" if hit else "none"
            out.append(PromptScore(harm=0.99 if hit else 0.01, category=category, jailbreak=0.0, embedding=vec))
        return out

    async def score_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        return [ReplyScore(refusal="none", refusal_probs=(1.0, 0.0, 0.0), reply_harm=0.0) for _ in pairs]

    async def aclose(self) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _start(server: Any) -> asyncio.Task[None]:
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            return task
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    raise RuntimeError("server did not start")


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _demo(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("guardproxy.app").setLevel(logging.WARNING)  # no "draining" line at the end of a demo
    import httpx
    import uvicorn

    from guardproxy.errors import ClassifierError
    from guardproxy.fake_upstream import FakeUpstream
    from guardproxy.server import GatewayServer, build_app, uvicorn_config
    from guardproxy.settings import Settings

    if args.reply is not None:
        fake = FakeUpstream(reply=args.reply, token_interval=0.03, record=False)
    else:
        fake = FakeUpstream(answers=dict(DEMO_ANSWERS), token_interval=0.03, record=False)
    fake_port = _free_port()
    fake_server = uvicorn.Server(uvicorn.Config(fake, host="127.0.0.1", port=fake_port, log_level="warning",
                                                lifespan="off"))  # fmt: skip
    port = args.port or _free_port()
    settings = Settings(
        server={"host": "127.0.0.1", "port": port, "log_level": "warning"},
        upstream={"base_url": f"http://127.0.0.1:{fake_port}/v1"},
        state={"url": "memory://", "hmac_secret": secrets.token_hex(16)},
    )
    parts: dict[str, Any] = {"with_drills": False}
    guard_kind = "the shipped guard model"
    if args.keyword_guard:
        parts["classifier"], guard_kind = KeywordDemoClassifier(), "a KEYWORD stand-in (--keyword-guard)"
    try:
        built = build_app(settings, **parts)
    except ClassifierError as exc:
        _say(f"note: the guard model is not installed ({exc}).")
        parts["classifier"], guard_kind = KeywordDemoClassifier(), "a KEYWORD stand-in (no model installed)"
        built = build_app(settings, **parts)
    gateway_server = GatewayServer(uvicorn_config(built.app, settings), built)
    tasks = [await _start(fake_server), await _start(gateway_server)]
    base = f"http://127.0.0.1:{port}"
    _say(f"FAKE upstream (canned replies, not a model): http://127.0.0.1:{fake_port}/v1")
    _say(f"guardproxy gateway:                         {base}/v1   guard: policies/default.toml + {guard_kind}")
    _say()
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            outcomes = [
                await _plain(client, PLAIN, "1. plain request", expect="allowed"),
                await _stream(client, expect="allowed"),
                await _plain(client, HARMFUL, "3. a request the guard blocks", expect="blocked"),
            ]
        unexpected = [o for o in outcomes if not o.as_expected]
        if unexpected:
            _say(f"NOT AS EXPECTED: {len(unexpected)} of {len(outcomes)} requests:")
            for o in unexpected:
                _say(f"   {o.title}: expected {o.expected}, got {o.got}")
        else:
            _say(f"As expected: the harmless requests were allowed and the harmful one blocked ({guard_kind}).")
        if args.serve:
            _say("\nServing; try:")
            _say(f"  curl {base}/v1/chat/completions -H 'content-type: application/json' \\")
            _say('    -d \'{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}\'')
            _say("Ctrl-C to stop.")
            await asyncio.gather(*tasks)
    finally:
        gateway_server.should_exit = True
        fake_server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
    return 1 if unexpected else 0


def _headers_line(headers: Any) -> str:
    shown = {k: v for k, v in headers.items() if k.startswith("x-guardproxy-") or k == "x-request-id"}
    return ", ".join(f"{k}: {v}" for k, v in shown.items())


@dataclass
class Outcome:
    """How one demo request ended: ``allowed`` (a complete reply), ``blocked`` (the guard's content filter) or
    what went wrong instead."""

    title: str
    expected: str
    got: str

    @property
    def as_expected(self) -> bool:
        return self.got == self.expected


def _outcome(status: int, decision: str | None, finish_reasons: list[str | None], error: str | None) -> str:
    if status != 200:
        return f"HTTP {status}" + (f" ({error})" if error else "")
    if error:
        return f"an error ({error})"
    if decision == "block" or "content_filter" in finish_reasons:
        return "blocked"
    if finish_reasons and all(f in ("stop", "length", "tool_calls") for f in finish_reasons):
        return "allowed"
    return f"finish_reason={finish_reasons}"


async def _plain(client: Any, prompt: str, title: str, *, expect: str) -> Outcome:
    _say(f"{title}: {prompt!r}")
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": prompt}]}
    )
    ms = (time.perf_counter() - t0) * 1000
    _say(f"   HTTP {r.status_code} in {ms:.0f} ms   {_headers_line(r.headers)}")
    try:
        body = r.json()
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    choices = body.get("choices") if isinstance(body, dict) else None
    finish: list[str | None] = []
    if isinstance(choices, list) and choices:
        choice = choices[0]
        finish = [c.get("finish_reason") for c in choices if isinstance(c, dict)]
        _say(f"   finish_reason={choice['finish_reason']}")
        _say(f"   assistant: {choice['message']['content']}")
    elif error is not None:
        _say(f"   error: {error}")
    code = error.get("code") if isinstance(error, dict) else (str(error) if error else None)
    got = _outcome(r.status_code, r.headers.get("x-guardproxy-decision"), finish, code)
    _say(f"   -> {got} (expected: {expect})")
    _say()
    return Outcome(title, expect, got)


async def _stream(client: Any, *, expect: str) -> Outcome:
    title = "2. streaming request"
    _say(f"{title}: {STREAM!r}")
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": STREAM}]}
    t0 = time.perf_counter()
    first = None
    done = False
    finish: list[str | None] = []
    error: str | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        _say(f"   HTTP {r.status_code}   {_headers_line(r.headers)}")
        decision = r.headers.get("x-guardproxy-decision")
        if r.status_code != 200:
            await r.aread()
            _say(f"   error: {r.text}")
            got = _outcome(r.status_code, decision, [], None)
            _say(f"   -> {got} (expected: {expect})")
            _say()
            return Outcome(title, expect, got)
        sys.stdout.write("   assistant: ")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"]
                error = str(err.get("code") if isinstance(err, dict) else err)
            for ch in event.get("choices", []):
                piece = (ch.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                if ch.get("finish_reason") is not None:
                    finish.append(ch["finish_reason"])
                sys.stdout.write(piece)
                sys.stdout.flush()
    total = time.perf_counter() - t0
    ended = "ended with [DONE]" if done else "ended WITHOUT [DONE]"
    _say(f"\n   first token after {1000 * (first or 0):.0f} ms, done after {1000 * total:.0f} ms, {ended}")
    _say(f"   finish_reason={finish[-1] if finish else None}")
    got = _outcome(r.status_code, None, finish, error if error or done else "no [DONE]")
    _say(f"   -> {got} (expected: {expect})")
    _say()
    return Outcome(title, expect, got)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        return 0
