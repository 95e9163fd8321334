"""Upstream faults through the production transport to a real FAKE upstream: each ends in the right
status, or in an in-band SSE error event followed by [DONE] once a stream's headers are out."""

from __future__ import annotations

import asyncio

import pytest

from guardproxy.fake_upstream import FakeUpstream
from tests.gateway_support import CHAT, HELLO, ScriptedCheck, gateway, sse_events, streamed_text
from tests.servers import free_port


@pytest.mark.parametrize("status", [500, 502, 503, 429])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_status_passes_through(status: int, stream: bool) -> None:
    check = ScriptedCheck()
    async with gateway(checks=[check]) as env:
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
    async with gateway(upstream_url=f"http://127.0.0.1:{free_port()}") as env:
        r = await env.client.post(CHAT, json=HELLO)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unreachable"


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_before_headers_is_502(stream: bool) -> None:
    async with gateway() as env:
        r = await env.client.post(
            CHAT, json={**HELLO, "stream": stream}, headers={"x-fake-fault": "reset_before_headers"}
        )
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unreachable"


async def test_never_answering_upstream_trips_the_read_timeout() -> None:
    async with gateway(upstream={"read_timeout": 0.5}) as env:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "never"})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "upstream_timeout"
        assert loop.time() - t0 < 5


async def test_dripping_upstream_trips_the_overall_deadline() -> None:
    # One byte every 50 ms never trips a 1 s read-gap timeout; the overall deadline must.
    fake = FakeUpstream(drip_interval=0.05)
    async with gateway(fake, upstream={"read_timeout": 1.0, "total_timeout": 1.0}) as env:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "drip"})
        assert r.status_code == 504
        assert "overall deadline" in r.json()["error"]["message"]
        assert loop.time() - t0 < 5
        await asyncio.wait_for(env.fake.cancelled.wait(), timeout=2)


async def test_dripping_stream_trips_the_overall_deadline_in_band() -> None:
    fake = FakeUpstream(reply=" ".join(["tok"] * 200), token_interval=0.05)
    async with gateway(fake, upstream={"read_timeout": 1.0, "total_timeout": 1.0}) as env:
        r = await env.client.post(CHAT, json={**HELLO, "stream": True})
        events = sse_events(r.text)
        assert r.status_code == 200
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "upstream_timeout"
        assert streamed_text(events)  # some tokens went out before the deadline
        await asyncio.wait_for(env.fake.cancelled.wait(), timeout=2)


@pytest.mark.parametrize(
    ("fault", "code", "settings"),
    [
        ("reset_mid_stream", "upstream_stream_error", {}),
        ("error_in_stream", "upstream_stream_error", {}),
        ("no_done", "upstream_stream_error", {}),
        ("stall", "upstream_timeout", {"upstream": {"read_timeout": 0.5}}),
        ("oversized_event", "upstream_stream_error", {"limits": {"max_body_bytes": 64 * 1024}}),
    ],
)
@pytest.mark.parametrize("guarded", [False, True])
async def test_mid_stream_failure_ends_with_error_event_and_done(
    fault: str, code: str, settings: dict[str, dict[str, float]], guarded: bool
) -> None:
    checks = [ScriptedCheck()] if guarded else []
    async with gateway(checks=checks, **settings) as env:
        r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-fake-fault": fault})
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert err["code"] == code
        assert set(err) == {"message", "type", "param", "code"}
        # No chunk claims a normal finish before the error (no_done did finish, then lost its [DONE]).
        assert fault == "no_done" or all(
            c.get("finish_reason") != "stop" for e in events[:-2] for c in e.get("choices", [])
        )


@pytest.mark.parametrize(("fault", "status"), [("reset_mid_stream", 502), ("stall", 504)])
@pytest.mark.parametrize("guarded", [False, True])
async def test_plain_reply_cut_mid_body(fault: str, status: int, guarded: bool) -> None:
    checks = [ScriptedCheck()] if guarded else []
    async with gateway(checks=checks, upstream={"read_timeout": 0.5}) as env:
        r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": fault})
        assert r.status_code == status
        assert r.json()["error"]["type"] == "upstream_error"


async def test_upstream_non_json_reply_on_guarded_path_is_502() -> None:
    check = ScriptedCheck()
    async with gateway(checks=[check]) as env:
        # A plain request answered with an SSE body (the stream fault) cannot be checked: 502, not a pass.
        r = await env.client.post(CHAT, json=HELLO, headers={"x-fake-fault": "sse"})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_stream_error"
