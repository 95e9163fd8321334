"""The gateway with no checks: a faithful passthrough, header hygiene, routes and the openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from guardproxy.fake_upstream import FakeUpstream
from guardproxy.proxy import Upstream, decodable_accept_encoding
from guardproxy.settings import Settings
from tests.gateway_support import (
    CHAT,
    HELLO,
    Answer,
    Canned,
    Env,
    Headers,
    ScriptedCheck,
    canned_gateway,
    env,
    gateway,
    shared_env,
    sse_events,
    streamed_text,
)
from tests.servers import serve

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["env", "shared_env"]  # fixtures


async def test_plain_reply_passes_through(env: Env) -> None:
    r = await env.client.post(CHAT, json=HELLO, headers={"authorization": "Bearer sk-client"})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == env.fake.reply
    assert r.headers["content-length"] == str(len(r.content))
    (rec,) = env.fake.requests
    assert rec.body == HELLO
    assert rec.headers["authorization"] == "Bearer sk-client"  # pass-through mode
    assert rec.headers["x-request-id"] == r.headers["x-request-id"]


async def test_stream_relays_every_event_and_done(env: Env) -> None:
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert streamed_text(events) == env.fake.reply
    assert "content-length" not in r.headers


async def test_query_string_goes_upstream_on_every_route(env: Env) -> None:
    await env.client.post(CHAT + "?api-version=2024-10-21", json=HELLO)
    await env.client.get("/v1/models?limit=2")
    assert [r.path for r in env.fake.requests] == [CHAT, "/v1/models"]
    assert env.fake.requests[0].query == "api-version=2024-10-21"
    assert env.fake.requests[1].query == "limit=2"


async def test_request_id_is_propagated(env: Env) -> None:
    r = await env.client.post(CHAT, json=HELLO, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert env.fake.requests[0].headers["x-request-id"] == "abc-123"
    # An id that is not a plain token is replaced, not echoed.
    r = await env.client.post(CHAT, json=HELLO, headers={"x-request-id": "a b<c>"})
    assert r.headers["x-request-id"] != "a b<c>"


async def test_hop_by_hop_headers_are_not_forwarded(env: Env) -> None:
    headers = {"connection": "keep-alive, x-hop", "x-hop": "1", "te": "trailers", "x-kept": "yes"}
    r = await env.client.post(CHAT, json=HELLO, headers=headers)
    assert r.status_code == 200
    seen = env.fake.requests[0].headers
    assert "x-hop" not in seen and "te" not in seen
    assert seen["x-kept"] == "yes"


async def test_hop_by_hop_response_headers_are_stripped(env: Env) -> None:
    env.fake.extra_headers = [
        ("keep-alive", "timeout=99"),
        ("proxy-authenticate", "Basic"),
        ("connection", "x-hop-resp"),
        ("x-hop-resp", "1"),
        ("x-upstream-kept", "yes"),
    ]
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 200
    for name in ("keep-alive", "proxy-authenticate", "x-hop-resp"):
        assert name not in r.headers
    assert r.headers["x-upstream-kept"] == "yes"


async def test_unknown_paths_get_an_openai_404(env: Env) -> None:
    r = await env.client.get("/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_upstream_cookies_are_not_kept_between_clients(transport: str) -> None:
    fake = FakeUpstream(set_cookie="session=tenant-a-secret; Path=/")
    async with serve(fake) as fake_url:
        # A host name, not an IP: cookie jars refuse cookies from bare IPs, which would hide the bug.
        upstream = fake_url.replace("127.0.0.1", "localhost")
        async with gateway(upstream_url=upstream, upstream={"transport": transport}) as env:
            r = await env.client.post(CHAT, json=HELLO, headers={"authorization": "Bearer tenant-a"})
            assert r.headers["set-cookie"].startswith("session=")  # relayed to the client that got it
            env.client.cookies.clear()
            await env.client.post(CHAT, json=HELLO, headers={"authorization": "Bearer tenant-b"})
    assert len(fake.requests) == 2
    assert "cookie" not in fake.requests[1].headers  # the gateway keeps no cookie jar


async def test_gzip_reply_is_decoded_without_stale_headers(env: Env) -> None:
    r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "gzip", "accept-encoding": "identity"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json()["choices"][0]["message"]["content"] == env.fake.reply
    # The fake really compressed it (so the test above exercised the decoding).
    raw = await env.client.post(env.upstream_url + CHAT, json=HELLO, headers={"x-fake-fault": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"


def _brotli_if_offered(headers: Headers) -> Answer:
    """A FAKE upstream that compresses with br whenever it is offered, as real ones do. Its "br" bytes are not brotli:
    a gateway that offered br could read nothing of the reply."""
    if "br" in headers.get("accept-encoding", ""):
        return 200, [("content-type", "application/json"), ("content-encoding", "br")], [b"\x1b\x2a\x00 not brotli"]
    if headers.get("x-want-sse"):
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Paris"},
                 "finish_reason": "stop"}]}  # fmt: skip
        return 200, [("content-type", "text/event-stream")], [f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()]
    reply = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
             "content": "Paris"}, "finish_reason": "stop"}]}  # fmt: skip
    return 200, [("content-type", "application/json")], [json.dumps(reply).encode()]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def brotli_upstream() -> AsyncIterator[tuple[Env, Canned]]:
    async with canned_gateway() as pair:
        pair[1].answer = _brotli_if_offered
        yield pair


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("offered", "sent"), [("gzip, deflate, br", "gzip, deflate"), ("br", "identity")])
async def test_guarded_route_offers_the_upstream_only_codings_it_can_decode(
    offered: str, sent: str, stream: bool, guarded: bool, brotli_upstream: tuple[Env, Canned]
) -> None:
    # The openai SDK with brotli importable, Node's fetch and curl --compressed all offer br.
    own, canned = brotli_upstream
    canned.seen.clear()
    own.pipeline.checks = [ScriptedCheck()] if guarded else []
    headers = {"accept-encoding": offered, **({"x-want-sse": "1"} if stream else {})}
    r = await own.client.post(CHAT, json={**HELLO, "stream": stream}, headers=headers)
    assert r.status_code == 200, r.text
    text = streamed_text(sse_events(r.text)) if stream else r.json()["choices"][0]["message"]["content"]
    assert text == "Paris"
    assert canned.seen[0]["accept-encoding"] == sent
    # A forwarded route relays the body raw: there the client's own codings go upstream as sent.
    r = await own.client.get("/v1/models", headers={"accept-encoding": offered})
    assert canned.seen[1]["accept-encoding"] == offered
    assert r.headers["content-encoding"] == "br"


@pytest.mark.parametrize(
    ("offered", "sent"),
    [
        ([b"gzip, deflate, br"], b"gzip, deflate"),
        ([b"br;q=1.0, gzip;q=0.8, zstd"], b"gzip;q=0.8"),
        ([b"gzip", b"DEFLATE, x-custom"], b"gzip, DEFLATE"),
        ([b"br"], b"identity"),
        ([b"*"], b"identity"),
        ([], b"identity"),  # no header: by RFC 9110 any coding would do
    ],
)
async def test_decodable_accept_encoding(offered: list[bytes], sent: bytes) -> None:
    assert decodable_accept_encoding(offered) == sent


async def test_split_crlf_comment_stream_is_relayed_intact(env: Env) -> None:
    r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-fake-fault": "split_sse"})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert streamed_text(events) == env.fake.reply


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "/v1/models", None),
        ("POST", "/v1/embeddings", {"model": "e", "input": "hi"}),
    ],
)
async def test_non_generating_routes_are_forwarded(method: str, path: str, payload: object, env: Env) -> None:
    r = await env.client.request(method, path, json=payload)
    assert r.status_code == 200
    assert env.fake.requests[0].path == path


@pytest.mark.parametrize(
    "path",
    [
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1//completions/",
        "/v1/chat/completions/extra",
    ],
)
async def test_unguarded_generating_routes_are_refused(path: str, env: Env) -> None:
    r = await env.client.post(path, json={"model": "m", "prompt": "hi"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "route_not_guarded"
    assert env.fake.requests == []


async def test_unguarded_generating_route_forwarded_when_allowed_and_counted() -> None:
    async with gateway(routes={"forward_unguarded_generating": True}) as env:
        r = await env.client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 200
        metrics = (await env.client.get("/metrics")).text
        assert 'guardproxy_unguarded_forwards_total{route="/v1/completions"} 1.0' in metrics


async def test_trailing_slash_still_goes_through_the_guarded_handler(env: Env) -> None:
    r = await env.client.post(CHAT + "/", content=b"{not json")
    assert r.status_code == 400  # parsed by the guarded route, not forwarded raw
    assert env.fake.requests == []


async def test_forwarded_route_keeps_gzip_encoding_raw(env: Env) -> None:
    r = await env.client.get("/v1/models", headers={"accept-encoding": "gzip"})
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "fake-model"


async def test_openai_sdk_plain_and_stream(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-test", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.choices[0].message.content == env.fake.reply
        stream = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        assert text == env.fake.reply
    finally:
        await client.close()


async def test_openai_sdk_parses_gateway_errors(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=env.url + "/v1", api_key="sk-test", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="fake-model", messages=[])
        assert bad.value.code == "empty_array"
        assert bad.value.param == "messages"
        with pytest.raises(openai.PermissionDeniedError):
            await client.completions.create(model="fake-model", prompt="hi")
        env.fake.fault = "status_429"
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}])
        assert limited.value.response.headers["retry-after"] == "7"
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_server_timing_header_carries_stage_times(stream: bool, env: Env) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream})
    entries = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    expected = {"parse", "input_check", "upstream", "gateway"} | (set() if stream else {"output_check"})
    assert expected <= set(entries)
    assert all(float(ms) >= 0 for ms in entries.values())


async def test_server_timing_header_can_be_turned_off() -> None:
    async with gateway(server={"timing_header": False}) as own:
        r = await own.client.post(CHAT, json=HELLO)
        assert "server-timing" not in r.headers


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_upstream_open_resolves_sent_once_the_request_is_out(transport: str) -> None:
    # What a speculative window waits for before it tokenizes: the request on the wire, long before the reply.
    fake = FakeUpstream(ttft=1.0)
    async with serve(fake) as url:
        upstream = Upstream(Settings(upstream={"base_url": url + "/v1", "transport": transport}))
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        headers = [(b"content-type", b"application/json")]
        opening = asyncio.create_task(
            upstream.open("POST", upstream.url(CHAT), headers, json.dumps(HELLO).encode(), sent=sent)
        )
        try:
            assert upstream.signals_sent is (transport == "aiohttp")
            if upstream.signals_sent:
                await asyncio.wait_for(asyncio.shield(sent), 0.7)  # the reply is 1 s away
                assert not opening.done()
            response = await asyncio.wait_for(opening, 10)
            assert sent.done() and response.status_code == 200  # resolved by the time open returns, in any case
            await response.aclose()
        finally:
            opening.cancel()
            await upstream.aclose()
    assert len(fake.requests) == 1
