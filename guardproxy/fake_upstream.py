"""A FAKE OpenAI-compatible upstream, for tests, the demo and the benchmarks. It is not a model.

``FakeUpstream`` is a plain ASGI app. It answers ``/v1/chat/completions`` (JSON or SSE), ``/v1/models``,
``/v1/embeddings`` and echoes anything else, with a configurable time to first token, token rate and
reply text (one ``reply`` for every request, canned ``answers`` keyed by the last user turn, per-choice
``replies``, or a header ``x-fake-reply``; a reasoning model's ``reasoning`` before it; ``logprobs`` when the
request asks), and fault modes chosen per app (``fake.fault = "..."``) or per
request (header ``x-fake-fault``; the gateway forwards it). It records every request and every cancellation (the client
went away before the reply was complete) so tests can assert that the gateway really cut the upstream.
``python -m guardproxy.fake_upstream`` serves one, to put a gateway in front of offline (``--help``).

Fault modes: ``json`` / ``sse`` (normal), ``slow`` (long time to first byte), ``drip`` (the reply one
byte at a time), ``stall`` (the reply stops half-way), ``status_500``/``502``/``503``/``429``/``401``
(``429`` carries ``Retry-After: 7``; ``401`` echoes the key it was sent, as some upstreams do),
``reset_before_headers``, ``reset_mid_stream`` (a TCP reset half-way), ``error_in_stream``, ``never``
(accepts and never answers), ``no_done`` (every choice finishes, then the stream ends without ``[DONE]``),
``cut_clean`` (the stream ends cleanly half-way: no finish, no ``[DONE]``), ``gzip``, ``split_sse`` (CRLF,
comments and events split across tiny writes), ``oversized_event`` and ``invalid_json_sse``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Plain and harmless, read as an answer, so a gateway with the shipped guard model relays it (text that reads like
# no assistant reply can score as a harmful one; tests/test_gateway_demo.py scores this one). Tests match "FAKE".
DEFAULT_REPLY = (
    "Hello! I am the FAKE upstream, a stand-in for a real model, so my answers are canned. How can I help you today?"
)
_ERROR_EVENT = (
    b'data: {"error": {"message": "FAKE upstream failed mid-stream", '
    b'"type": "server_error", "code": "fake_stream"}}\n\n'
)
FAULTS = frozenset(
    {
        "json",
        "sse",
        "slow",
        "drip",
        "stall",
        "status_500",
        "status_502",
        "status_503",
        "status_429",
        "status_401",
        "reset_before_headers",
        "reset_mid_stream",
        "error_in_stream",
        "never",
        "no_done",
        "cut_clean",
        "gzip",
        "split_sse",
        "oversized_event",
        "invalid_json_sse",
    }
)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    fault: str
    cancelled: bool = False
    completed: bool = False
    sent_bytes: int = 0  # body bytes handed to the server so far (tests of backpressure)
    query: str = ""


@dataclass
class FakeUpstream:
    """Configure by attribute between requests; per-request headers override ``fault`` and ``reply``."""

    reply: str = DEFAULT_REPLY
    replies: list[str] | None = None  # per-choice texts for n > 1 (cycled)
    # canned answers: the last user turn's text (exactly) -> the reply; before ``replies`` and ``reply``
    answers: dict[str, str] = field(default_factory=dict)
    tool_call: tuple[str, str] | None = None  # (function name, arguments): reply with a tool call instead
    # a reasoning model's thoughts, sent before the reply as ``reasoning_content`` (vLLM's reasoning parsers, DeepSeek)
    reasoning: str | None = None
    ttft: float = 0.0  # seconds before the first byte of the reply
    token_interval: float = 0.0  # seconds between streamed tokens
    fault: str | None = None  # None: json or sse, as the request asks
    slow_seconds: float = 30.0
    drip_interval: float = 0.05
    oversized_chars: int = 2 * 1024 * 1024
    record: bool = True
    set_cookie: str | None = None  # a Set-Cookie header on every chat reply (tests: no cookie jar in the gateway)
    extra_headers: list[tuple[str, str]] = field(default_factory=list)  # added to every plain chat reply
    requests: list[Recorded] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """Back to the defaults, records cleared (a test server shared by several tests)."""
        fresh = FakeUpstream()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    @property
    def cancellations(self) -> int:
        return sum(r.cancelled for r in self.requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        fault = headers.get("x-fake-fault") or self.fault
        rec = Recorded(scope["method"], scope["path"], headers, parsed, fault or "")
        rec.query = scope.get("query_string", b"").decode("latin-1")
        if self.record:
            self.requests.append(rec)

        # Watch for the client going away while we answer: that is the cancellation tests assert, and
        # it stops the answer (a real server stops generating for a client that left).
        async def send_marking(message: dict[str, Any]) -> None:
            await send(message)
            rec.sent_bytes += len(message.get("body", b""))
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Marked before yielding: uvicorn wakes receive() with a disconnect once a response is
                # complete, and the watcher must not mistake that for a cancellation.
                rec.completed = True

        send_marking.raw_send = send  # type: ignore[attr-defined]  # what _reset digs the socket out of
        body_obj = parsed if isinstance(parsed, dict) else {}
        answer = asyncio.create_task(self._answer(scope, send_marking, rec, fault, body_obj))
        watcher = asyncio.create_task(self._watch(receive, rec))
        try:
            await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not answer.done():
                answer.cancel()
            await asyncio.wait({answer, watcher})
        if answer.cancelled():
            return
        exc = answer.exception()
        if exc is None:
            rec.completed = True
        elif isinstance(exc, OSError):
            self._cancelled(rec)
        else:
            raise exc

    def _cancelled(self, rec: Recorded) -> None:
        if not rec.completed and not rec.cancelled:
            rec.cancelled = True
            self.cancelled.set()

    async def _watch(self, receive: Receive, rec: Recorded) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._cancelled(rec)

    # -- answers ---------------------------------------------------------------------------------

    async def _answer(self, scope: Scope, send: Send, rec: Recorded, fault: str | None, body: dict[str, Any]) -> None:
        path = scope["path"]
        if fault == "never":
            await asyncio.sleep(3600)
        if fault == "reset_before_headers":
            _reset(send)
            return
        if fault and fault.startswith("status_"):
            await self._status(send, int(fault[7:]), rec.headers.get("authorization", ""))
            return
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        if path.endswith("/models"):
            await _json(
                send, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
            )
            return
        if path.endswith("/embeddings"):
            data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]
            await _json(send, 200, {"object": "list", "data": data, "model": body.get("model", "fake")})
            return
        if not path.endswith("/chat/completions"):
            await _json(send, 200, {"echo": {"method": scope["method"], "path": path, "body": rec.body}})
            return
        if self.ttft:
            await asyncio.sleep(self.ttft)
        rec_reply = rec.headers.get("x-fake-reply")
        n_field = body.get("n")
        n = n_field if isinstance(n_field, int) and 0 < n_field <= 128 else 1
        answer = self.answers.get(_last_user_text(body)) if self.answers else None
        texts = [rec_reply or answer or self._text(i) for i in range(n)]
        model = body.get("model") or "fake-model"
        if body.get("stream") or fault == "sse":
            await self._stream(send, texts, model, fault, body)
        else:
            await self._plain(send, texts, model, fault, logprobs=bool(body.get("logprobs")))

    def _text(self, i: int) -> str:
        if self.replies:
            return self.replies[i % len(self.replies)]
        return self.reply

    async def _status(self, send: Send, status: int, auth: str = "") -> None:
        if status == 401:  # like some upstreams: the error names the key it was sent
            err401 = {"error": {"message": f"FAKE upstream: invalid key {auth.removeprefix('Bearer ')}",
                                "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}  # fmt: skip
            await _json(send, 401, err401)
            return
        err = {"error": {"message": f"FAKE upstream error {status}", "type": "server_error", "param": None,
                         "code": f"fake_{status}"}}  # fmt: skip
        headers = [(b"retry-after", b"7")] if status == 429 else []
        await _json(send, status, err, headers)

    def _completion(self, texts: list[str], model: str, logprobs_asked: bool = False) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(texts):
            if self.tool_call is not None:
                name, args = self.tool_call
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
                    ],
                }
                finish = "tool_calls"
            else:
                message, finish = {"role": "assistant", "content": text}, "stop"
            if self.reasoning is not None:
                message["reasoning_content"] = self.reasoning
            logprobs = {"content": [_logprob(t) for t in _tokens(text)]} if logprobs_asked else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        tokens = sum(len(t.split()) for t in texts)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5},
        }

    async def _plain(self, send: Send, texts: list[str], model: str, fault: str | None, *, logprobs: bool) -> None:
        data = json.dumps(self._completion(texts, model, logprobs)).encode()
        if self.token_interval:
            await asyncio.sleep(self.token_interval * sum(len(t.split()) for t in texts))
        if fault == "gzip":
            data = gzip.compress(data)
            await _start(send, 200, [(b"content-type", b"application/json"), (b"content-encoding", b"gzip"),
                                     (b"content-length", str(len(data)).encode())])  # fmt: skip
            await send({"type": "http.response.body", "body": data})
            return
        if fault in ("reset_mid_stream", "stall"):
            # Declared length, half the body, then a reset or silence.
            await _start(
                send, 200, [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            )
            await send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
            if fault == "stall":
                await asyncio.sleep(3600)
            _reset(send)
            return
        if fault == "drip":
            await _start(
                send, 200, [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            )
            for i in range(len(data)):
                await send({"type": "http.response.body", "body": data[i : i + 1], "more_body": True})
                await asyncio.sleep(self.drip_interval)
            await send({"type": "http.response.body", "body": b""})
            return
        extra = [(b"set-cookie", self.set_cookie.encode())] if self.set_cookie else []
        extra += [(k.encode(), v.encode()) for k, v in self.extra_headers]
        await _json(send, 200, data, extra)

    def _chunks(self, texts: list[str], model: str, body: dict[str, Any]) -> list[bytes]:
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        def ev(obj: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps({**base, **obj}).encode() + b"\n\n"

        out = []
        for i, text in enumerate(texts):
            out.append(
                ev({"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            )
            for tok in _tokens(self.reasoning or ""):
                delta = {"reasoning_content": tok}
                out.append(ev({"choices": [{"index": i, "delta": delta, "finish_reason": None}]}))
            if self.tool_call is not None:
                name, args = self.tool_call
                head = {"index": 0, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}
                out.append(ev({"choices": [{"index": i, "delta": {"tool_calls": [head]}, "finish_reason": None}]}))
                for j in range(0, len(args), 8):
                    tc = {"index": 0, "function": {"arguments": args[j : j + 8]}}
                    out.append(ev({"choices": [{"index": i, "delta": {"tool_calls": [tc]}, "finish_reason": None}]}))
                finish = "tool_calls"
            else:
                for tok in _tokens(text):
                    choice = {"index": i, "delta": {"content": tok}, "finish_reason": None}
                    if body.get("logprobs"):
                        choice["logprobs"] = {"content": [_logprob(tok)]}
                    out.append(ev({"choices": [choice]}))
                finish = "stop"
            out.append(ev({"choices": [{"index": i, "delta": {}, "finish_reason": finish}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            out.append(
                ev(
                    {
                        "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": len(out), "total_tokens": 5 + len(out)},
                    }
                )
            )
        return out

    async def _stream(self, send: Send, texts: list[str], model: str, fault: str | None, body: dict[str, Any]) -> None:
        chunks = self._chunks(texts, model, body)
        await _start(send, 200, [(b"content-type", b"text/event-stream")])
        if fault == "error_in_stream":
            chunks = chunks[:2] + [_ERROR_EVENT]
        elif fault == "invalid_json_sse":
            chunks = chunks[:2] + [b"data: {not json\n\n"] + chunks[2:]
        elif fault == "oversized_event":
            chunks = chunks[:1] + [b"data: " + b"x" * self.oversized_chars + b"\n\n"]
        elif fault == "cut_clean":
            chunks = chunks[: max(1, len(chunks) // 2)]  # then a clean end: no finish_reason, no [DONE]
        elif fault == "split_sse":
            joined = b": ping\r\n\r\n".join(chunks).replace(b"\n\n", b"\r\n\r\n")
            chunks = [joined[i : i + 3] for i in range(0, len(joined), 3)]
        half = max(1, len(chunks) // 2)
        for n, chunk in enumerate(chunks):
            if n == half and fault == "stall":
                await asyncio.sleep(3600)
            if n == half and fault == "reset_mid_stream":
                _reset(send)
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if self.token_interval:
                await asyncio.sleep(self.token_interval)
        if fault not in ("no_done", "cut_clean", "error_in_stream", "oversized_event"):
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def _last_user_text(body: dict[str, Any]) -> str:
    """The text of the request's last user turn ("" if none): what ``answers`` is keyed by."""
    from guardproxy.drills.record import message_text

    messages = body.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def _logprob(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.25, "bytes": list(token.encode()), "top_logprobs": []}


