"""The bench's FAKE upstream: ``guardproxy.fake_upstream.FakeUpstream`` behind a stamping wrapper.

``StampedUpstream`` adds ``x-bench-upstream-ms`` to every response: the milliseconds from the moment the request
reached this process to the moment its response headers left. The fake sends a plain reply's body right after
its headers and a stream's first event right after its headers, so the stamp is the upstream's service time of
a plain reply and its time to first event of a stream. The gateway forwards response headers it does not own,
so the stamp reaches the client through the gateway too, and the client subtracts it from its own timing of the
same request.

A request may ask for its own time to first token with ``x-bench-ttft-ms``, and for its whole reply at once with
``x-bench-paced: 0`` (the throughput sweep and the conversation-length phase do both, so that they measure the
gateway, not the upstream's sleeps).

Run as a process: ``python -m guardproxy.benchmark.upstream --port 9000 --ttft-ms 50 --tokens-per-s 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
from collections.abc import Sequence
from typing import Any

from guardproxy.fake_upstream import FakeUpstream, Receive, Scope, Send

STAMP_HEADER = "x-bench-upstream-ms"
TTFT_HEADER = "x-bench-ttft-ms"
PACED_HEADER = "x-bench-paced"
_STAMP = STAMP_HEADER.encode()
_TTFT = TTFT_HEADER.encode()
_PACED = PACED_HEADER.encode()

# Reply text: ordinary prose, so that the output check reads something reply-like.
_REPLY_WORDS = (
    "Here is a short overview. The main idea is to start small, measure what matters, and change one thing at a "
    "time so that you can tell which change helped. Keep notes as you go, compare the results with a simple "
    "baseline, and ask for feedback early. If something looks surprising, check the inputs first; most surprises "
    "come from the data rather than the method. Let me know if you want a worked example or a checklist."
).split()


def reply_text(words: int) -> str:
    """A reply of ``words`` words (the canned prose repeated as needed)."""
    words = max(1, words)
    reps = -(-words // len(_REPLY_WORDS))
    return " ".join((_REPLY_WORDS * reps)[:words])


class StampedUpstream:
    """ASGI wrapper: optional per-request delay (time to first token), then the inner app (``paced``, or ``fast``
    when the request says ``x-bench-paced: 0``), with its service time stamped on the response headers."""

    def __init__(self, paced: Any, *, fast: Any = None, ttft: float = 0.0) -> None:
        self.paced = paced
        self.fast = fast if fast is not None else paced
        self.ttft = ttft

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.paced(scope, receive, send)
            return
        t0 = time.perf_counter()
        # the time to first token is a completion's: a GET (/v1/models, the bench's readiness check) answers at once
        delay = self.ttft if scope["method"] == "POST" else 0.0
        inner = self.paced
        for name, value in scope["headers"]:
            if name == _TTFT and scope["method"] == "POST":
                try:
                    delay = max(0.0, float(value) / 1000.0)
                except ValueError:
                    pass
            elif name == _PACED and value == b"0":
                inner = self.fast

        async def stamped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - t0) * 1000.0
                message = {**message, "headers": [*message.get("headers", []), (_STAMP, f"{ms:.3f}".encode())]}
            await send(message)

        if delay:
            await asyncio.sleep(delay)
        await inner(scope, receive, stamped)


def build(*, ttft_ms: float, tokens_per_s: float, reply_words: int) -> StampedUpstream:
    text = reply_text(reply_words)
    # record=False: a long bench must not keep every request in memory
    paced = FakeUpstream(reply=text, token_interval=1.0 / tokens_per_s if tokens_per_s > 0 else 0.0, record=False)
    fast = FakeUpstream(reply=text, record=False)
    return StampedUpstream(paced, fast=fast, ttft=ttft_ms / 1000.0)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="the bench's FAKE upstream (canned replies, not a model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--tokens-per-s", type=float, default=500.0, help="0: the whole reply at once")
    parser.add_argument("--reply-words", type=int, default=60)
    args = parser.parse_args(argv)
    app = build(ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s, reply_words=args.reply_words)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
