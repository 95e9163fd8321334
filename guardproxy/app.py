"""The ASGI app: ``create_app(settings)`` wires the gateway's routes, lifecycle and error mapping.

Every ``GuardProxyError`` becomes an OpenAI-shaped error here and nowhere else (``error_payload``): as
an HTTP error before the response headers went out, or as an SSE error event followed by
``data: [DONE]`` on a stream already under way, so a failed stream never looks complete.

``/v1/*`` is served by one raw ASGI endpoint (no per-request Request/Response objects on the hot path):
header limits → request id → capacity → client auth → rate limit → route → body limit → the guarded
chat handler or a plain forward.

The access log (``server.access_log``): one line per finished request on ``guardproxy.access``
(``logs.AccessRecord``), written where the request ends: in ``V1Endpoint``'s ``finally`` for ``/v1/*``, once the
last body message went out or the client went away, beside the request metrics; in ``V1First`` for the other
routes. The guard's verdicts and the exchange's outcome come from the exchange as the chat handler ends it
(``Gateway.exchange_done``), the error code from ``send_error``, the upstream's status from ``proxy.Upstream.open``,
all through ``logs.CURRENT_ACCESS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import Token
from typing import Any

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from guardproxy.auth import Authenticator, RateLimiter
from guardproxy.chat import PARSE_INLINE_BYTES, Call, ChatHandler
from guardproxy.errors import (
    AuthError,
    Blocked,
    ClassifierError,
    GuardProxyError,
    HeadersTooLarge,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    RouteNotGuarded,
    StateBackendError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from guardproxy.logs import (
    CURRENT_ACCESS,
    AccessRecord,
    access_log_on,
    cut_secrets,
    fallback_of,
    loggable_method,
    loggable_path,
    redact,
)
from guardproxy.metrics import CONTENT_TYPE, Metrics
from guardproxy.pipeline import Exchange, Pipeline, combine
from guardproxy.proxy import (
    Upstream,
    UpstreamErrorReply,
    request_secrets,
    response_headers,
    split_request_headers,
    upstream_failure,
)
from guardproxy.routes import RouteKind, V1Route, classify_route
from guardproxy.settings import Settings
from guardproxy.streaming import MalformedReply, UpstreamErrorEvent, error_summary, error_tail
from guardproxy.validation import parse_chat

logger = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Generated request ids: a random per-process prefix and a counter (unique across replicas, and no
# urandom syscall per request as uuid4 would make).
_RID_PREFIX = os.urandom(8).hex()
_rid_counter = itertools.count(1)
_JSON = (b"content-type", b"application/json")
_SINGLE_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key", b"x-request-id"})
FINISH_GRACE_SECONDS = 5.0  # how long shutdown waits for pending pipeline.finish tasks
MAX_PENDING_FINISH = 10_000
# An upstream's own error text (a non-OpenAI error body, an in-stream error) is cut to this in a message we write.
MAX_UPSTREAM_MESSAGE_CHARS = 2000


class ClientGone(Exception):
    """The client disconnected while sending its body: nothing to answer."""


def request_id(raw_headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's ``x-request-id`` when it is a sane token, else a new one."""
    for name, value in raw_headers:
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            if _REQUEST_ID_RE.fullmatch(rid):
                return rid
            break
    return f"{_RID_PREFIX}{next(_rid_counter):08x}"


def loggable_request_id(rid: str) -> str:
    """A request id as the access log shows it: a client's own one redacted (it could send a key as its id)."""
    return rid if rid.startswith(_RID_PREFIX) else redact(rid)


def guard_action(ex: Exchange) -> tuple[str | None, str | None]:
    """The guard's action on an exchange (the most severe of its input and output verdicts; None when no verdict
    was reached) and the failure fallback that decided it, if one did (``logs.fallback_of``)."""
    verdicts = [v for v in (ex.input_verdict, ex.output_verdict) if v is not None]
    if not verdicts:
        return None, None
    action = combine(verdicts).action
    fallback = next((f for v in verdicts if v.action is action and (f := fallback_of(v.reason))), None)
    return action.value, fallback


