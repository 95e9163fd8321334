"""Routes that must not slip past the guard: dot segments and other paths an upstream could read differently,
stored completions, generating side doors, and JSON keys a case-insensitive decoder reads differently. A real
gateway in front of a FAKE upstream, both served on 127.0.0.1; odd paths are written to the socket as they are (an
HTTP client would resolve the dot segments itself)."""

from __future__ import annotations

import asyncio
import json
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import openai
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.proxy import Upstream
from guardproxy.routes import RouteKind, classify_route
from guardproxy.settings import Settings
from tests.gateway_support import CHAT, HELLO, Env, gateway
from tests.servers import serve

pytestmark = pytest.mark.asyncio(loop_scope="module")
BODY = json.dumps(HELLO).encode()


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = json.loads(self.body)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err


async def raw_request(url: str, method: str, target: str, body: bytes = b"") -> Raw:
    """One HTTP/1.1 request with ``target`` written as it is."""
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    head = f"{method} {target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    writer.write(head.encode("latin-1") + body)
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    top, _, payload = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            out, rest = out + rest[:n], rest[n + 2 :]
        payload = out
    return Raw(int(lines[0].split()[1]), headers, payload)


@dataclass
class Recorder:
    """A FAKE upstream that keeps each request's method, raw path and body bytes, and answers a minimal reply."""

    seen: list[tuple[str, bytes, bytes]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.seen.append((scope["method"], scope["raw_path"], body))
        reply: dict[str, Any] = {"object": "list", "data": []}
        if scope["path"].endswith("/chat/completions"):
            message = {"role": "assistant", "content": "FAKE hi"}
            reply = {"id": "c1", "object": "chat.completion", "model": "m", "choices": [
                {"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip
        data = json.dumps(reply).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared() -> AsyncIterator[Env]:
    async with gateway() as env:
        yield env


@pytest_asyncio.fixture(loop_scope="module")
async def env(shared: Env) -> Env:
    shared.fake.reset()
    return shared


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def recorded() -> AsyncIterator[tuple[Env, Recorder]]:
    rec = Recorder()
    async with serve(rec) as url, gateway(upstream_url=url) as env:
        yield env, rec


# -- 1: dot segments and paths another parser reads differently ------------------------------------------------

DOT_PATHS = [
    "/v1/../chat/completions",
    "/v1/%2e%2e/chat/completions",
    "/v1/%2E%2E/chat/completions",
    "/v1/%2e%2E/v1/%2e%2e/chat/completions",  # the openai SDK with base_url=".../v1/%2e%2e/v1/%2e%2e"
    "/v1/models/../../chat/completions",
    "/v1/models/../completions",
    "/v1/models%2f..%2f..%2fchat/completions",
    "/v1/models%2F%2e%2e%2F%2e%2e%2Fchat%2Fcompletions",
    "/v1/./chat/completions",
    "/v1/%2e/chat/completions",
    "/v1/models/.../chat/completions",
]
ODD_PATHS = [
    "/v1/chat/completions;x=1",
    "/v1/messages;x=1",
    "/v1/models%3b/chat/completions",
    "/v1/models%5c..%5cchat%5ccompletions",  # backslashes
    "/v1/models%252e%252e/chat/completions",  # decoded twice, a dot segment
    "/v1/embeddings%3f/chat/completions",
    "/v1/models%23/chat/completions",
    "/v1/chat/completions%00",
    "/v1/models%20",
    "/v1/models/%EF%BC%8E%EF%BC%8E/chat/completions",  # fullwidth dots
]


@pytest.mark.parametrize("target", DOT_PATHS + ODD_PATHS)
@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_paths_another_parser_reads_differently_are_refused(method: str, target: str, env: Env) -> None:
    r = await raw_request(env.url, method, target, BODY if method == "POST" else b"")
    assert r.status == 400, (target, r.body)
    err = r.error()
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_path")
    assert r.headers["x-request-id"]
    assert env.fake.requests == []


async def test_openai_sdk_with_a_dot_segment_base_url_is_refused(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=env.url + "/v1/%2e%2e/v1/%2e%2e", api_key="sk-test", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert bad.value.code == "invalid_path"
    finally:
        await client.close()
    assert env.fake.requests == []


@pytest.mark.parametrize(
    "target", ["/v1//chat/completions", "/v1/chat//completions/", "/v1/chat/completions/", "/v1/Chat/Completions"]
)
async def test_spellings_of_the_chat_route_go_through_the_guarded_handler(target: str, env: Env) -> None:
    r = await raw_request(env.url, "POST", target, b"{not json")
    assert r.status == 400 and r.error()["code"] == "invalid_json"  # parsed by the guarded route, not forwarded
    assert env.fake.requests == []


async def test_upper_case_v1_is_not_the_gateway_s_and_is_not_forwarded(env: Env) -> None:
    r = await raw_request(env.url, "POST", "/V1/chat/completions", BODY)
    assert r.status == 404
    assert env.fake.requests == []


@pytest.mark.parametrize(
    ("method", "target", "upstream_path"),
    [
        ("GET", "/v1//models/", b"/v1/models"),
        ("GET", "/v1/models/org%2Fname", b"/v1/models/org/name"),  # how the openai SDK sends "org/name"
        ("POST", "/v1/embeddings/", b"/v1/embeddings"),
        ("POST", "/v1//chat/completions/", b"/v1/chat/completions"),
    ],
)
async def test_the_upstream_gets_exactly_the_classified_path(
    method: str, target: str, upstream_path: bytes, recorded: tuple[Env, Recorder]
) -> None:
    env, rec = recorded
    rec.seen.clear()
    r = await raw_request(env.url, method, target, BODY if method == "POST" else b"")
    assert r.status == 200, r.body
    assert [(m, p) for m, p, _ in rec.seen] == [(method, upstream_path)]
    route = classify_route(method, target.replace("%2F", "/"))  # the ASGI path is decoded
    assert route.path.encode() == upstream_path


async def test_upstream_url_takes_only_a_canonical_v1_path() -> None:
    upstream = Upstream(Settings(upstream={"base_url": "http://127.0.0.1:9/v1"}))
    try:
        assert upstream.url("/v1/models/x", b"a=1") == "http://127.0.0.1:9/v1/models/x?a=1"
        for bad in ("/v1/../chat/completions", "/chat/completions", "/v1/a;b", "/v1//models", "/v1/models/", "/V1/x"):
            with pytest.raises(ValueError, match="canonical"):
                upstream.url(bad)
    finally:
        await upstream.aclose()


# -- 4 and 16: stored completions, other methods, generating side doors ----------------------------------------

STORED = [
    ("GET", "/v1/chat/completions/chatcmpl-stored-1"),
    ("GET", "/v1/chat/completions/chatcmpl-stored-1/messages"),
    ("GET", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/chatcmpl-stored-1"),
    ("DELETE", "/v1/chat/completions/chatcmpl-stored-1"),
    ("PUT", "/v1/chat/completions"),
    ("PATCH", "/v1/chat/completions"),
    ("DELETE", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions.json"),
    ("POST", "/v1/chat/other"),
]


@pytest.mark.parametrize(("method", "target"), STORED)
async def test_stored_completions_and_other_methods_on_the_chat_route_are_refused(
    method: str, target: str, env: Env
) -> None:
    r = await env.client.request(method, target, content=BODY if method != "GET" else None)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("permission_error", "route_not_guarded")
    assert "stored chat completions" in err["message"] and "POST /v1/chat/completions" in err["message"]
    assert "forward_unguarded_generating" not in err["message"]  # no setting forwards them
    assert env.fake.requests == []


async def test_stored_completions_stay_refused_when_unguarded_generating_routes_are_forwarded() -> None:
    async with gateway(routes={"forward_unguarded_generating": True}) as own:
        for method, target in STORED:
            r = await own.client.request(method, target, content=BODY if method != "GET" else None)
            assert r.status_code == 403, (method, target)
        assert own.fake.requests == []


SIDE_DOORS = [
    ("POST", "/v1/evals"),
    ("POST", "/v1/evals/eval-1/runs"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/videos"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/files/file-1/content"),
    ("GET", "/v1/responses/resp-1"),
    ("PUT", "/v1/completions"),
    ("GET", "/v1/made-up"),
    ("GET", "/v1/"),
    ("GET", "/v1//"),
    ("POST", "/v1/models"),
    ("DELETE", "/v1/models"),
    ("PUT", "/v1/audio/speech"),
    ("GET", "/v1/audio/transcriptions"),
    ("GET", "/v1/embeddings"),
]


@pytest.mark.parametrize(("method", "target"), SIDE_DOORS)
async def test_routes_off_the_allowlist_are_refused(method: str, target: str, env: Env) -> None:
    r = await env.client.request(method, target, content=BODY if method != "GET" else None)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "route_not_guarded"
    assert "guards POST /v1/chat/completions" in err["message"]
    assert "routes.forward_unguarded_generating" in err["message"]  # what would forward it
    assert "GUARDPROXY_ROUTES__FORWARD_UNGUARDED_GENERATING" in err["message"]
    assert env.fake.requests == []


BATCH_ROUTES = [
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/batch-1"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/file-1/content"),
    ("DELETE", "/v1/files/file-1"),
    ("POST", "/v1/uploads"),
]


@pytest.mark.parametrize(("method", "target"), BATCH_ROUTES)
async def test_batches_and_their_files_are_refused_saying_why(method: str, target: str, env: Env) -> None:
    r = await env.client.request(method, target, content=BODY if method == "POST" else None)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("permission_error", "route_not_guarded")
    assert "batch" in err["message"] and "the guard never reads" in err["message"], err["message"]
    assert "routes.forward_unguarded_generating" in err["message"]
    assert env.fake.requests == []
    assert classify_route(method, target).kind is RouteKind.UNGUARDED


PREFLIGHT = {"origin": "https://app.example", "access-control-request-headers": "authorization, content-type"}
MULTIPART = (
    b'--b\r\ncontent-disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.wav"\r\ncontent-type: audio/wav\r\n\r\n'
    b"RIFF\x00\x00\x00\x00WAVE\r\n--b--\r\n"
)


@pytest.mark.parametrize(
    ("method", "target", "body", "headers"),
    [
        # a CORS preflight: no body, and its reply is headers only
        ("OPTIONS", "/v1/chat/completions", b"", {**PREFLIGHT, "access-control-request-method": "POST"}),
        ("OPTIONS", "/v1/models", b"", {**PREFLIGHT, "access-control-request-method": "GET"}),
        ("DELETE", "/v1/models/ft:gpt-4o-mini:org::abc123", b"", {}),
        ("POST", "/v1/audio/transcriptions", MULTIPART, {"content-type": "multipart/form-data; boundary=b"}),
        ("POST", "/v1/audio/translations", MULTIPART, {"content-type": "multipart/form-data; boundary=b"}),
        ("POST", "/v1/audio/speech", b'{"model": "tts-1", "input": "hello", "voice": "alloy"}', {}),
    ],
)  # fmt: skip
async def test_non_generating_routes_a_client_sdk_uses_are_forwarded_as_they_are(
    method: str, target: str, body: bytes, headers: dict[str, str], recorded: tuple[Env, Recorder]
) -> None:
    env, rec = recorded
    rec.seen.clear()
    r = await env.client.request(method, target, content=body or None, headers=headers)
    assert r.status_code == 200, r.text
    assert rec.seen == [(method, target.encode(), body)]
    assert classify_route(method, target).kind is RouteKind.FORWARD


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/fake-model"),
        ("HEAD", "/v1/models"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/moderations"),
        ("POST", "/v1/rerank"),
        ("POST", "/v1/score"),
    ],
)
async def test_allowlisted_routes_are_forwarded(method: str, target: str, env: Env) -> None:
    r = await env.client.request(method, target, content=BODY if method == "POST" else None)
    assert r.status_code == 200, r.text
    assert [(q.method, q.path) for q in env.fake.requests] == [(method, target)]
    assert classify_route(method, target).kind is RouteKind.FORWARD


# -- 3: keys a case-insensitive decoder reads differently ------------------------------------------------------

ASK = "the ask"
CASE_BODIES = [
    ("both_messages", {"messages": [{"role": "user", "content": "hi"}], "Messages": [{"role": "user", "content": ASK}]},
     "Messages"),
    ("both_content", {"messages": [{"role": "user", "content": "hi", "Content": ASK}]}, "messages[0].Content"),
    ("both_role", {"messages": [{"role": "system", "content": ASK, "ROLE": "user"}]}, "messages[0].ROLE"),
    ("nested_anywhere", {"messages": [{"role": "user", "content": "hi"}], "metadata": {"a": "1", "A": "2"}},
     "metadata.A"),
    ("lone_content", {"messages": [{"role": "user", "Content": ASK}]}, "messages[0].Content"),
    ("lone_stream", {"messages": [{"role": "user", "content": "hi"}], "Stream": True}, "Stream"),
    ("lone_n", {"messages": [{"role": "user", "content": "hi"}], "N": 5}, "N"),
    ("long_s_stream", {"messages": [{"role": "user", "content": "hi"}], "\u017ftream": True}, "\u017ftream"),
    ("kelvin_max_tokens", {"messages": [{"role": "user", "content": "hi"}], "max_to\u212aens": 10**9},
     "max_to\u212aens"),
    ("part_text", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "Text": ASK}]}]},
     "messages[0].content[0].Text"),
    ("lone_part_text", {"messages": [{"role": "user", "content": [{"type": "input_text", "TEXT": ASK}]}]},
     "messages[0].content[0].TEXT"),
    ("tool_arguments", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "Arguments": ASK}}]}]},
     "messages[0].tool_calls[0].function.Arguments"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "param"), [c[1:] for c in CASE_BODIES], ids=[c[0] for c in CASE_BODIES])
