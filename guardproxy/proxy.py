"""The upstream side: one HTTP client, header hygiene, upstream URLs and error translation (routes: ``routes``).

httpx is the client API; the transport under it is ``httpx_aiohttp.AiohttpTransport`` by default
because it measured faster here than httpx's own (see ``bench/RESULTS.md``). Failures of either
transport are translated into the ``UpstreamError`` tree at one boundary (``upstream_failure``).

Timeouts: ``connect_timeout`` bounds the TCP connect and the wait for a pooled connection. A request that asks
for a stream (``"stream": true``) may wait ``read_timeout`` for its first byte and between two reads after it.
A plain request gets its reply only when generation ends, so nothing but the exchange's overall deadline
(``total_timeout``, held by the caller) bounds its wait.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from typing import Literal

import aiohttp
import httpx

from guardproxy.errors import (
    UpstreamError,
    UpstreamHTTPError,
    UpstreamStreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from guardproxy.logs import CURRENT_ACCESS, MIN_SECRET_CHARS, REDACTED
from guardproxy.routes import canonical_path, path_problem
from guardproxy.settings import Settings

TransportKind = Literal["aiohttp", "httpx"]
# Idle upstream connections are dropped before the common 5 s server keep-alive (uvicorn, so vLLM) runs
# out: reusing a connection the server is closing at that moment fails a POST that cannot be retried.
KEEPALIVE_SECONDS = 4.0

# RFC 9110 7.6.1 connection-specific fields, plus proxy-connection (non-standard but seen in the wild).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never forwarded upstream: set by the transport, or replaced by the gateway.
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-request-id"}
# Credentials: never in Exchange.headers (checks, logs, drills), and not sent upstream in replace mode.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key", b"cookie", b"proxy-authorization"})
_KEY_HEADERS = CREDENTIAL_HEADERS - {b"cookie"}
_SCHEMED_HEADERS = frozenset({b"authorization", b"proxy-authorization"})  # "Bearer <key>"
# What the gateway can decode of an upstream body it parses: httpx's decoders without the optional packages
# (br needs brotli, zstd needs zstandard; neither is a dependency). httpx reads any other coding as identity.
DECODABLE_ENCODINGS = frozenset({"gzip", "deflate", "identity"})
# The ASGI server writes its own date/server; a body we re-encode gets a fresh length and no encoding. The
# upstream's x-request-id goes to the client as x-upstream-request-id: x-request-id is the gateway's.
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}
_RESPONSE_DROP_DECODED = _RESPONSE_DROP | {b"content-length", b"content-encoding"}
UPSTREAM_REQUEST_ID = b"x-upstream-request-id"
# A request body that asks for a stream. Inside a JSON string every quote is escaped, so a quoted "stream"
# followed by a colon is always a key (a nested one, rarely, which only gives that request a stream's timeouts).
_STREAM_REQUEST = re.compile(rb'"stream"\s*:\s*true')


def decodable_accept_encoding(values: Iterable[bytes]) -> bytes:
    """The client's ``Accept-Encoding`` (all its values) cut to the codings the gateway can decode, q-values kept;
    ``identity`` when none is left (``br`` alone, ``*``, or no header: which by RFC 9110 accepts any coding)."""
    kept = []
    for value in values:
        for part in value.decode("latin-1").split(","):
            coding = part.split(";", 1)[0].strip().lower()
            if coding in DECODABLE_ENCODINGS:
                kept.append(part.strip())
    return ", ".join(kept).encode("latin-1") if kept else b"identity"


def split_request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    replace_key: str | None,
    key_header: str = "authorization",
    parses_reply: bool = False,
) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    """Headers to send upstream, and the credential-free headers the checks see (``Exchange.headers``).

    Header names from an ASGI server are already lower-case. Names listed in ``Connection`` are hop-by-hop too.
    ``parses_reply``: the gateway decodes and reads the reply (the guarded route), so the upstream is offered only
    the content codings it can decode (``decodable_accept_encoding``); a forwarded reply is relayed raw, in
    whatever coding the client accepts.
    """
    raw = list(raw)
    drop = _REQUEST_DROP
    for name, value in raw:
        if name == b"connection":
            drop = drop | {t.strip().lower().encode() for t in value.decode("latin-1").split(",")}
    if replace_key is not None:
        drop = drop | CREDENTIAL_HEADERS
    if parses_reply:
        drop = drop | {b"accept-encoding"}
    upstream: list[tuple[bytes, bytes]] = []
    visible: dict[str, str] = {}
    for name, value in raw:
        if name not in drop:
            upstream.append((name, value))
        if name not in CREDENTIAL_HEADERS and name not in HOP_BY_HOP:
            visible[name.decode("latin-1")] = value.decode("latin-1")
    if parses_reply:
        upstream.append((b"accept-encoding", decodable_accept_encoding(v for n, v in raw if n == b"accept-encoding")))
    if replace_key is not None:
        if key_header == "authorization":
            upstream.append((b"authorization", b"Bearer " + replace_key.encode()))
        else:  # Azure OpenAI's ``api-key``, Anthropic-style ``x-api-key``: the bare key
            upstream.append((key_header.encode("latin-1"), replace_key.encode()))
    return upstream, visible


def request_secrets(raw: Iterable[tuple[bytes, bytes]], replace_key: str | None) -> tuple[str, ...]:
    """The keys that no upstream error text may carry to a client or a log line: the gateway's own upstream key
    (replace mode) and the caller's, as sent (the token of ``Authorization``, the value of ``x-api-key`` or
    ``api-key``). Known exactly, they are cut out exactly, whatever their shape."""
    out = [replace_key] if replace_key else []
    for name, value in raw:
        if name in _KEY_HEADERS:
            text = value.decode("latin-1").strip()
            token = text.partition(" ")[2].strip()  # after the scheme ("Bearer")
            out.append(token if name in _SCHEMED_HEADERS and token else text)
    return tuple(s for s in out if len(s) >= MIN_SECRET_CHARS)


def response_headers(headers: httpx.Headers, *, decoded: bool) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client gets them (lower-case names for ASGI).

    The upstream's ``x-request-id`` (OpenAI's ``req_...``, which its support asks for) comes as
    ``x-upstream-request-id``, unless the upstream sent one of those itself (another gateway in front of it)."""
    drop = _RESPONSE_DROP_DECODED if decoded else _RESPONSE_DROP
    conn = headers.get("connection")
    if conn:
        drop = drop | {t.strip().lower().encode() for t in conn.split(",")}
    out = []
    upstream_id: bytes | None = None
    for name, value in headers.raw:
        low = name.lower()
        if low == b"x-request-id":
            upstream_id = upstream_id or value
        elif low not in drop:
            out.append((low, value))
    if upstream_id and all(name != UPSTREAM_REQUEST_ID for name, _ in out):
        out.append((UPSTREAM_REQUEST_ID, upstream_id))
    return out


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        yield cur
        cur = cur.__cause__ or cur.__context__
        seen += 1