class _CountedSend:
    """An ASGI ``send`` that adds each body's bytes to the access record. A plain call that hands back the server's
    own awaitable: no coroutine of its own on the path of every chunk."""

    __slots__ = ("record", "send")

    def __init__(self, send: Any, record: AccessRecord) -> None:
        self.send = send
        self.record = record

    def __call__(self, message: dict[str, Any]) -> Any:
        body = message.get("body")
        if body:
            self.record.bytes_sent += len(body)
        return self.send(message)


def upstream_host(base_url: str) -> str:
    """``host[:port]`` of the upstream base URL: what a log line may name (no user info, path or query)."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        return "<invalid url>"
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port is not None else host


# -- error mapping: the one place -----------------------------------------------------------------


def error_payload(
    exc: BaseException, *, in_band: bool = False, secrets: Sequence[str] = ()
) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    """Status, OpenAI-shaped body and extra headers for any error.

    ``in_band``: the error ends an SSE stream already under way. A broken upstream body is
    ``upstream_stream_error`` there, and ``upstream_bad_response`` on a reply answered with an HTTP error
    (a plain reply that is not JSON, cut short, undecodable or oversized). ``secrets``
    (``proxy.request_secrets``): keys cut out of every text of the body, an upstream's own text included."""
    status, body, headers = _error_payload(exc, in_band=in_band)
    if secrets and isinstance(exc, UpstreamError):  # only an upstream's text can carry a key
        body = _cut_all(body, secrets)
    return status, body, headers


def _error_payload(exc: BaseException, *, in_band: bool) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
    param: str | None = None
    headers: list[tuple[bytes, bytes]] = []
    message = str(exc)
    if isinstance(exc, RequestError):
        status, etype, code, param = exc.status_code, "invalid_request_error", exc.code, exc.param
    elif isinstance(exc, AuthError):
        status, etype, code = 401, "authentication_error", "invalid_api_key"
    elif isinstance(exc, RateLimited):
        status, etype, code = 429, "rate_limit_error", "rate_limit_exceeded"
        headers.append((b"retry-after", str(max(1, int(exc.retry_after + 0.999))).encode()))
    elif isinstance(exc, Overloaded):
        status, etype, code = 503, "server_error", "overloaded"
        headers.append((b"retry-after", str(max(1, int(exc.retry_after + 0.999))).encode()))
    elif isinstance(exc, RouteNotGuarded):
        status, etype, code = 403, "permission_error", "route_not_guarded"
    elif isinstance(exc, Blocked):
        status, etype, code = exc.status_code, "content_filter", "content_filter"
    elif isinstance(exc, UpstreamHTTPError):
        if isinstance(exc, UpstreamErrorReply):
            headers.extend(exc.headers)  # Retry-After among them
        elif exc.retry_after is not None:
            headers.append((b"retry-after", exc.retry_after.encode("latin-1", "replace")))
        return exc.status_code, upstream_error_body(exc.status_code, exc.body), headers
    elif isinstance(exc, UpstreamTimeout):
        status, etype, code = 504, "upstream_error", "upstream_timeout"
    elif isinstance(exc, UpstreamUnreachable):
        status, etype, code = 502, "upstream_error", "upstream_unreachable"
    elif isinstance(exc, UpstreamStreamError):
        status, etype = 502, "upstream_error"
        # MalformedReply: a reply the output check cannot read with certainty (a stream that turns so ends as a block)
        malformed = isinstance(exc, MalformedReply)
        code = "upstream_malformed" if malformed else "upstream_stream_error" if in_band else "upstream_bad_response"
        message = _clip(message)  # it may carry an upstream's in-stream error text
    elif isinstance(exc, UpstreamError):
        status, etype, code = 502, "upstream_error", "upstream_error"
    elif isinstance(exc, ClassifierError | StateBackendError):
        status, etype, code = 503, "server_error", "guard_unavailable"
    else:
        status, etype, code, message = 500, "server_error", "internal_error", "internal error"
    return status, {"error": {"message": message, "type": etype, "param": param, "code": code}}, headers