async def test_case_variant_keys_are_a_named_400(payload: dict[str, Any], param: str, env: Env) -> None:
    r = await env.client.post(CHAT, content=json.dumps({"model": "m", **payload}).encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] in {"duplicate_key", "case_variant_key"}
    assert err["param"] == param
    assert param in err["message"]
    assert env.fake.requests == []


async def test_free_form_keys_may_have_any_case_and_the_body_goes_upstream_byte_exact(
    recorded: tuple[Env, Recorder],
) -> None:
    env, rec = recorded
    rec.seen.clear()
    schema = {"type": "object", "properties": {"Content": {"type": "string"}, "Name": {"type": "string"}}}
    raw = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"Role": "x"},
         "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]},
        indent=1,
    ).encode()  # fmt: skip
    r = await env.client.post(CHAT, content=raw)
    assert r.status_code == 200, r.text
    assert rec.seen == [("POST", b"/v1/chat/completions", raw)]


# A lenient upstream's reading of a path: decoded once more, backslashes as slashes, ";" parameters cut, dot
# segments resolved, case folded. Whatever it makes of a forwarded path must not be a generating route.
_GENERATING = ("/v1/chat", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/evals", "/v1/images")
_SEGMENTS = ["v1", "chat", "completions", "models", "embeddings", "responses", ".", "..", "%2e", "%2E%2e", "%2f",
             "%5c", "\\", ";x", "%3b", "%25", "", "Chat", "x"]  # fmt: skip


def _lenient(path: str) -> str:
    path = unquote(path).replace("\\", "/")
    path = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    return posixpath.normpath(path).lower()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_SEGMENTS), max_size=6), st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
async def test_no_forwarded_path_reads_as_a_generating_route(segments: list[str], method: str) -> None:
    raw = "/v1/" + "/".join(segments)
    route = classify_route(method, unquote(raw))  # the ASGI server decodes once
    if route.kind is RouteKind.INVALID:
        return
    assert posixpath.normpath(route.path) == route.path.rstrip("/") or route.path == "/v1/"
    if route.kind is RouteKind.FORWARD:
        assert not _lenient(route.path).startswith(_GENERATING), (raw, route)
