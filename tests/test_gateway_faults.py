"""Upstream faults through the production transport to a real FAKE upstream: each ends in the right
status, or in an in-band SSE error event followed by [DONE] once a stream's headers are out."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from guardproxy.app import upstream_host
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.server import _loggable_url
from tests.gateway_support import CHAT, HELLO, Env, ScriptedCheck, env, gateway, shared_env, sse_events, streamed_text
from tests.servers import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["env", "shared_env"]  # fixtures


@pytest.mark.parametrize("status", [500, 502, 503, 429])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_status_passes_through(status: int, stream: bool, env: Env) -> None:
    check = ScriptedCheck()
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream}, headers={"x-fake-fault": f"status_{status}"})
    assert r.status_code == status
    assert r.json()["error"]["code"] == f"fake_{status}"  # the upstream's own body
    assert (r.headers.get("retry-after") == "7") is (status == 429)
    for _ in range(100):
        if check.finished:
            break
        await asyncio.sleep(0.01)
    assert check.finished[0].outcome == "upstream_error"
    assert check.finished[0].upstream_status == status


async def test_upstream_unreachable_is_502() -> None:
    async with gateway(upstream_url=f"http://127.0.0.1:{free_port()}") as own:
        r = await own.client.post(CHAT, json=HELLO)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unreachable"


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_before_headers_is_502(stream: bool, env: Env) -> None:
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream}, headers={"x-fake-fault": "reset_before_headers"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"


# One gateway with tight deadlines for the timeout rows: 0.3 s read gap, 0.8 s overall, 64 KiB events.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tight_shared() -> AsyncIterator[Env]:
    async with gateway(upstream={"read_timeout": 0.3, "total_timeout": 0.8}, limits={"max_body_bytes": 65536}) as e:
        yield e


@pytest_asyncio.fixture(loop_scope="module")
async def tight(tight_shared: Env) -> Env:
    tight_shared.fake.reset()
    tight_shared.pipeline.checks = []
    return tight_shared


async def test_never_answering_upstream_trips_the_read_timeout_of_a_stream(tight: Env) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await tight.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-fake-fault": "never"})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert "read timeout" in r.json()["error"]["message"]
    assert loop.time() - t0 < 5
    await asyncio.wait_for(tight.fake.cancelled.wait(), timeout=2)


async def test_never_answering_upstream_trips_the_overall_deadline_of_a_plain_request(tight: Env) -> None:
    # A plain reply comes only when generation ends: no read timeout, the overall deadline decides.
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await tight.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "never"})
    assert r.status_code == 504
    assert "overall deadline" in r.json()["error"]["message"]
    assert loop.time() - t0 < 5
    await asyncio.wait_for(tight.fake.cancelled.wait(), timeout=2)


# A plain request waits for its reply as long as the overall deadline allows, however short the read timeout; a
# stream may wait the read timeout for its first byte. The upstream takes 1 s to answer; the read timeout is 0.3 s.
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_slow_generation_is_waited_for_up_to_the_overall_deadline(transport: str) -> None:
    fake = FakeUpstream(ttft=1.0, slow_seconds=1.0)
    async with gateway(fake, upstream={"read_timeout": 0.3, "total_timeout": 30, "transport": transport}) as own:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await own.client.post(CHAT, json=HELLO)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == fake.reply
        assert loop.time() - t0 >= 1.0  # it did wait for the generation
        # The same on a forwarded route (a long embeddings batch, an image), and through the guard.
        slow = {"x-fake-fault": "slow"}
        r = await own.client.post("/v1/embeddings", json={"model": "e", "input": "hi"}, headers=slow)
        assert r.status_code == 200, r.text
        own.pipeline.checks = [ScriptedCheck()]
        assert (await own.client.post(CHAT, json=HELLO)).status_code == 200
        # A stream whose first byte takes longer than the read timeout is cut.
        r = await own.client.post(CHAT, json={**HELLO, "stream": True})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"


async def test_dripping_upstream_trips_the_overall_deadline(tight: Env) -> None:
    # One byte every 50 ms never trips the 0.3 s read-gap timeout; the overall deadline must.
    tight.fake.drip_interval = 0.05
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await tight.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "drip"})
    assert r.status_code == 504
    assert "overall deadline" in r.json()["error"]["message"]
    assert loop.time() - t0 < 5
    await asyncio.wait_for(tight.fake.cancelled.wait(), timeout=2)


async def test_dripping_stream_trips_the_overall_deadline_in_band(tight: Env) -> None:
    tight.fake.reply = " ".join(["tok"] * 200)
    tight.fake.token_interval = 0.05
    r = await tight.client.post(CHAT, json={**HELLO, "stream": True})
    events = sse_events(r.text)
    assert r.status_code == 200
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_timeout"
    assert streamed_text(events)  # some tokens went out before the deadline
    await asyncio.wait_for(tight.fake.cancelled.wait(), timeout=2)


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("reset_mid_stream", "upstream_stream_error"),
        ("error_in_stream", "upstream_stream_error"),
        ("cut_clean", "upstream_stream_error"),
        ("stall", "upstream_timeout"),
        ("oversized_event", "upstream_stream_error"),
    ],
)
@pytest.mark.parametrize("guarded", [False, True])
async def test_mid_stream_failure_ends_with_error_event_and_done(
    fault: str, code: str, guarded: bool, tight: Env
) -> None:
    check = ScriptedCheck()
    tight.pipeline.checks = [check] if guarded else []
    r = await tight.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-fake-fault": fault})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == code
    assert set(err) == {"message", "type", "param", "code"}
    # No chunk claims a normal finish before the error.
    assert all(c.get("finish_reason") != "stop" for e in events[:-2] for c in e.get("choices", []))
    if guarded:
        for _ in range(200):
            if check.finished:
                break
            await asyncio.sleep(0.01)
        assert check.finished[0].outcome == "upstream_error"


@pytest.mark.parametrize("guarded", [False, True])
async def test_finished_stream_without_done_is_completed(guarded: bool, env: Env) -> None:
    # Older llama.cpp servers end a complete stream without [DONE]: every choice finished, so the gateway
    # completes it rather than report an error.
    check = ScriptedCheck()
    env.pipeline.checks = [check] if guarded else []
    env.fake.replies = ["one", "two"]
    r = await env.client.post(CHAT, json={**HELLO, "stream": True, "n": 2}, headers={"x-fake-fault": "no_done"})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all("error" not in e for e in events[:-1])
    assert streamed_text(events, 0) == "one" and streamed_text(events, 1) == "two"


@pytest.mark.parametrize(("fault", "status"), [("reset_mid_stream", 502), ("stall", 504)])
@pytest.mark.parametrize("guarded", [False, True])
async def test_plain_reply_cut_mid_body(fault: str, status: int, guarded: bool, tight: Env) -> None:
    tight.pipeline.checks = [ScriptedCheck()] if guarded else []
    r = await tight.client.post(CHAT, json=HELLO, headers={"x-fake-fault": fault})
    assert r.status_code == status
    assert r.json()["error"]["type"] == "upstream_error"


async def test_upstream_non_json_reply_on_guarded_path_is_502(env: Env) -> None:
    check = ScriptedCheck()
    env.pipeline.checks = [check]
    # A plain request answered with an SSE body (the stream fault) cannot be checked: 502, not a pass. It is a bad
    # response, not a stream error: the client asked for no stream and got none.
    r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "sse"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_bad_response"
    assert r.json()["error"]["type"] == "upstream_error"


async def test_plain_reply_cut_mid_body_is_a_bad_response(tight: Env) -> None:
    r = await tight.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "reset_mid_stream"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_bad_response"


# Each failed upstream exchange is one WARNING line: request id, error code, upstream host and elapsed time, and
# never a key, a header or the upstream URL's path.
SECRET = "sk-canary-0123456789abcdef"
AUTH = {"authorization": f"Bearer {SECRET}"}


def _failure_lines(caplog: pytest.LogCaptureFixture, rid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "guardproxy.app" and rid in r.getMessage()]


def _assert_one_failure_line(caplog: pytest.LogCaptureFixture, rid: str, code: str, host: str) -> None:
    lines = _failure_lines(caplog, rid)
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    record = lines[0]
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert f"request {rid}: {code} from {host} after " in message, message
    assert re.search(r"after \d+ ms", message), message
    assert "/v1" not in message and "chat/completions" not in message
    for r in caplog.records:
        assert SECRET not in r.getMessage() and SECRET not in caplog.text
        assert "Bearer" not in r.getMessage()


async def test_unreachable_upstream_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with gateway(upstream_url=f"http://127.0.0.1:{port}") as own:
        with caplog.at_level(logging.DEBUG):
            r = await own.client.post(CHAT, json=HELLO, headers={**AUTH, "x-request-id": "rid-unreachable"})
        assert r.status_code == 502
    _assert_one_failure_line(caplog, "rid-unreachable", "upstream_unreachable", f"127.0.0.1:{port}")


async def test_hanging_upstream_is_logged_with_its_time(tight: Env, caplog: pytest.LogCaptureFixture) -> None:
    host = tight.upstream_url.removeprefix("http://")
    with caplog.at_level(logging.DEBUG):
        r = await tight.client.post(
            CHAT, json={**HELLO, "stream": True}, headers={**AUTH, "x-request-id": "rid-hang", "x-fake-fault": "never"}
        )
    assert r.status_code == 504
    _assert_one_failure_line(caplog, "rid-hang", "upstream_timeout", host)
    elapsed = float(re.search(r"after (\d+) ms", _failure_lines(caplog, "rid-hang")[0].getMessage()).group(1))  # type: ignore[union-attr]
    assert 250 <= elapsed < 5000  # the 0.3 s read timeout


@pytest.mark.parametrize(
    ("fault", "stream", "code"),
    [
        ("sse", False, "upstream_bad_response"),  # a plain request answered with a non-JSON body
        ("status_503", False, "upstream_503"),
        ("error_in_stream", True, "upstream_stream_error"),
    ],
)
async def test_failed_upstream_replies_are_logged(
    fault: str, stream: bool, code: str, env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    host = env.upstream_url.removeprefix("http://")
    rid = f"rid-{fault}"
    with caplog.at_level(logging.DEBUG):
        headers = {**AUTH, "x-request-id": rid, "x-fake-fault": fault}
        r = await env.client.post(CHAT, json={**HELLO, "stream": stream}, headers=headers)
    assert r.status_code in (200, 502, 503)
    _assert_one_failure_line(caplog, rid, code, host)


async def test_an_upstream_error_that_echoes_the_key_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    # An upstream 401 that names the key it was sent: a client-side status, logged at debug and without the key.
    async with gateway() as own:
        with caplog.at_level(logging.DEBUG):
            headers = {**AUTH, "x-request-id": "rid-401", "x-fake-fault": "status_401"}
            r = await own.client.post(CHAT, json=HELLO, headers=headers)
        assert r.status_code == 401
    lines = _failure_lines(caplog, "rid-401")
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert "upstream_401" in lines[0].getMessage()
    assert SECRET not in caplog.text


async def test_a_good_exchange_logs_no_failure(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        r = await env.client.post(CHAT, json=HELLO, headers={**AUTH, "x-request-id": "rid-fine"})
    assert r.status_code == 200
    assert _failure_lines(caplog, "rid-fine") == []


# The same faults through httpx's own transport (``upstream.transport = "httpx"``): its errors are
# translated by the same boundary, and must land on the same statuses.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def httpx_shared() -> AsyncIterator[Env]:
    async with gateway(upstream={"read_timeout": 0.3, "total_timeout": 0.8, "transport": "httpx"}) as e:
        yield e


@pytest.mark.parametrize(
    ("fault", "stream", "status", "code"),
    [
        ("reset_before_headers", False, 502, "upstream_unreachable"),
        ("never", False, 504, "upstream_timeout"),
        ("drip", False, 504, "upstream_timeout"),
        ("status_429", False, 429, "fake_429"),
        ("reset_mid_stream", False, 502, "upstream_bad_response"),
        ("reset_mid_stream", True, 200, "upstream_stream_error"),
        ("stall", True, 200, "upstream_timeout"),
        ("error_in_stream", True, 200, "upstream_stream_error"),
    ],
)
async def test_httpx_transport_maps_faults_the_same(
    fault: str, stream: bool, status: int, code: str, httpx_shared: Env
) -> None:
    httpx_shared.fake.reset()
    httpx_shared.fake.drip_interval = 0.05
    r = await httpx_shared.client.post(CHAT, json={**HELLO, "stream": stream}, headers={"x-fake-fault": fault})
    assert r.status_code == status
    if status == 200:
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == code
    else:
        assert r.json()["error"]["code"] == code


async def test_httpx_transport_unreachable_is_502() -> None:
    async with gateway(upstream_url=f"http://127.0.0.1:{free_port()}", upstream={"transport": "httpx"}) as own:
        r = await own.client.post(CHAT, json=HELLO)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unreachable"


async def test_the_upstream_named_in_logs_carries_no_credentials() -> None:
    assert upstream_host("http://user:sk-secret@example.com:8443/v1?key=abc") == "example.com:8443"
    assert upstream_host("https://api.example.com/v1") == "api.example.com"
    assert upstream_host("http://[::1]:8000/v1") == "[::1]:8000"
    # the start line names the base URL, without user info or a query (some APIs take ?key=...)
    assert _loggable_url("http://user:sk-secret@example.com/v1?key=abc#x") == "http://example.com/v1"
    assert _loggable_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