def upstream_error_body(status: int, raw: bytes) -> dict[str, Any]:
    """An upstream's error body in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

    A body already in that shape is kept as it is. Of any other, the upstream's text becomes the message
    (``_upstream_message``): vLLM's and SGLang's flat ``{"object": "error", "message", "type", "param", "code"}``
    (its string ``type``, ``param`` and ``code`` kept), FastAPI's ``{"detail": ...}``, ``{"error": "text"}``, a
    text/plain or HTML body. The code is ``upstream_<status>`` unless the upstream named one; an empty body says
    only ``upstream answered HTTP <status>``."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        # Parsed whatever the content type says: some servers send JSON as text/plain.
        obj = json.loads(text) if text[:1] in ("{", '"') else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return obj
    fields = obj if isinstance(obj, dict) else {}
    message = _upstream_message(obj) if obj is not None else None
    return {
        "error": {
            "message": _clip(message or text or f"upstream answered HTTP {status}"),
            "type": _str_field(fields, "type") or "upstream_error",
            "param": _str_field(fields, "param"),
            "code": _str_field(fields, "code") or f"upstream_{status}",
        }
    }


def _upstream_message(obj: Any) -> str | None:
    """The message of an upstream's JSON error body that is not OpenAI-shaped; None when it has no known field."""
    if isinstance(obj, str):
        return obj
    for key in ("error", "message"):
        if isinstance(obj.get(key), str) and obj[key]:
            return str(obj[key])
    detail = obj.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's validation errors: where and what, never the offending "input"
        parts = []
        for item in detail:
            if isinstance(item, dict) and isinstance(item.get("msg"), str):
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
                parts.append(f"{where}: {item['msg']}" if where else item["msg"])
        return "; ".join(parts) or None
    return None


def _str_field(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) and value else None


def _clip(text: str) -> str:
    return text if len(text) <= MAX_UPSTREAM_MESSAGE_CHARS else text[:MAX_UPSTREAM_MESSAGE_CHARS] + "..."