def upstream_failure(exc: BaseException, *, started: bool) -> UpstreamError:
    """Translate a transport error into the ``UpstreamError`` tree.

    ``started``: the upstream's response headers had arrived. httpx_aiohttp maps every aiohttp
    connection error (a reset, a disconnect) to ``httpx.ConnectTimeout``, so the aiohttp cause, when
    there is one, decides, not the httpx class.
    """
    for cause in _causes(exc):
        if isinstance(cause, aiohttp.ClientError | OSError) and not isinstance(cause, httpx.HTTPError):
            if isinstance(cause, aiohttp.ServerTimeoutError | TimeoutError):
                what = "did not answer in time" if not started else "stalled mid-response"
                return UpstreamTimeout(f"upstream {what} (read timeout)")
            if isinstance(cause, aiohttp.ClientConnectorError):
                return UpstreamUnreachable("could not connect to the upstream")
            break
    if isinstance(exc, httpx.ConnectTimeout) and not isinstance(exc.__cause__, aiohttp.ClientError):
        return UpstreamTimeout("timed out connecting to the upstream")
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamTimeout("timed out waiting for an upstream connection")
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc.__cause__, aiohttp.ClientError):
        return UpstreamTimeout("upstream stalled (read timeout)" if started else "upstream did not answer in time")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnreachable("could not connect to the upstream")
    if isinstance(exc, httpx.DecodingError):
        return UpstreamStreamError("upstream sent a body that could not be decoded")
    if started:
        return UpstreamStreamError("the upstream connection broke mid-response")
    return UpstreamUnreachable("the upstream closed the connection before answering")


# The future ``Upstream.open(sent=...)`` resolves once the request's body goes to the socket. A context variable
# because aiohttp's trace callbacks run in the task that sends (or in the body writer it starts, which copies
# the context), and that is the only path from a request to its trace.
_SENT: ContextVar[asyncio.Future[None] | None] = ContextVar("guardproxy_upstream_sent", default=None)


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


