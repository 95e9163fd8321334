"""What an upstream's errors become through the gateway: keys cut out of every upstream text a client or a log line
gets (the gateway's own key in replace mode, the caller's in any mode), the upstream's error headers and request id
passed through, and any error body in OpenAI's shape with the upstream's message and status.

The upstream here is ``Canned``: a real HTTP server on 127.0.0.1 answering each request with what a function of the
request's headers returns, so a test can have it echo the key it was sent."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.app import upstream_error_body
from guardproxy.auth import hash_key
from guardproxy.logs import redact
from guardproxy.proxy import _KeyCutStream, request_secrets
from tests.gateway_support import CHAT, HELLO, Answer, Canned, Env, Headers, ScriptedCheck, canned_gateway, sse_events

pytestmark = pytest.mark.asyncio(loop_scope="module")
Pair = tuple[Env, Canned]

UPSTREAM_KEY = "UPSTREAM-SECRET-KEY-0123456789"
GATEWAY_KEY = "gw-client-key-1-abcdef"
REPLACE: dict[str, Any] = {
    "upstream": {"api_key": UPSTREAM_KEY},
    "auth": {"gateway_keys": {"team-a": hash_key(GATEWAY_KEY)}},
}
AS_TENANT = {"authorization": f"Bearer {GATEWAY_KEY}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_pass() -> AsyncIterator[Pair]:
    async with canned_gateway() as pair:
        yield pair


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_replace() -> AsyncIterator[Pair]:
    async with canned_gateway(**REPLACE) as pair:
        yield pair


def _fresh(pair: Pair) -> Pair:
    env, canned = pair
    canned.seen.clear()
    env.pipeline.checks = []
    return pair


@pytest_asyncio.fixture(loop_scope="module")
async def passing(shared_pass: Pair) -> Pair:
    """A pass-through gateway in front of ``Canned``; set ``canned.answer``."""
    return _fresh(shared_pass)


@pytest_asyncio.fixture(loop_scope="module")
async def replacing(shared_replace: Pair) -> Pair:
    """A replace-mode gateway (``UPSTREAM_KEY`` upstream, ``GATEWAY_KEY`` for tenant team-a) in front of ``Canned``."""
    return _fresh(shared_replace)


def sent_key(headers: Headers) -> str:
    """The key a request carried, as an upstream reads it."""
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ") if auth else headers.get("api-key") or headers.get("x-api-key", "")


SSE = [("content-type", "text/event-stream")]
JSON = [("content-type", "application/json")]
CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'


def echo_in_stream(encoding: str) -> Callable[[Headers], Answer]:
    """200 SSE: a chunk, then an error event naming the key the upstream was sent (gzip-coded if asked)."""

    def answer(headers: Headers) -> Answer:
        error = {
            "error": {"message": f"Invalid API key provided: {sent_key(headers)}", "type": "invalid_request_error"}
        }
        body = CHUNK + b"data: " + json.dumps(error).encode() + b"\n\n"
        if encoding == "gzip":
            return 200, [*SSE, ("content-encoding", "gzip")], [gzip.compress(body)]
        return 200, SSE, [body]

    return answer


# -- 1. replace mode: the gateway's own key never reaches a client or a log line -----------------------------------


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
@pytest.mark.parametrize("guarded", [False, True])
async def test_replace_mode_in_stream_error_does_not_hand_the_upstream_key_to_the_client(
    encoding: str, guarded: bool, replacing: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env, canned = replacing
    canned.answer = echo_in_stream(encoding)
    env.pipeline.checks = [ScriptedCheck()] if guarded else []
    headers = {**AS_TENANT, "x-request-id": "rid-echo"}
    r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers=headers)
    assert canned.seen[0]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # it was sent, and echoed
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "upstream_stream_error"
    assert error["message"].endswith("Invalid API key provided: [REDACTED]"), error
    assert UPSTREAM_KEY not in r.text
    assert UPSTREAM_KEY not in caplog.text
    assert any(r.name == "guardproxy.app" and "rid-echo" in r.getMessage() for r in caplog.records)


async def test_replace_mode_cuts_the_upstream_key_out_of_200_bodies_on_every_route(replacing: Pair) -> None:
    # An error object in a 200 reply (OpenRouter's way), on the guarded route and a forwarded one; the key split
    # across two writes, which the cut holds together.
    def answer(headers: Headers) -> Answer:
        body = json.dumps({"error": {"message": f"Invalid API key provided: {sent_key(headers)}", "code": 401}})
        cut = body.index(UPSTREAM_KEY) + 5
        return 200, JSON, [body[:cut].encode(), body[cut:].encode()]

    env, canned = replacing
    canned.answer = answer
    for method, path in (("POST", CHAT), ("GET", "/v1/models")):
        r = await env.client.request(method, path, json=HELLO if method == "POST" else None, headers=AS_TENANT)
        assert UPSTREAM_KEY not in r.text, path
        assert "Invalid API key provided: [REDACTED]" in r.text, (path, r.text)


@pytest.mark.parametrize("path", [CHAT, "/v1/models"])
async def test_replace_mode_cuts_the_upstream_key_out_of_gzip_error_bodies(path: str, replacing: Pair) -> None:
    def answer(headers: Headers) -> Answer:
        body = json.dumps(
            {"error": {"message": f"bad key {sent_key(headers)}", "type": "x", "code": "invalid_api_key"}}
        )
        return 401, [*JSON, ("content-encoding", "gzip")], [gzip.compress(body.encode())]

    env, canned = replacing
    canned.answer = answer
    if path == CHAT:
        r = await env.client.post(path, json=HELLO, headers=AS_TENANT)
    else:
        r = await env.client.get(path, headers=AS_TENANT)
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "bad key [REDACTED]"


async def test_a_placeholder_upstream_key_is_not_cut_out_of_words() -> None:
    # A keyless upstream (a local vLLM) is given any placeholder key; cutting "x" would mangle every message.
    def answer(headers: Headers) -> Answer:
        return 400, JSON, [json.dumps({"object": "error", "message": "max_tokens exceeds the context"}).encode()]

    keys = {"upstream": {"api_key": "x"}, "auth": {"gateway_keys": {"team-a": hash_key(GATEWAY_KEY)}}}
    async with canned_gateway(**keys) as (env, canned):
        canned.answer = answer
        r = await env.client.post(CHAT, json=HELLO, headers=AS_TENANT)
    assert r.json()["error"]["message"] == "max_tokens exceeds the context"


async def test_key_cut_stream_holds_a_split_key_and_nothing_else() -> None:
    key = b"KEY-0123456789"

    class Chunks(httpx.AsyncByteStream):
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for c in self.chunks:
                yield c

    async def through(chunks: list[bytes]) -> list[bytes]:
        return [c async for c in _KeyCutStream(Chunks(chunks), key)]

    assert await through([b"data: a KEY-01", b"23456789 b\n\n"]) == [b"data: a ", b"[REDACTED] b\n\n"]
    assert await through([b"data: KE\n\n", b"data: b\n\n"]) == [b"data: KE\n\n", b"data: b\n\n"]  # not held
    assert await through([b"x KEY-0"]) == [b"x ", b"KEY-0"]  # a held tail is still sent at the end


@given(st.binary(max_size=60), st.binary(max_size=60), st.lists(st.integers(0, 200), max_size=6))
async def test_key_cut_stream_output_is_the_body_with_the_key_cut(head: bytes, tail: bytes, cuts: list[int]) -> None:
    key = b"KEY-0123456789"
    data = head + key + tail + key[:5]
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for a, b in zip(bounds, bounds[1:], strict=False):
                yield data[a:b]

    out = b"".join([c async for c in _KeyCutStream(Chunks(), key)])
    assert out == data.replace(key, b"[REDACTED]")


# -- 7. pass-through mode: the caller's key, whatever its shape, never reaches a log line ---------------------------

CALLER_KEYS = [
    {"authorization": "Bearer gsk_AbCdEfGh1234567890XyZ"},  # Groq
    {"authorization": "Bearer 0123456789abcdef0123456789abcdef"},  # Azure OpenAI's 32 hex digits
    {"api-key": "0123456789abcdef0123456789abcdef"},
    {"authorization": "Bearer AIzaSyD-EXAMPLEKEY1234567890abcd"},  # Google
    {"x-api-key": "plain-opaque-key-7d1e2f"},
]


@pytest.mark.parametrize("creds", CALLER_KEYS, ids=lambda c: next(iter(c.values()))[:12])
async def test_pass_through_caller_key_echoed_in_stream_is_not_logged(
    creds: dict[str, str], passing: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = sent_key(creds)
    env, canned = passing
    canned.answer = echo_in_stream("identity")
    r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers={**creds, "x-request-id": "rid-k"})
    assert sent_key(canned.seen[0]) == key  # pass-through: the caller's key went upstream and came back
    lines = [r.getMessage() for r in caplog.records if r.name == "guardproxy.app" and "rid-k" in r.getMessage()]
    assert len(lines) == 1 and "Invalid API key provided: [REDACTED]" in lines[0], lines
    assert key not in caplog.text
    assert sse_events(r.text)[-2]["error"]["message"].endswith("[REDACTED]")


@pytest.mark.parametrize("creds", CALLER_KEYS[:2], ids=["groq", "azure"])
async def test_pass_through_caller_key_echoed_in_an_error_body_is_not_logged(
    creds: dict[str, str], passing: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def answer(headers: Headers) -> Answer:
        return 401, JSON, [json.dumps({"error": {"message": f"invalid key {sent_key(headers)}"}}).encode()]

    env, canned = passing
    canned.answer = answer
    r = await env.client.post(CHAT, json=HELLO, headers={**creds, "x-request-id": "rid-401k"})
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "invalid key [REDACTED]"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "guardproxy.app" and "rid-401k" in r.getMessage()]
    assert line.endswith("upstream answered HTTP 401: invalid key [REDACTED]"), line
    assert sent_key(creds) not in caplog.text


async def test_request_secrets_are_the_tokens_sent_and_the_gateway_key() -> None:
    raw = [(b"authorization", b"Bearer  sk-abc-123456"), (b"api-key", b"azure-key-0001"), (b"cookie", b"a=b")]
    assert request_secrets(raw, "upstream-key-1") == ("upstream-key-1", "sk-abc-123456", "azure-key-0001")
    assert request_secrets([(b"authorization", b"EMPTY")], None) == ()  # placeholders are no secrets
    assert request_secrets([(b"x-api-key", b"bare-key-value")], None) == ("bare-key-value",)


async def test_redact_cuts_known_keys_exactly_and_keeps_the_patterns() -> None:
    text = "keys: 0123456789abcdef0123456789abcdef and sk-proj-abcdefghijkl and gsk_AbCdEfGh1234567890XyZ"
    out = redact(text, ["0123456789abcdef0123456789abcdef"])
    assert out == "keys: [REDACTED] and [REDACTED] and [REDACTED]"
    assert redact("a max_tokens value", ["x"]) == "a max_tokens value"


# -- 6. the upstream's error headers and request id ------------------------------------------------------------------

RATE_HEADERS = [
    ("x-should-retry", "false"),
    ("retry-after", "2"),
    ("retry-after-ms", "1500"),
    ("x-ratelimit-limit-requests", "500"),
    ("x-ratelimit-remaining-requests", "0"),
    ("x-ratelimit-reset-requests", "120ms"),
    ("x-request-id", "req_123"),
]
QUOTA = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": None,
                   "code": "insufficient_quota"}}  # fmt: skip


def quota(headers: Headers) -> Answer:
    return 429, [*JSON, *RATE_HEADERS], [json.dumps(QUOTA).encode()]


@pytest.mark.parametrize(("method", "path", "stream"), [("POST", CHAT, False), ("POST", CHAT, True),
                                                        ("GET", "/v1/models", False)])  # fmt: skip
async def test_upstream_error_headers_pass_through(method: str, path: str, stream: bool, passing: Pair) -> None:
    env, canned = passing
    canned.answer = quota
    env.pipeline.checks = [ScriptedCheck()]
    body = {**HELLO, "stream": stream} if method == "POST" else None
    r = await env.client.request(method, path, json=body, headers={"x-request-id": "gw-rid-1"})
    assert r.status_code == 429
    assert r.json() == QUOTA
    for name, value in RATE_HEADERS[:-1]:
        assert r.headers.get_list(name) == [value], name
    assert r.headers.get_list("x-request-id") == ["gw-rid-1"]  # the gateway's
    assert r.headers["x-upstream-request-id"] == "req_123"
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)


async def test_openai_sdk_obeys_the_upstreams_x_should_retry(passing: Pair) -> None:
    env, canned = passing
    canned.answer = quota
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-test-client", max_retries=2)
    try:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    assert len(canned.seen) == 1  # x-should-retry: false, so no retry
    assert limited.value.code == "insufficient_quota"
    assert limited.value.response.headers["x-upstream-request-id"] == "req_123"


@pytest.mark.parametrize(("method", "path", "stream"), [("POST", CHAT, False), ("POST", CHAT, True),
                                                        ("GET", "/v1/models", False)])  # fmt: skip
async def test_upstream_request_id_comes_as_x_upstream_request_id(
    method: str, path: str, stream: bool, passing: Pair
) -> None:
    def answer(headers: Headers) -> Answer:
        ids = [("x-request-id", "req_abc"), ("x-ratelimit-remaining-tokens", "99")]
        if headers.get("x-fake-stream"):
            return 200, [*SSE, *ids], [CHUNK.replace(b'"Hi"}', b'"Hi"},"finish_reason":"stop"'), b"data: [DONE]\n\n"]
        reply = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                 "content": "Hi"}, "finish_reason": "stop"}]}  # fmt: skip
        return 200, [*JSON, *ids], [json.dumps(reply).encode()]

    env, canned = passing
    canned.answer = answer
    body = {**HELLO, "stream": stream} if method == "POST" else None
    headers = {"x-request-id": "gw-rid-2", **({"x-fake-stream": "1"} if stream else {})}
    r = await env.client.request(method, path, json=body, headers=headers)
    assert r.status_code == 200
    assert r.headers.get_list("x-request-id") == ["gw-rid-2"]
    assert r.headers["x-upstream-request-id"] == "req_abc"
    assert r.headers["x-ratelimit-remaining-tokens"] == "99"


# -- 8. any upstream error body in OpenAI's shape, with the upstream's message -------------------------------------

VALIDATION = {
    "detail": [
        {"loc": ["body", "messages", 0, "content"], "msg": "Field required", "type": "missing",
         "input": {"role": "user", "secret": "the user's text"}},
        {"loc": ["body", "n"], "msg": "Input should be greater than 0", "type": "greater_than"},
    ]
}  # fmt: skip
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
HTML = "<html><body><h1>502 Bad Gateway</h1></body></html>"
SHAPES = [
    # (status, content type, body, message, type, code)
    (400, "application/json", {"object": "error", "message": "max_tokens must be at most 4096",
                               "type": "BadRequestError", "param": None, "code": 400},
     "max_tokens must be at most 4096", "BadRequestError", "upstream_400"),
    (404, "application/json", {"object": "error", "message": "The model `x` does not exist.",
                               "type": "NotFoundError", "param": "model", "code": "model_not_found"},
     "The model `x` does not exist.", "NotFoundError", "model_not_found"),
    (422, "application/json", VALIDATION,
     "body.messages.0.content: Field required; body.n: Input should be greater than 0",
     "upstream_error", "upstream_422"),
    (404, "application/json", {"detail": "Not Found"}, "Not Found", "upstream_error", "upstream_404"),
    (400, "application/json", {"error": "Invalid model name: foo"}, "Invalid model name: foo",
     "upstream_error", "upstream_400"),
    (500, "text/plain", OOM, OOM, "upstream_error", "upstream_500"),
    (502, "text/html", HTML, HTML, "upstream_error", "upstream_502"),
    (503, "text/plain", '{"message": "overloaded, try later"}', "overloaded, try later",
     "upstream_error", "upstream_503"),
    (503, "text/plain", "", "upstream answered HTTP 503", "upstream_error", "upstream_503"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "ctype", "body", "message", "etype", "code"), SHAPES)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_bodies_become_openai_errors_with_the_upstreams_message(
    status: int, ctype: str, body: Any, message: str, etype: str, code: str, stream: bool, passing: Pair
) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    env, canned = passing
    canned.answer = lambda _: (status, [("content-type", ctype)], [raw])
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream})
    sdk = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-test-client", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        await sdk.close()
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error == {"message": message, "type": etype, "param": error["param"], "code": code}
    assert "the user's text" not in r.text  # a validation error's "input" is the client's own request
    assert err.value.status_code == status and message in err.value.message


async def test_an_openai_shaped_error_body_is_kept_as_it_is() -> None:
    body = {"error": {"message": "This model's maximum context length is 4096 tokens.", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}, "extra": 1}  # fmt: skip
    assert upstream_error_body(400, json.dumps(body).encode()) == body


async def test_a_long_upstream_text_is_clipped() -> None:
    message = upstream_error_body(500, b"Traceback " + b"x" * 10_000)["error"]["message"]
    assert message.startswith("Traceback xxx") and message.endswith("...") and len(message) <= 2003
