"""Client disconnects cancel the upstream; shutdown drains, then ends open streams in-band."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from guardproxy.fake_upstream import FakeUpstream
from tests.gateway_support import (
    CHAT,
    HELLO,
    Env,
    ScriptedCheck,
    env,
    gateway,
    shared_env,
    sse_events,
    streamed_text,
    wait_ready,
)
from tests.servers import free_port, serve

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["env", "shared_env"]  # fixtures

ROOT = Path(__file__).resolve().parent.parent
LONG = " ".join(f"t{i}" for i in range(400))


async def _wait_finished(check: ScriptedCheck) -> None:
    for _ in range(300):
        if check.finished:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("pipeline.finish was not called")


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_first_byte_cancels_upstream(guarded: bool, stream: bool, env: Env) -> None:
    env.fake.ttft = 30
    check = ScriptedCheck()
    env.pipeline.checks = [check] if guarded else []
    with pytest.raises(httpx.ReadTimeout):
        await env.client.post(CHAT, json={**HELLO, "stream": stream}, timeout=httpx.Timeout(10, read=0.5))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(env.fake.cancelled.wait(), timeout=3)
    assert loop.time() - t0 < 1.0 + 0.5  # within a second (plus scheduling slack)
    assert env.fake.cancellations == 1
    if guarded:
        await _wait_finished(check)
        assert check.finished[0].outcome == "client_disconnected"


@pytest.mark.parametrize("guarded", [False, True])
async def test_disconnect_mid_stream_cancels_upstream(guarded: bool, env: Env) -> None:
    env.fake.reply, env.fake.token_interval = LONG, 0.05
    check = ScriptedCheck()
    env.pipeline.checks = [check] if guarded else []
    async with env.client.stream("POST", CHAT, json={**HELLO, "stream": True}) as r:
        seen = 0
        async for _ in r.aiter_lines():
            seen += 1
            if seen >= 6:
                break
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(env.fake.cancelled.wait(), timeout=3)
    assert loop.time() - t0 < 1.5
    if guarded:
        await _wait_finished(check)
        assert check.finished[0].outcome == "client_disconnected"


async def test_drain_lets_short_streams_finish_and_ends_long_ones_in_band() -> None:
    fake = FakeUpstream(reply=LONG, token_interval=0.05)
    async with gateway(fake, server={"shutdown_timeout": 0.8}) as env:
        body = {**HELLO, "stream": True}
        long = [asyncio.create_task(env.client.post(CHAT, json=body)) for _ in range(5)]
        short = asyncio.create_task(env.client.post(CHAT, json=body, headers={"x-fake-reply": "a b c"}))
        for _ in range(200):
            if len(env.fake.requests) == 6:
                break
            await asyncio.sleep(0.01)
        env.app.state.gateway.begin_shutdown()
        assert (await env.client.get("/readyz")).status_code == 503
        refused = await env.client.post(CHAT, json=HELLO)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        done = await asyncio.wait_for(short, timeout=5)
        assert sse_events(done.text)[-1] == "[DONE]" and streamed_text(sse_events(done.text)) == "a b c"
        for r in await asyncio.wait_for(asyncio.gather(*long), timeout=5):
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            assert events[-2]["error"]["code"] == "overloaded"
            assert "shutting down" in events[-2]["error"]["message"]
        await asyncio.wait_for(env.fake.cancelled.wait(), timeout=2)


async def test_sigterm_drains_then_ends_streams_with_error_and_done() -> None:
    fake = FakeUpstream(reply=LONG, token_interval=0.05)
    async with serve(fake) as upstream:
        port = free_port()
        env = {
            **os.environ,
            "GUARDPROXY_SERVER__SHUTDOWN_TIMEOUT": "1.0",
            "GUARDPROXY_GUARD__ENABLED": "false",
            "PYTHONPATH": str(ROOT),
        }
        cmd = [sys.executable, "-m", "guardproxy.cli", "serve", "--upstream", upstream + "/v1", "--port", str(port)]
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)
        try:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20, limits=limits) as client:
                await wait_ready(client, timeout_s=15)
                body = {**HELLO, "stream": True}
                streams = [asyncio.create_task(client.post(CHAT, json=body)) for _ in range(100)]
                for _ in range(500):
                    if len(fake.requests) == 100:
                        break
                    await asyncio.sleep(0.01)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                proc.send_signal(signal.SIGTERM)
                results = await asyncio.wait_for(asyncio.gather(*streams), timeout=10)
                elapsed = loop.time() - t0
            for r in results:
                events = sse_events(r.text)
                assert events[-1] == "[DONE]"
                assert events[-2]["error"]["code"] == "overloaded"
            assert 0.8 < elapsed < 5, elapsed  # ran on for about shutdown_timeout, then ended
            assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
