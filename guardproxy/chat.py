"""The guarded route: ``POST /v1/chat/completions`` through the pipeline, plain and streaming.

Both paths run the same hook points. The plain path checks every choice once (``final=True``); the
streaming path relays SSE events as they arrive and checks a choice each time its text grew by
``pipeline.output_check_chars`` and once more before its last chunk, so a block cuts the stream
before the chunk that tripped it. Errors are raised, never turned into responses here: the app maps
them (``guardproxy.app``), as an HTTP error before the headers went out or as an in-band SSE error
event followed by ``[DONE]`` after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from prometheus_client import Counter

from guardproxy.drills.record import REQUEST_SECRETS
from guardproxy.errors import (
    Blocked,
    GuardProxyError,
    Overloaded,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamStreamError,
    UpstreamTimeout,
)
from guardproxy.metrics import Metrics
from guardproxy.pipeline import Exchange, Pipeline, Verdict, combine
from guardproxy.proxy import Upstream, response_headers, upstream_failure
from guardproxy.routes import GUARDED_PATH
from guardproxy.streaming import (
    DONE_BYTES,
    OPAQUE_CHARS,
    Beside,
    Logprobs,
    MalformedReply,
    StreamGuard,
    choice_fields,
    choice_text,
    content_parts,
    known_texts,
    read_choices,
    reasoning,
    reasoning_of,
    relay,
    sse_json,
    stop_strings,
    string_leaves,
    tool_inputs,
    tool_names,
    top_fields,
)
from guardproxy.validation import ChatRequest

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]
_JSON = (b"content-type", b"application/json")
# A plain reply is held whole (to check it); an upstream that sends more than this is broken or hostile.
MAX_REPLY_BYTES = 32 * 1024 * 1024
PARSE_INLINE_BYTES = 256 * 1024  # JSON up to this size is parsed on the event loop (well under 5 ms)
# with guard.speculative, the input check waits this long at most for the request to go out (the tracker waits
# WINDOW_HOLD_S, the same, for a speculative window pass)
SEND_HOLD_S = 0.005
_KEPT_ON_BLOCK = frozenset({"choices", "id", "object", "created"})  # and any field with no text (``top_fields``)
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_HEADER_NAME_JUNK = re.compile(r"[^a-z0-9-]")


def _header_value(value: str) -> bytes:
    # Header values must be one line of latin-1; annotations come from policies, not from clients.
    return value.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace")


@dataclass(eq=False)
class Call:
    """One client request as the ASGI side sees it: what was sent, and how it may be cut short."""

    send: Send
    request_id: str = ""
    tenant: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # extra response headers
    upstream_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    visible_headers: dict[str, str] = field(default_factory=dict)
    # the caller's key and the gateway's upstream key as sent (``proxy.request_secrets``): cut out exactly wherever
    # they would be stored or shown, never kept beyond the request
    secrets: tuple[str, ...] = ()
    deadline: asyncio.Timeout | None = None
    disconnected: bool = False
    shutting_down: bool = False
    started: bool = False  # response headers sent
    streaming: bool = False  # an SSE body is in progress: errors go in-band
    finished: bool = False  # the last body message is being (or was) sent
    status: int = 0
    query: bytes = b""  # the client's query string

    def cut(self, *, shutdown: bool = False) -> None:
        """End the exchange now (client gone or gateway shutting down): fire its deadline."""
        if self.finished:
            return
        if shutdown:
            self.shutting_down = True
        else:
            self.disconnected = True
        if self.deadline is not None and not self.deadline.expired():
            self.deadline.reschedule(asyncio.get_running_loop().time())

    def arm(self, deadline: asyncio.Timeout) -> None:
        """Bind the exchange's deadline; a cut that came earlier (client gone while the body was parsed) fires it."""
        self.deadline = deadline
        if self.disconnected or self.shutting_down:
            deadline.reschedule(asyncio.get_running_loop().time())

    def annotate(self, verdict: Verdict | None) -> None:
        if verdict is None:
            return
        for key, value in verdict.annotations.items():
            name = _HEADER_NAME_JUNK.sub("-", key.lower())
            if not name.startswith("x-guardproxy-"):
                name = "x-guardproxy-" + name
            # Replace, don't repeat: the input and output verdicts may both set x-guardproxy-decision.
            encoded = name.encode()
            self.headers = [h for h in self.headers if h[0] != encoded]
            self.headers.append((encoded, _header_value(value)))

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers + self.headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        if not more:
            self.finished = True
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        hdrs = [*(headers if headers is not None else [_JSON]), (b"content-length", str(len(body)).encode())]
        await self.start(status, hdrs)
        await self.body(body, more=False)