async def _on_body_chunk(_session: object, _ctx: object, _params: object) -> None:
    # Called just before the chunk is handed to the transport, in the same task step as that write: whoever
    # waits on the future runs after the bytes left.
    _resolve(_SENT.get())


def _sent_trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_on_body_chunk)
    return trace


def make_transport(settings: Settings, kind: TransportKind = "aiohttp") -> httpx.AsyncBaseTransport:
    up = settings.upstream
    limits = httpx.Limits(
        max_connections=up.max_connections,
        max_keepalive_connections=up.max_keepalive_connections,
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits, retries=0)
    from httpx_aiohttp import AiohttpTransport

    def session() -> aiohttp.ClientSession:
        # Created lazily inside the running loop. No cookie jar: the default one would store a cookie
        # the upstream set on one tenant's reply and send it with the next tenant's request. No invented
        # Accept-Encoding or User-Agent: the upstream sees what the client sent.
        connector = aiohttp.TCPConnector(
            limit=up.max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            trace_configs=[_sent_trace()],
        )

    return AiohttpTransport(limits=limits, trust_env=False, client=session)


class UpstreamErrorReply(UpstreamHTTPError):
    """An ``UpstreamHTTPError`` read from the upstream's response, with the response headers the client gets
    along with it as on a 200 (``Retry-After``, ``x-should-retry``, ``retry-after-ms``, ``x-ratelimit-*``,
    ``x-upstream-request-id``, ...): clients and SDKs decide whether and when to retry from them. Not those of the
    body, which the app writes anew."""

    def __init__(self, status_code: int, body: bytes, *, content_type: str, headers: list[tuple[bytes, bytes]]) -> None:
        retry_after = next((v.decode("latin-1") for k, v in headers if k == b"retry-after"), None)
        super().__init__(status_code, body, content_type=content_type, retry_after=retry_after)
        self.headers = headers


def _key_prefix_at_end(data: bytes, key: bytes) -> int:
    """The length of the longest tail of ``data`` that is a proper prefix of ``key`` (0 if none)."""
    i = data.find(key[:1], max(0, len(data) - len(key) + 1))
    while i != -1:
        if key.startswith(data[i:]):
            return len(data) - i
        i = data.find(key[:1], i + 1)
    return 0


class _KeyCutStream(httpx.AsyncByteStream):
    """An identity-coded upstream body with the gateway's own key cut out as it streams: an upstream that echoes
    the key it was sent (an error event in a 200 stream, an error object in a 200 reply) must not hand it to a
    tenant. A read that ends with what could be the key's start holds that tail back until the next read; SSE
    events end with a blank line, so a stream is not held back."""

    def __init__(self, inner: httpx.AsyncByteStream, key: bytes) -> None:
        self.inner = inner
        self.key = key

    async def __aiter__(self) -> AsyncIterator[bytes]:
        held = b""
        async for chunk in self.inner:
            data = held + chunk
            if self.key in data:
                data = data.replace(self.key, REDACTED.encode())
            keep = _key_prefix_at_end(data, self.key)
            held = data[len(data) - keep :]
            if len(data) > keep:
                yield data[: len(data) - keep]
        if held:
            yield held

    async def aclose(self) -> None:
        await self.inner.aclose()