def _cut_all(obj: Any, secrets: Sequence[str]) -> Any:
    """``obj`` (JSON) with ``secrets`` cut out of each of its strings."""
    if isinstance(obj, str):
        return cut_secrets(obj, secrets)
    if isinstance(obj, dict):
        return {k: _cut_all(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cut_all(v, secrets) for v in obj]
    return obj


async def send_error(call: Call, exc: BaseException, secrets: Sequence[str] = ()) -> None:
    """Answer ``exc`` as well as the state of the response allows; ``secrets`` as for ``error_payload``."""
    status, body, headers = error_payload(exc, in_band=call.streaming, secrets=secrets)
    access = CURRENT_ACCESS.get()
    if access is not None:  # the gateway's own code: an upstream's error body may name any
        access.error = f"upstream_{exc.status_code}" if isinstance(exc, UpstreamHTTPError) else body["error"]["code"]
    if call.finished:
        return
    if call.streaming:
        # Headers are gone: end the stream in-band so it never looks complete.
        await call.body(error_tail(body), more=False)
    elif not call.started:
        data = json.dumps(body).encode()
        await call.respond(status, data, [_JSON, *headers])
    else:
        raise exc  # a non-SSE body under way: let the server abort the connection


# -- the gateway ----------------------------------------------------------------------------------


class Gateway:
    """Per-app state: the upstream client, the pipeline, counters and the shutdown machinery."""

    def __init__(self, settings: Settings, pipeline: Pipeline, metrics: Metrics, transport: Any) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.transport: httpx.AsyncBaseTransport | None = transport
        self.auth = Authenticator(settings)
        self.access_log = settings.server.access_log
        self.upstream_host = upstream_host(settings.upstream.base_url)
        lim = settings.limits
        self.limiter = RateLimiter(lim.rate_per_second, lim.rate_burst) if lim.rate_per_second else None
        self.upstream: Upstream | None = None
        self.chat: ChatHandler | None = None
        self.in_flight = 0
        self.calls: set[Call] = set()
        self.finish_tasks: set[asyncio.Task[None]] = set()
        self._finish_drop_logged = False
        self.max_pending_finish = MAX_PENDING_FINISH
        self.ready = False
        self.draining = False
        self._terminate_handle: asyncio.TimerHandle | None = None
        # Large request bodies are parsed here, off the event loop (the GIL still switches every 5 ms).
        self.parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="guardproxy-parse")
        metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape time: no per-request cost

    async def startup(self) -> None:
        self.upstream = Upstream(self.settings, self.transport)
        self.chat = ChatHandler(
            self.upstream,
            self.pipeline,
            self.metrics,
            total_timeout=self.settings.upstream.total_timeout,
            speculative=self.settings.guard.speculative,
            speculative_window=self.settings.guard.speculative_window,
            max_event_chars=self.settings.limits.max_body_bytes,
            spawn=self.exchange_done,
            timing_header=self.settings.server.timing_header,
            parse_pool=self.parse_pool,
        )
        await self.pipeline.start()
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        if self._terminate_handle is not None:
            self._terminate_handle.cancel()
        self.terminate()  # anything still open (a plain test server) ends now, in-band
        for _ in range(100):
            if not self.calls:
                break
            await asyncio.sleep(0.01)
        if self.finish_tasks:
            _, pending = await asyncio.wait(set(self.finish_tasks), timeout=FINISH_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("cancelled %d pipeline.finish tasks still running at shutdown", len(pending))
        try:
            await self.pipeline.aclose()
        finally:
            self.parse_pool.shutdown(wait=False, cancel_futures=True)
            if self.upstream is not None:
                await self.upstream.aclose()

    def begin_shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests; open exchanges may run ``timeout`` seconds more, then end in-band."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        delay = self.settings.server.shutdown_timeout if timeout is None else timeout
        logger.info("draining: %d open requests get %.1f s", len(self.calls), delay)
        self._terminate_handle = asyncio.get_running_loop().call_later(delay, self.terminate)

    def terminate(self) -> None:
        for call in list(self.calls):
            call.cut(shutdown=True)

    def log_upstream_failure(self, call: Call, exc: UpstreamError, elapsed: float, secrets: Sequence[str] = ()) -> None:
        """One line per request the upstream failed: request id, error code, upstream host, time taken.

        Never a header, a key or the upstream's URL path and query; the message is the gateway's own, with the
        upstream's error text where it sent one (in its error body or in the stream), redacted: ``secrets``
        (``proxy.request_secrets``: the gateway's upstream key, the caller's key) cut out exactly, and anything
        shaped like a key. With the output check on, the upstream's error text is not logged: it is the upstream's
        text, unchecked (a hostile upstream's harmful reply as an error message); its code and type and the length
        of its message are (``streaming.error_summary``; an in-stream error's message says as much already)."""
        if isinstance(exc, UpstreamHTTPError):  # the gateway's code, not one from the upstream's body
            code = f"upstream_{exc.status_code}"
            error = upstream_error_body(exc.status_code, exc.body)["error"]
            text = error.get("message")
            if self.pipeline.passthrough:
                message = f"{exc}: {_clip(text)}" if isinstance(text, str) and text != str(exc) else str(exc)
            else:
                message = f"{exc} ({error_summary(error)})"
        else:
            code = error_payload(exc, in_band=call.streaming)[1]["error"]["code"]
            message = _clip(exc.log_message if isinstance(exc, UpstreamErrorEvent) else str(exc))
        key = self.upstream.replace_key if self.upstream is not None else None
        message = redact(message, (*secrets, key) if key else secrets)
        # An upstream 4xx other than 429 is the client's own problem passed through, not an upstream failure.
        client_side = isinstance(exc, UpstreamHTTPError) and exc.status_code < 500 and exc.status_code != 429
        logger.log(
            logging.DEBUG if client_side else logging.WARNING,
            "upstream failure: request %s: %s from %s after %.0f ms: %s",
            call.request_id,
            code,
            self.upstream_host,
            elapsed * 1000.0,
            message,
        )

    def exchange_done(self, ex: Exchange) -> None:
        """A guarded exchange ended (the chat handler's ``spawn``): its verdicts go on the request's access line, then
        ``pipeline.finish`` runs off the request path."""
        access = CURRENT_ACCESS.get()
        if access is not None:
            access.action, access.fallback = guard_action(ex)
            access.outcome = ex.outcome
        self.spawn_finish(ex)

    def spawn_finish(self, ex: Exchange) -> None:
        if len(self.finish_tasks) >= self.max_pending_finish:
            # finish() is stuck somewhere (a state backend or store that hangs): drop, count and log once
            # rather than let pending tasks grow without bound.
            self.metrics.finish_dropped.inc()
            if not self._finish_drop_logged:
                self._finish_drop_logged = True
                logger.warning("%d pipeline.finish calls pending: dropping new ones (counted)", len(self.finish_tasks))
            return
        task = asyncio.create_task(self._finish(ex))
        self.finish_tasks.add(task)
        task.add_done_callback(self.finish_tasks.discard)

    async def _finish(self, ex: Exchange) -> None:
        try:
            await self.pipeline.finish(ex)
        except Exception:
            self.metrics.finish_errors.inc()
            logger.exception("pipeline.finish raised for request %s", ex.request_id)


class V1Endpoint:
    """Raw ASGI endpoint for every ``/v1/*`` request."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        gw = self.gw
        t0 = time.perf_counter()
        call = Call(send)
        method = scope["method"]
        route = classify_route(method, scope["path"])
        kind, path, label = route.kind, route.path, route.label
        counted = False
        watcher: asyncio.Task[None] | None = None
        # The request id comes first: even a request refused for its headers gets one.
        call.request_id = request_id(scope["headers"])
        call.headers.append((b"x-request-id", call.request_id.encode()))
        access = self._open_access(call, method, route, scope["path"])
        try:
            headers = self._check_headers(scope["headers"])
            if gw.draining:
                raise Overloaded("the gateway is shutting down")
            if gw.in_flight >= gw.settings.server.max_concurrent_requests:
                gw.metrics.rejected.labels("capacity").inc()
                raise Overloaded("the gateway is at capacity")
            gw.in_flight += 1
            counted = True
            gw.calls.add(call)
            call.tenant = gw.auth.tenant(headers)
            if gw.limiter is not None:
                gw.limiter.acquire(call.tenant)
            self._check_route(route)
            if kind is RouteKind.UNGUARDED:
                gw.metrics.unguarded.labels(label).inc()
            raw = await self._read_body(receive, headers.get("content-length"))
            watcher = asyncio.create_task(self._watch(receive, call))
            call.secrets = request_secrets(scope["headers"], gw.upstream.replace_key if gw.upstream else None)
            call.upstream_headers, call.visible_headers = split_request_headers(
                scope["headers"],
                replace_key=gw.upstream.replace_key if gw.upstream else None,
                key_header=gw.upstream.key_header if gw.upstream else "authorization",
                parses_reply=kind is RouteKind.GUARDED,
            )
            call.upstream_headers.append((b"x-request-id", call.request_id.encode()))
            call.query = scope.get("query_string", b"")
            if kind is RouteKind.GUARDED:
                await self._chat(call, headers, raw)
            else:
                await self._forward(call, method, path, scope.get("query_string", b""), raw)
        except ClientGone:
            call.disconnected = True
        except GuardProxyError as exc:
            if isinstance(exc, AuthError | RateLimited | RouteNotGuarded | RequestError):
                gw.metrics.rejected.labels(type(exc).__name__).inc()
            if call.streaming:
                gw.metrics.stream_errors.labels(error_payload(exc, in_band=True)[1]["error"]["code"]).inc()
            secrets: tuple[str, ...] = ()
            if isinstance(exc, UpstreamError):  # only an upstream's text can carry a key
                secrets = request_secrets(scope["headers"], gw.upstream.replace_key if gw.upstream else None)
                gw.log_upstream_failure(call, exc, time.perf_counter() - t0, secrets)
            await send_error(call, exc, secrets)
        except Exception as exc:
            logger.exception("unexpected error on %s %s (request %s)", method, label, call.request_id)
            await send_error(call, exc)
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
            if counted:
                gw.in_flight -= 1
                gw.calls.discard(call)
            # 499: the client went away before an answer (nginx's convention).
            gw.metrics.observe_request(label, call.status if call.started else 499, time.perf_counter() - t0)
            if access is not None:
                self._close_access(access, call, t0)

    def _open_access(
        self, call: Call, method: str, route: V1Route, raw_path: str
    ) -> tuple[AccessRecord, Token[AccessRecord | None]] | None:
        """The request's access record, where the access log is on: its body bytes counted as they are sent, and the
        record current for the exchange (``logs.CURRENT_ACCESS``)."""
        if not access_log_on(self.gw.access_log):
            return None
        path = route.path if route.kind is RouteKind.GUARDED else loggable_path(route.path or raw_path)
        record = AccessRecord(loggable_method(method), path, loggable_request_id(call.request_id))
        call.send = _CountedSend(call.send, record)
        return record, CURRENT_ACCESS.set(record)

    @staticmethod
    def _close_access(access: tuple[AccessRecord, Token[AccessRecord | None]], call: Call, t0: float) -> None:
        """Write the request's access line: the response is complete, or the client went away."""
        record, token = access
        record.status = call.status if call.started else 499  # as the metrics count it
        record.tenant = call.tenant or None
        record.streamed = call.streaming
        record.disconnected = call.disconnected
        record.write(time.perf_counter() - t0)
        CURRENT_ACCESS.reset(token)

    def _check_route(self, route: V1Route) -> None:
        """Refuse what ``classify_route`` says is not to be forwarded as it is."""
        if route.kind is RouteKind.INVALID:
            raise RequestError(route.problem, code="invalid_path")
        if route.kind is RouteKind.STORED:
            raise RouteNotGuarded(route.refusal)
        if route.kind is RouteKind.UNGUARDED and not self.gw.settings.routes.forward_unguarded_generating:
            raise RouteNotGuarded(route.refusal)

    async def _chat(self, call: Call, headers: dict[str, str], raw: bytes) -> None:
        gw = self.gw
        if headers.get("content-encoding", "identity").lower() != "identity":
            # The guard must read the body; compressed uploads are refused, not guessed at.
            raise RequestError("compressed request bodies are not supported", code="unsupported_encoding")
        t1 = time.perf_counter()
        if len(raw) <= PARSE_INLINE_BYTES:
            req = parse_chat(raw, gw.settings.limits)
        else:  # a multi-megabyte body takes the JSON parser a good part of a second: not on the loop
            req = await asyncio.get_running_loop().run_in_executor(gw.parse_pool, parse_chat, raw, gw.settings.limits)
        assert gw.chat is not None
        await gw.chat.handle(call, req, raw, time.perf_counter() - t1)

    def _check_headers(self, raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
        lim = self.gw.settings.limits
        if len(raw) > lim.max_headers:
            raise HeadersTooLarge(f"too many request headers: {len(raw)} > {lim.max_headers}")
        size = 0
        out: dict[str, str] = {}
        for name, value in raw:
            size += len(name) + len(value)
            key = name.decode("latin-1")
            if key in out and name in _SINGLE_HEADERS:
                # Two keys: the tenant would be one and the upstream might use the other.
                raise RequestError(f"duplicate {key} header", code="duplicate_header")
            out[key] = value.decode("latin-1")
        if size > lim.max_header_bytes:
            raise HeadersTooLarge(f"request headers too large: {size} bytes > {lim.max_header_bytes}")
        return out

    async def _read_body(self, receive: Any, content_length: str | None) -> bytes:
        limit = self.gw.settings.limits.max_body_bytes
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise RequestError("invalid Content-Length header", code="invalid_header") from None
            if declared > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    async def _watch(receive: Any, call: Call) -> None:
        """Wait for the client to go away; cut the exchange (and its upstream call) if it does early."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not call.finished:
            call.cut()

    async def _forward(self, call: Call, method: str, path: str, query: bytes, raw: bytes) -> None:
        """A non-guarded route: forward as is, relaying the body raw (encoding and length kept)."""
        gw = self.gw
        assert gw.upstream is not None
        upstream = gw.upstream
        try:
            async with asyncio.timeout(gw.settings.upstream.total_timeout) as deadline:
                call.arm(deadline)
                resp = await upstream.open(method, upstream.url(path, query), call.upstream_headers, raw or None)
                try:
                    if resp.status_code >= 400:
                        raise await upstream.error_from(resp)
                    sse = resp.headers.get("content-type", "").startswith("text/event-stream")
                    await call.start(resp.status_code, response_headers(resp.headers, decoded=False))
                    call.streaming = sse
                    try:
                        async for chunk in resp.aiter_raw():
                            await call.body(chunk, more=True)
                    except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
                        raise upstream_failure(exc, started=True) from exc
                    await call.body(b"", more=False)
                finally:
                    await resp.aclose()
        except TimeoutError:
            if call.disconnected:
                return
            if call.shutting_down:
                raise Overloaded("the gateway is shutting down") from None
            raise UpstreamTimeout("upstream exceeded the overall deadline") from None


class V1First:
    """Pure ASGI middleware: ``/v1/*`` goes straight to the gateway's endpoint, past the router's regex
    scan of every other route (the guard's admin and review pages among them); the rest to Starlette,
    with an ``x-request-id`` on its responses too (health probes, metrics, 404s, the guard's pages)."""

    def __init__(self, app: Any, endpoint: V1Endpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/v1/"):
            await self.endpoint(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid_text = request_id(scope["headers"])
        rid = (b"x-request-id", rid_text.encode())
        access: AccessRecord | None = None
        if access_log_on(self.endpoint.gw.access_log):
            access = AccessRecord(
                loggable_method(scope["method"]), loggable_path(scope["path"]), loggable_request_id(rid_text)
            )

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, rid]}
                if access is not None:
                    access.status = message["status"]
            elif access is not None and (body := message.get("body")):
                access.bytes_sent += len(body)
            await send(message)

        if access is None:
            await self.app(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            access.status = access.status or 500  # Starlette's error middleware answers it
            raise
        finally:
            access.write(time.perf_counter() - t0)


# -- health, readiness, metrics -------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    if gw.ready and not gw.draining:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "draining" if gw.draining else "starting"}, status_code=503)


async def not_found(request: Request) -> Response:
    body = {"error": {"message": f"no route {request.url.path}", "type": "invalid_request_error", "param": None,
                      "code": "not_found"}}  # fmt: skip
    return JSONResponse(body, status_code=404)


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE)


def create_app(
    settings: Settings,
    *,
    pipeline: Pipeline | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    metrics: Metrics | None = None,
) -> Starlette:
    """The gateway as an ASGI app. ``transport`` overrides the upstream transport (tests, benchmarks);
    ``metrics`` lets a guard built before the app record into the app's registry. ``extra_routes`` are
    mounted beside /healthz, /readyz and /metrics; ``/v1/*`` always belongs to the gateway."""
    pipeline = pipeline if pipeline is not None else Pipeline()
    metrics = metrics or Metrics()
    gateway = Gateway(settings, pipeline, metrics, transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.startup()
        try:
            yield
        finally:
            await gateway.shutdown()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *extra_routes,
        Route("/{rest:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(V1First, endpoint=V1Endpoint(gateway))])
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.pipeline = pipeline
    return app
