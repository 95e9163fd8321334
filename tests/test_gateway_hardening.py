"""Hardening rows of the gateway: secrets never leak, faults leave nothing behind, load beyond capacity
gets a fast 503, and every stream ends complete or in-band."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket

import aiohttp
import pytest

from guardproxy.auth import hash_key
from tests.gateway_support import CHAT, HELLO, Env, ScriptedCheck, env, gateway, shared_env, sse_events

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["env", "shared_env"]  # fixtures

CANARY = "sk-canary-7f3a9c1e5b2d4f60a8"


async def test_canary_key_never_appears_in_logs_metrics_or_error_bodies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    creds = {"authorization": f"Bearer {CANARY}", "x-api-key": CANARY}
    check = ScriptedCheck()
    async with gateway(checks=[check]) as env:  # pass-through mode: the key goes upstream, nowhere else
        c = env.client
        for fault in ("", "status_500", "status_429", "reset_before_headers", "error_in_stream"):
            for stream in (False, True):
                headers = {**creds, "x-fake-fault": fault} if fault else creds
                r = await c.post(CHAT, json={**HELLO, "stream": stream}, headers=headers)
                seen.append(r.text + repr(r.headers))
        for raw in (b"{bad", b"", b'{"messages": []}'):
            r = await c.post(CHAT, content=raw, headers=creds)
            seen.append(r.text + repr(r.headers))
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers=creds)
        seen.append(r.text)
        seen.append((await c.get("/metrics")).text)
        assert env.fake.requests[0].headers["authorization"] == f"Bearer {CANARY}"  # it did go upstream
    assert all(CANARY not in repr(ex.headers) for ex in check.finished)
    # Replace mode: the canary as the gateway's upstream key, and as a wrong client key.
    keys = {"alice": hash_key("gw-alice-key-000000")}
    async with gateway(upstream={"api_key": CANARY}, auth={"gateway_keys": keys}) as env:
        for auth in (f"Bearer {CANARY}", "Bearer gw-alice-key-000000", ""):
            for fault in ("", "status_500", "status_401"):
                headers = {"authorization": auth, "x-fake-fault": fault} if auth else {"x-fake-fault": fault}
                r = await env.client.post(CHAT, json=HELLO, headers=headers)
                seen.append(r.text + repr(r.headers))
        seen.append((await env.client.get("/metrics")).text)
    for text in seen:
        assert CANARY not in text
    assert CANARY not in caplog.text
    for record in caplog.records:
        assert CANARY not in str(record.args) and CANARY not in str(record.exc_text or "")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_faults_leave_no_connections_tasks_or_descriptors_behind(env: Env) -> None:
    async def normal_batch() -> None:
        for _ in range(3):
            rs = await asyncio.gather(*(env.client.post(CHAT, json={**HELLO, "stream": i % 2 == 0}) for i in range(4)))
            assert all(r.status_code == 200 for r in rs)

    await normal_batch()  # warm the pools
    await asyncio.sleep(0.2)
    fds, tasks = _open_fds(), len(asyncio.all_tasks())
    check = ScriptedCheck()
    for guarded in (False, True):
        env.pipeline.checks = [check] if guarded else []
        for fault in ("reset_before_headers", "reset_mid_stream", "error_in_stream", "no_done", "status_503"):
            for stream in (False, True):
                await env.client.post(CHAT, json={**HELLO, "stream": stream}, headers={"x-fake-fault": fault})
        # A client that leaves mid-stream.
        env.fake.reply, env.fake.token_interval = " ".join(["tok"] * 300), 0.01
        async with env.client.stream("POST", CHAT, json={**HELLO, "stream": True}) as r:
            async for _ in r.aiter_lines():
                break
        env.fake.reset()
    await normal_batch()
    await asyncio.sleep(0.3)
    assert _open_fds() <= fds + 4  # the upstream pool may hold a few more idle keep-alive connections
    assert len(asyncio.all_tasks()) <= tasks
    assert not env.app.state.gateway.calls and env.app.state.gateway.in_flight == 0
    assert not env.app.state.gateway.finish_tasks


async def test_a_thousand_concurrent_streams_complete_or_get_a_fast_503() -> None:
    async with gateway(server={"max_concurrent_requests": 200}) as env:
        env.fake.reply = "one two three four five"
        env.fake.token_interval = 0.02
        statuses: list[int] = []
        bad: list[str] = []
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one() -> None:
                async with session.post(env.url + CHAT, json={**HELLO, "stream": True}) as r:
                    text = await r.text()
                    statuses.append(r.status)
                    if r.status == 200 and sse_events(text)[-1] != "[DONE]":
                        bad.append(text[-200:])
                    if r.status == 503 and not r.headers.get("retry-after"):
                        bad.append("503 without Retry-After")

            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(1000))), timeout=60)
        assert not bad, bad[:3]
        assert set(statuses) <= {200, 503}
        assert statuses.count(200) >= 200
        assert len(statuses) == 1000


async def test_a_client_that_stops_reading_holds_back_the_upstream(env: Env) -> None:
    # A 24 MB stream to a client that reads nothing. The gateway relays chunk by chunk and waits for the
    # client's socket to drain, so it buffers nothing itself: what the FAKE upstream manages to send
    # levels off at what the kernel's socket buffers hold, far from the end of the stream.
    env.fake.reply = " ".join(["x" * 4000] * 6000)
    total = len(env.fake.reply)
    host, port = env.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        body = json.dumps({**HELLO, "stream": True}).encode()
        head = (
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        await loop.sock_sendall(sock, head.encode() + body)
        samples = [0]
        for _ in range(20):  # wait (up to 8 s) until it levels off: two equal samples 0.4 s apart
            await asyncio.sleep(0.4)
            samples.append(env.fake.requests[0].sent_bytes if env.fake.requests else 0)
            if samples[-1] and samples[-1] == samples[-2]:
                break
        assert samples[-1] == samples[-2], samples  # levelled off: backpressure
        assert 0 < samples[-1] < total // 2, (samples, total)
    finally:
        sock.close()
    await asyncio.wait_for(env.fake.cancelled.wait(), timeout=3)  # and the client leaving cancels it