def server_timing(ex: Exchange) -> bytes:
    """``Server-Timing`` for the stages so far, in ms, plus ``gateway``: the time spent outside the upstream."""
    upstream = ex.timings.get("upstream", 0.0)
    own = max(0.0, time.perf_counter() - ex.started - upstream)
    parts = [f"{name};dur={sec * 1000:.3f}" for name, sec in ex.timings.items()]
    parts.append(f"gateway;dur={own * 1000:.3f}")
    return ", ".join(parts).encode("latin-1", "replace")


def message_text(message: Any) -> str:
    """``choice_text`` of a complete (non-streamed) assistant message: the reply text the history records. The output
    check also reads what ``reasoning_of`` finds beside it: reasoning, every other string of the message (a refusal,
    an audio transcript, ``thinking``, a vendor's field...), non-text parts, decoded arguments."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # the text parts; the rest is read beside the reply (``reasoning_of``)
        content = content_parts(content)[0]
    args = [a for _, a in tool_inputs(message)]
    return choice_text(content if isinstance(content, str) else "", args)


def choice_side(choice: dict[str, Any], text: str, stops: frozenset[str]) -> list[str]:
    """What the output check reads of a reply's choice beside its message (``reasoning_of`` reads the message): its
    other fields (``choice_fields``: a legacy ``text``, a vendor's field) and its logprobs' text (``Logprobs``), less
    what repeats the message's content (``text``), its reasoning or its refusal. [] for an ordinary choice: its
    logprobs spell its content, and its ``finish_reason`` is a token."""
    message = choice.get("message")
    msg = message if isinstance(message, dict) else {}
    content = msg.get("content")
    if isinstance(content, list):
        content = content_parts(content)[0]
    content = content if isinstance(content, str) else ""
    refusal = msg.get("refusal")
    think = reasoning(msg)
    known = known_texts(text, content, think, think + content, refusal if isinstance(refusal, str) else "")
    logprobs = Logprobs()
    logprobs.add(choice.get("logprobs"))
    beside = Beside()
    beside.add([*choice_fields(choice, "message", stops), *logprobs.take_other()])
    return [*beside.texts(known), *logprobs.texts(known)]


def error_text(body: bytes) -> str:
    """What the output check reads of an upstream's error body: every string of it as JSON, less ids and tokens
    (``REPLY_NOT_TEXT``, ``Beside.texts``: a ``code``, a ``type``), or the body as text; "" when none is left."""
    raw = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(raw) if raw[:1] in ("{", "[", '"') else None
    except ValueError:
        obj = None
    side = Beside()
    side.add(string_leaves(obj) if obj is not None else [("", raw)])
    return "\n".join(side.texts())


def _error_tokens(body: bytes) -> dict[str, str]:
    """The ``code`` and ``type`` of an upstream's JSON error body (OpenAI's shape or vLLM's flat one) that are tokens
    (no whitespace, at most ``OPAQUE_CHARS``)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return {}
    err = obj.get("error") if isinstance(obj, dict) else None
    fields = err if isinstance(err, dict) else obj if isinstance(obj, dict) else {}
    return {
        k: v
        for k in ("code", "type")
        if isinstance(v := fields.get(k), str) and v and len(v) <= OPAQUE_CHARS and not any(c.isspace() for c in v)
    }


def blocked_completion(body: dict[str, Any], request_id: str, verdict: Verdict, n: int) -> dict[str, Any]:
    """The OpenAI-shaped reply the client gets when a check blocks the request."""
    return {
        "id": f"chatcmpl-guard-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or "guardproxy",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": verdict.reply_text or ""},
                "finish_reason": "content_filter",
            }
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def blocked_stream(body: dict[str, Any], request_id: str, verdict: Verdict, n: int) -> bytes:
    """``blocked_completion`` as an SSE stream of chunks, ending with ``[DONE]``."""
    base = {
        "id": f"chatcmpl-guard-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model") or "guardproxy",
    }
    out = b""
    for i in range(n):
        delta = {"role": "assistant", "content": verdict.reply_text or ""}
        out += sse_json({**base, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
        out += sse_json({**base, "choices": [{"index": i, "delta": {}, "finish_reason": "content_filter"}]})
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        # asked for, as OpenAI sends it: nothing was generated for this client
        out += sse_json({**base, "choices": [], "usage": blocked_completion(body, request_id, verdict, 0)["usage"]})
    return out + DONE_BYTES


class ChatHandler:
    def __init__(
        self,
        upstream: Upstream,
        pipeline: Pipeline,
        metrics: Metrics,
        *,
        total_timeout: float,
        speculative: bool,
        max_event_chars: int,
        speculative_window: bool = False,
        spawn: Callable[[Exchange], None],
        timing_header: bool = True,
        parse_pool: Executor | None = None,
    ) -> None:
        self.upstream = upstream
        self.pipeline = pipeline
        self.metrics = metrics
        self.total_timeout = total_timeout
        self.speculative = speculative
        # Start the upstream call once the request's own turns pass, while a conversation window is still scored.
        self.speculative_window = speculative_window and not speculative
        # at 0 from the start, as every counter a dashboard or an absent() alert reads (0 for good without the modes)
        self._speculative_cancelled()
        self.max_event_chars = max_event_chars
        self.spawn = spawn
        self.timing_header = timing_header
        self.parse_pool = parse_pool
        self.url = httpx.URL(upstream.url(GUARDED_PATH))
        self._upstream_hist = metrics.upstream_seconds.labels(GUARDED_PATH)

    async def handle(self, call: Call, req: ChatRequest, raw: bytes, parse_seconds: float) -> None:
        ex = Exchange(
            request_id=call.request_id,
            tenant=call.tenant,
            route=GUARDED_PATH,
            body=req.body,
            headers=call.visible_headers,
            stream=req.stream,
        )
        ex.state[REQUEST_SECRETS] = call.secrets  # a drill of this exchange cuts them out before it is stored
        ex.timings["parse"] = parse_seconds
        content = _dumps(req.body) if req.changed else raw
        try:
            async with asyncio.timeout(self.total_timeout) as deadline:
                call.arm(deadline)
                await self._run(call, ex, req, content)
        except TimeoutError:
            if call.disconnected:
                ex.outcome = "client_disconnected"
                return
            ex.outcome = "shutdown" if call.shutting_down else "upstream_error"
            if call.shutting_down:
                raise Overloaded("the gateway is shutting down") from None
            raise UpstreamTimeout(f"upstream exceeded the overall deadline of {self.total_timeout:g} s") from None
        except UpstreamError:
            ex.outcome = "upstream_error"
            raise
        except GuardProxyError:
            if ex.outcome == "pending":
                ex.outcome = "error"
            raise
        except asyncio.CancelledError:
            ex.outcome = "client_disconnected"
            raise
        except Exception:
            ex.outcome = "error"
            raise
        finally:
            if ex.outcome == "pending":
                ex.outcome = "client_disconnected" if call.disconnected else "ok"
            self.metrics.outcomes.labels(ex.outcome).inc()
            self.metrics.observe_timings(ex.timings)
            if not self.pipeline.passthrough:
                self.spawn(ex)

    async def _open(
        self, call: Call, ex: Exchange, content: bytes, sent: asyncio.Future[None] | None = None
    ) -> httpx.Response:
        t0 = time.perf_counter()
        # The client's query string goes along (Azure-style endpoints need ?api-version=...).
        url = httpx.URL(self.upstream.url(GUARDED_PATH, call.query)) if call.query else self.url
        resp = await self.upstream.open("POST", url, call.upstream_headers, content, sent=sent, stream=ex.stream)
        dt = time.perf_counter() - t0
        ex.timings["upstream"] = ex.timings.get("upstream", 0.0) + dt
        self._upstream_hist.observe(dt)
        ex.upstream_status = resp.status_code
        return resp

    async def _run(self, call: Call, ex: Exchange, req: ChatRequest, content: bytes) -> None:
        if self.pipeline.passthrough:
            resp = await self._open(call, ex, content)
        else:
            opened = await self._check_input(call, ex, req, content)
            if opened is None:
                return
            resp = opened
        try:
            if resp.status_code >= 400:
                raise await self._upstream_error(ex, resp)
            if req.stream and resp.headers.get("content-type", "").startswith("text/event-stream"):
                await self._relay(call, ex, resp)
            else:
                await self._plain(call, ex, req, resp)
        finally:
            await resp.aclose()

    async def _upstream_error(self, ex: Exchange, resp: httpx.Response) -> UpstreamHTTPError:
        """The upstream's error answer, which the client gets with its status, headers and body (``app``). With the
        output check on, the body's text (``error_text``: less codes and ids) is read first, as choice 0's text beside
        an empty reply: a hostile upstream's harmful reply as an error message is withheld (the status and headers
        stay, the message says it was withheld), as is one the check could not read (it raised)."""
        exc = await self.upstream.error_from(resp)
        text = "" if self.pipeline.passthrough else error_text(exc.body)
        if not text:
            return exc
        ex.reply_reasoning[0] = text
        try:
            with ex.timed("output_check"):
                withheld = (await self.pipeline.check_output(ex, 0, "", final=False)).blocks
        except GuardProxyError:
            withheld = True
        if withheld:
            status = exc.status_code
            message = f"upstream answered HTTP {status}; its message was withheld by the output check"
            error = {"message": message, "type": "upstream_error", "param": None, "code": f"upstream_{status}"}
            error.update(_error_tokens(exc.body))  # its code and type, where each is a token
            exc.body, exc.content_type = _dumps({"error": error}), "application/json"
        return exc

    def _speculative_cancelled(self) -> Counter:
        return self.metrics.counter(
            "guardproxy_speculative_cancelled", "upstream calls started before the input verdict, then blocked"
        )

    def _open_early(
        self, call: Call, ex: Exchange, content: bytes
    ) -> tuple[asyncio.Task[httpx.Response], asyncio.Future[None] | None]:
        """The upstream call started before the input verdict, and the future that resolves once its request has
        gone out (None where the transport cannot say): checks wait for it so as not to slow the send."""
        sent = asyncio.get_running_loop().create_future() if self.upstream.signals_sent else None
        return asyncio.create_task(self._open(call, ex, content, sent)), sent

    async def _check_input(self, call: Call, ex: Exchange, req: ChatRequest, content: bytes) -> httpx.Response | None:
        """Run the input check (with the upstream call in parallel when speculative, or from the provisional verdict
        on with ``speculative_window``); None if blocked. The reply is released only after the final verdict."""
        task: asyncio.Task[httpx.Response] | None = None
        sent: asyncio.Future[None] | None = None
        if self.speculative:
            task, sent = self._open_early(call, ex, content)

        def early(provisional: Verdict) -> asyncio.Future[None] | None:
            # The window pass starts once the request is on the wire: scoring it beside the send would slow the
            # send (tokenizing holds the GIL), which is the time to first token this mode exists to save.
            nonlocal task
            if task is not None or provisional.blocks:
                return None
            task, out = self._open_early(call, ex, content)
            return out

        try:
            if sent is not None:  # as for the window below: check once the request is out, so as not to slow it
                await asyncio.wait((sent,), timeout=SEND_HOLD_S)
            with ex.timed("input_check"):
                verdict = await self.pipeline.check_input(ex, early=early if self.speculative_window else None)
        except BaseException:
            if task is not None:
                await _cancel(task)
            raise
        ex.input_verdict = verdict
        call.annotate(verdict)
        if verdict.blocks:
            if task is not None:
                await _cancel(task)
                self._speculative_cancelled().inc()
            ex.outcome = "blocked_input"
            self._timing(call, ex)
            await self._send_block(call, req, verdict, stream=req.stream)
            return None
        return await task if task is not None else await self._open(call, ex, content)

    async def _send_block(self, call: Call, req: ChatRequest, verdict: Verdict, *, stream: bool) -> None:
        if verdict.status_code is not None:
            raise Blocked(verdict.reply_text or verdict.reason or "blocked by policy", status_code=verdict.status_code,
                          category=verdict.category)  # fmt: skip
        if stream:
            await call.start(200, list(_SSE_HEADERS))
            call.streaming = True
            await call.body(blocked_stream(req.body, call.request_id, verdict, req.n), more=False)
        else:
            await call.respond(200, _dumps(blocked_completion(req.body, call.request_id, verdict, req.n)))

    async def _reply(self, data: bytes) -> dict[str, Any]:
        """The upstream's JSON reply; a large one is parsed off the event loop."""
        if len(data) <= PARSE_INLINE_BYTES or self.parse_pool is None:
            return _json_reply(data)
        return await asyncio.get_running_loop().run_in_executor(self.parse_pool, _json_reply, data)

    def _timing(self, call: Call, ex: Exchange) -> None:
        if self.timing_header:
            call.headers.append((b"server-timing", server_timing(ex)))

    # -- plain replies ---------------------------------------------------------------------------

    async def _plain(self, call: Call, ex: Exchange, req: ChatRequest, resp: httpx.Response) -> None:
        data = await self.upstream.read(resp, limit=MAX_REPLY_BYTES)
        headers = response_headers(resp.headers, decoded=True)
        if self.pipeline.passthrough:
            self._timing(call, ex)
            await call.respond(resp.status_code, data, headers)
            return
        reply = await self._reply(data)
        verdicts = await self._check_choices(ex, reply)
        worst = combine(list(verdicts.values()))
        if worst.retry_note and not worst.blocks:
            # One re-ask with the policy's note; whatever the second reply gets is final.
            ex.state["retried"] = True
            body = {**req.body, "messages": [*ex.messages, {"role": "system", "content": worst.retry_note}]}
            retry = await self._open(call, ex, _dumps(body))
            try:
                if retry.status_code >= 400:
                    raise await self._upstream_error(ex, retry)
                data = await self.upstream.read(retry, limit=MAX_REPLY_BYTES)
                headers = response_headers(retry.headers, decoded=True)
            finally:
                await retry.aclose()
            reply = await self._reply(data)
            verdicts = await self._check_choices(ex, reply)
            worst = combine(list(verdicts.values()))
        ex.output_verdict = worst
        call.annotate(worst)
        if worst.blocks:
            ex.outcome = "blocked_output"
            if worst.status_code is not None:
                raise Blocked(worst.reply_text or worst.reason or "blocked by policy", status_code=worst.status_code,
                              category=worst.category)  # fmt: skip
            choices = reply.get("choices")
            for pos, (idx, _choice) in enumerate(read_choices(reply, "message")):  # well-formed: _check_choices read it
                v = verdicts.get(idx)
                if v is not None and v.blocks and isinstance(choices, list):
                    # nothing of the blocked choice stays: its reasoning went with the message, its tokens with its
                    # logprobs, any other field (a legacy ``text``, a vendor's) with the rest
                    choices[pos] = {"index": idx, "message": {"role": "assistant", "content": v.reply_text or ""},
                                    "logprobs": None, "finish_reason": "content_filter"}  # fmt: skip
            # nothing the reply carries beside its choices stays but its ids, tokens and usage: the check read the rest
            # with choice 0, and a block may have come from it
            for key in [k for k in reply if k not in _KEPT_ON_BLOCK]:
                if top_fields({key: reply[key]}):
                    del reply[key]
            # not the upstream's id: with store: true it names the stored, harmful completion (stored completions
            # are refused anyway, guardproxy.routes)
            reply["id"] = f"chatcmpl-guard-{call.request_id}"
            data = _dumps(reply)
        else:
            ex.outcome = "ok"
        self._timing(call, ex)
        await call.respond(resp.status_code, data, headers)

    async def _check_choices(self, ex: Exchange, reply: dict[str, Any]) -> dict[int, Verdict]:
        """The verdict of each choice, by index. A reply the check cannot read with certainty raises
        ``MalformedReply`` (counted here): the client gets a 502, none of the reply. What the reply carries beside its
        choices (``top_fields``, less ids and tokens) is read with choice 0, or alone as choice 0's where the reply
        has none (its verdict then under index 0)."""
        try:
            choices = read_choices(reply, "message")
        except MalformedReply as exc:
            self.metrics.upstream_malformed.labels("plain", exc.problem).inc()
            raise
        verdicts: dict[int, Verdict] = {}
        declared = tool_names(ex.body)  # the tool-call names the check does not read (``streaming.tool_names``)
        stops = stop_strings(ex.body)
        top = Beside()
        top.add(top_fields(reply))
        top_text = top.texts()
        with ex.timed("output_check"):
            for idx, choice in choices:
                message = choice.get("message")
                text = message_text(message)
                ex.reply_texts[idx] = text
                side = [reasoning_of(message, declared) if isinstance(message, dict) else ""]
                side.extend(choice_side(choice, text, stops))
                if idx == 0:
                    side.extend(top_text)
                ex.reply_reasoning[idx] = "\n".join(p for p in side if p)
                verdicts[idx] = await self.pipeline.check_output(ex, idx, text, final=True)
            if top_text and 0 not in verdicts:  # not final: no choice 0's reply to record
                ex.reply_reasoning[0] = "\n".join(top_text)
                verdicts[0] = await self.pipeline.check_output(ex, 0, "", final=False)
        return verdicts

    # -- streams ---------------------------------------------------------------------------------

    async def _relay(self, call: Call, ex: Exchange, resp: httpx.Response) -> None:
        self._timing(call, ex)
        await call.start(200, response_headers(resp.headers, decoded=True) + [(b"cache-control", b"no-cache")])
        call.streaming = True
        guard = None if self.pipeline.passthrough else StreamGuard(self.pipeline, ex)

        async def send(data: bytes, more: bool) -> None:
            await call.body(data, more=more)

        try:
            ex.outcome = await relay(resp.aiter_bytes(), send, guard=guard, max_event_chars=self.max_event_chars)
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            raise upstream_failure(exc, started=True) from exc
        finally:
            if guard is not None:
                guard.record()
                if guard.malformed is not None:
                    self.metrics.upstream_malformed.labels("stream", guard.malformed).inc()
                if guard.late:
                    self.metrics.upstream_malformed.labels("stream", "late_text").inc()


def _json_reply(data: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(data)
    except ValueError:
        raise UpstreamStreamError("upstream sent a reply that is not valid JSON") from None
    if not isinstance(reply, dict):
        raise UpstreamStreamError("upstream sent a reply that is not a JSON object")
    return reply


async def _cancel(task: asyncio.Task[httpx.Response]) -> None:
    """Cancel a speculative upstream call; close its response if it had already arrived."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is None:
        await task.result().aclose()
