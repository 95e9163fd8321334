"""Upstream faults through the production transport to a real FAKE upstream: each ends in the right
status, or in an in-band SSE error event followed by [DONE] once a stream's headers are out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

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


async def test_never_answering_upstream_trips_the_read_timeout(tight: Env) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await tight.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "never"})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert loop.time() - t0 < 5
    await asyncio.wait_for(tight.fake.cancelled.wait(), timeout=2)


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
    # A plain request answered with an SSE body (the stream fault) cannot be checked: 502, not a pass.
    r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "sse"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_stream_error"


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
        ("reset_mid_stream", False, 502, "upstream_stream_error"),
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