class Upstream:
    """The one upstream HTTP client of an app, created at startup.

    Requests go straight to the client's transport rather than through ``AsyncClient.send``: a shared
    client keeps a cookie jar, and a cookie the upstream set on one tenant's response must never ride
    along on another tenant's request; the client's auth, redirect and hook machinery is not wanted on a
    proxy's hot path either. The ``AsyncClient`` still owns the transport's lifecycle.
    """

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        up = settings.upstream
        # A base URL ending in /v1 maps /v1/x to base/x; any other base gets the path after /v1 appended.
        self.base = str(httpx.URL(up.base_url)).rstrip("/")
        # A stream's first byte and each gap after it: read_timeout. A plain reply: no read timeout, the caller's
        # overall deadline (total_timeout) bounds it (see the module docstring).
        self.timeout = httpx.Timeout(
            connect=up.connect_timeout, read=up.read_timeout, write=up.read_timeout, pool=up.connect_timeout
        )
        self.plain_timeout = httpx.Timeout(
            connect=up.connect_timeout, read=None, write=up.read_timeout, pool=up.connect_timeout
        )
        self.transport = transport or make_transport(settings, up.transport)
        # whether ``open(sent=...)`` resolves ``sent`` when the body is written (else: when open returns)
        self.signals_sent = transport is None and up.transport == "aiohttp"
        self.client = httpx.AsyncClient(transport=self.transport, timeout=self.timeout, trust_env=False)
        self._stream_extensions = {"timeout": self.timeout.as_dict()}
        self._plain_extensions = {"timeout": self.plain_timeout.as_dict()}
        self.replace_key = up.api_key.get_secret_value() if up.api_key is not None else None
        # the key cut out of every upstream body (replace mode), unless it is a placeholder (logs.MIN_SECRET_CHARS)
        key = self.replace_key
        self._cut_key = key.encode() if key is not None and len(key) >= MIN_SECRET_CHARS else None
        self.key_header = up.api_key_header

    def url(self, path: str, query: bytes = b"") -> str:
        """The upstream URL of ``path``: a canonical ``/v1/...`` path (``routes.classify_route``'s ``V1Route.path``),
        used as it is, so the upstream is sent exactly the path that was classified."""
        if not path.startswith("/v1/") or path_problem(path) is not None or canonical_path(path) != path:
            raise ValueError(f"not a canonical /v1/ path: {path!r}")  # a bug: classify_route refuses these
        url = self.base + path[3:]
        return url + "?" + query.decode("latin-1") if query else url

    async def open(
        self,
        method: str,
        url: str | httpx.URL,
        headers: list[tuple[bytes, bytes]],
        content: bytes | None,
        *,
        sent: asyncio.Future[None] | None = None,
        stream: bool | None = None,
    ) -> httpx.Response:
        """Send a request; return once the response headers arrived (the body is read by the caller).

        ``sent`` is resolved once the request body goes to the socket where the transport reports it
        (``signals_sent``), and in any case by the time this returns or raises. A body that asks for a stream gets
        the read timeout; any other waits as long as the caller's deadline allows (``stream``: whether it asks for
        one, where the caller parsed it; else read from the body). In replace mode the gateway's key is cut out of
        an identity-coded response body as it is read (``_KeyCutStream``)."""
        streamed = stream if stream is not None else content is not None and _STREAM_REQUEST.search(content) is not None
        extensions = self._stream_extensions if streamed else self._plain_extensions
        token = _SENT.set(sent)
        try:
            request = httpx.Request(method, url, headers=headers, content=content, extensions=extensions)
            response = await self.transport.handle_async_request(request)
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            raise upstream_failure(exc, started=False) from exc
        finally:
            _SENT.reset(token)
            _resolve(sent)
        response.request = request
        access = CURRENT_ACCESS.get()  # the request's access line, where the log is on: the upstream's status
        if access is not None:
            access.upstream_status = response.status_code
        body = response.stream
        if self._cut_key is not None and isinstance(body, httpx.AsyncByteStream):
            if response.headers.get("content-encoding", "identity").strip().lower() == "identity":
                response.stream = _KeyCutStream(body, self._cut_key)
        return response

    @staticmethod
    async def read(response: httpx.Response, limit: int | None = None) -> bytes:
        """The whole (decoded) body; a broken or oversized body is an ``UpstreamError``."""
        try:
            if limit is None:
                return await response.aread()
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise UpstreamStreamError(f"upstream body over {limit} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            raise upstream_failure(exc, started=True) from exc

    async def error_from(self, response: httpx.Response) -> UpstreamHTTPError:
        """An upstream error status as an ``UpstreamErrorReply`` carrying its body (at most 64 KiB, decoded) and
        the headers the client gets with it.

        In replace mode the gateway's own upstream key is cut out of the body: an upstream that echoes
        the key it was sent ("invalid key sk-...") must not hand it to the client. The app cuts the caller's
        key too, from whatever text of the body it sends (``app.error_payload``).
        """
        try:
            body = await Upstream.read(response, limit=64 * 1024)
        except UpstreamError:
            body = b""
        if self._cut_key is not None and self._cut_key in body:  # a compressed body, which open could not cut
            body = body.replace(self._cut_key, REDACTED.encode())
        headers = [h for h in response_headers(response.headers, decoded=True) if h[0] != b"content-type"]
        return UpstreamErrorReply(
            response.status_code, body, content_type=response.headers.get("content-type", ""), headers=headers
        )

    async def aclose(self) -> None:
        await self.client.aclose()
