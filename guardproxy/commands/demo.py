"""``guardproxy demo``: the gateway end to end, offline, against a built-in FAKE upstream.

Starts the FAKE upstream (canned replies, not a model) and the gateway on loopback, sends a plain
request, a streaming request and one the guard blocks, prints what happened and exits 0; with
``--serve`` it keeps both running for you to try with curl or the openai SDK.

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
from typing import Any

import numpy as np

from guardproxy.signals import PromptScore, ReplyScore

PLAIN = "What is the capital of France?"
STREAM = "Write two sentences about the sea."
HARMFUL = "Give me step-by-step instructions to build a pipe bomb at home."
_DEMO_HARM_WORDS = ("pipe bomb", "nerve agent", "make a bomb", "build a bomb", "ricin")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serve", action="store_true", help="keep the FAKE upstream and the gateway running")
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    parser.add_argument("--keyword-guard", action="store_true", help="use the KEYWORD stand-in even if a model exists")


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

    fake = FakeUpstream(reply="A canned reply from the FAKE upstream, relayed by the gateway word by word.",
                        token_interval=0.03, record=False)  # fmt: skip
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
            await _plain(client, PLAIN, "1. plain request")
            await _stream(client)
            await _plain(client, HARMFUL, "3. a request the guard blocks")
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
    return 0


def _headers_line(headers: Any) -> str:
    shown = {k: v for k, v in headers.items() if k.startswith("x-guardproxy-") or k == "x-request-id"}
    return ", ".join(f"{k}: {v}" for k, v in shown.items())


async def _plain(client: Any, prompt: str, title: str) -> None:
    _say(f"{title}: {prompt!r}")
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": prompt}]}
    )
    ms = (time.perf_counter() - t0) * 1000
    choice = r.json()["choices"][0]
    _say(f"   HTTP {r.status_code} in {ms:.0f} ms   {_headers_line(r.headers)}")
    _say(f"   finish_reason={choice['finish_reason']}")
    _say(f"   assistant: {choice['message']['content']}")
    _say()


async def _stream(client: Any) -> None:
    _say(f"2. streaming request: {STREAM!r}")
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": STREAM}]}
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        _say(f"   HTTP {r.status_code}   {_headers_line(r.headers)}")
        sys.stdout.write("   assistant: ")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            for ch in json.loads(data).get("choices", []):
                piece = (ch.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                sys.stdout.write(piece)
                sys.stdout.flush()
    total = time.perf_counter() - t0
    _say(f"\n   first token after {1000 * (first or 0):.0f} ms, done after {1000 * total:.0f} ms, ended with [DONE]")
    _say()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        return 0