def _tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _json(send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or [])]
    await _start(send, status, hdrs)
    await send({"type": "http.response.body", "body": data})


def _reset(send: Send) -> None:
    """Abort the TCP connection with a RST. A fake's hack: uvicorn's ``send`` is a bound method of the
    request cycle, which holds the transport; a real upstream that crashes looks the same on the wire."""
    send = getattr(send, "raw_send", send)
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("reset fault needs uvicorn's transport")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> int:
    """``python -m guardproxy.fake_upstream``: serve a FAKE upstream to put a gateway in front of, offline."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m guardproxy.fake_upstream",
        description="Serve a FAKE OpenAI-compatible upstream (canned replies, not a model) for trying a gateway "
        "offline: point upstream.base_url at http://HOST:PORT/v1. A request's x-fake-reply header sets its reply, "
        "x-fake-fault its fault mode.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on (default: %(default)s)")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="the reply to every request (default: a greeting)")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first byte of a reply")
    parser.add_argument("--token-interval", type=float, default=0.0, help="seconds between streamed tokens")
    parser.add_argument("--fault", choices=sorted(FAULTS), default=None, help="a fault mode for every request")
    args = parser.parse_args(argv)
    # record=False: a long-running server must not keep every request it was sent
    app = FakeUpstream(
        reply=args.reply, ttft=args.ttft, token_interval=args.token_interval, fault=args.fault, record=False
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
