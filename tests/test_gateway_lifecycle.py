"""Client disconnects cancel the upstream; shutdown drains, then ends open streams in-band."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
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


# --- logging: --log-level reaches the guardproxy loggers; SIGHUP reloads log one line each -----------------------


async def _start_serve(*args: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("GUARDPROXY_")}
    cmd = [sys.executable, "-m", "guardproxy.cli", "serve", "--port", str(port), *args]
    proc = await asyncio.create_subprocess_exec(
        *cmd, env={**base, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT, stderr=subprocess.PIPE
    )
    return proc, port


async def _lines_until(proc: asyncio.subprocess.Process, needle: str, seen: list[str], within: float = 15) -> None:
    """Read the process's stderr into ``seen`` until a line holds ``needle`` (within ``within`` seconds)."""
    stream = proc.stderr
    assert stream is not None

    async def read() -> None:
        while line := await stream.readline():
            seen.append(line.decode().rstrip("\n"))
            if needle in seen[-1]:
                return
        raise AssertionError(f"no {needle!r} in the log:\n" + "\n".join(seen))

    await asyncio.wait_for(read(), timeout=within)


async def _stop(proc: asyncio.subprocess.Process, seen: list[str]) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
        seen.extend((err or b"").decode().splitlines())


def _ours(lines: list[str]) -> list[str]:
    """``LEVEL guardproxy.module: message`` of the lines guardproxy's loggers wrote (after the timestamp)."""
    parts = [line.split(" ", 2) for line in lines]
    return [p[2] for p in parts if len(p) == 3 and p[2].split(" ", 1)[-1].startswith("guardproxy")]


async def test_log_level_error_silences_the_gateways_own_info_lines() -> None:
    async with serve(FakeUpstream()) as upstream:
        proc, port = await _start_serve("--upstream", upstream + "/v1", "--log-level", "error", "--no-guard", env={})
        seen: list[str] = []
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
                await wait_ready(client, timeout_s=15)
                assert (await client.post(CHAT, json=HELLO)).status_code == 200
        finally:
            await _stop(proc, seen)
    assert proc.returncode == 0
    assert seen == []  # neither "guardproxy listening on" nor "draining" (INFO), nor uvicorn's INFO lines


async def test_sighup_reload_logs_one_readable_line_and_debug_reaches_the_gateways_loggers(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    good = (ROOT / "policies" / "default.toml").read_text(encoding="utf-8")
    assert "\nharm_threshold = 0.5\n" in good
    policy.write_text(good, encoding="utf-8")
    line_of_threshold = good.split("\nharm_threshold = 0.5\n")[0].count("\n") + 2
    env = {"GUARDPROXY_GUARD__EARLY_EXIT": "false", "GUARDPROXY_STATE__HMAC_SECRET": "h" * 32}
    args = ("--policy", str(policy), "--store", f"sqlite:///{tmp_path / 'drills.db'}", "--log-level", "debug")
    proc, _ = await _start_serve(*args, env=env)
    seen: list[str] = []
    try:
        await _lines_until(proc, "guardproxy listening on", seen, within=60)  # logged once bound
        start = len(seen)
        proc.send_signal(signal.SIGHUP)
        await _lines_until(proc, "policies reloaded", seen)
        reloaded = seen[start:]
        policy.write_text(good.replace("\nharm_threshold = 0.5\n", "\nharm_threshold = 7\n"), encoding="utf-8")
        start = len(seen)
        proc.send_signal(signal.SIGHUP)
        await _lines_until(proc, "policy reload rejected", seen)
        rejected = seen[start:]
    finally:
        await _stop(proc, seen)
    assert not any("ReloadResult" in line or "Traceback" in line for line in seen), seen
    # the digest beside name@version: the parsed policy's sha256, first 8 hex digits
    from guardproxy.policy import load_policy
    from guardproxy.policyset import policy_digest

    digest = policy_digest(load_policy(ROOT / "policies" / "default.toml"))[:8]
    # --log-level debug reaches guardproxy's own loggers, not only uvicorn's
    assert _ours(reloaded) == [
        "DEBUG guardproxy.server: SIGHUP: reloading the policy files",
        f"INFO guardproxy.guard: policies reloaded: default@2026.12.07.1 ({digest})",
    ]
    debug, failure = _ours(rejected)
    assert debug == "DEBUG guardproxy.server: SIGHUP: reloading the policy files"
    level_and_name, message = failure.split(": ", 1)
    assert level_and_name == "ERROR guardproxy.guard"
    assert message.startswith(f"policy reload rejected, keeping default@2026.12.07.1: {policy}:{line_of_threshold}: ")
    assert "harm_threshold" in message


async def test_listening_is_logged_once_the_port_is_bound_and_never_on_a_port_clash() -> None:
    async with serve(FakeUpstream()) as upstream:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            base = {k: v for k, v in os.environ.items() if not k.upper().startswith("GUARDPROXY_")}
            cmd = [sys.executable, "-m", "guardproxy.cli", "serve", "--port", str(port), "--upstream", upstream + "/v1"]
            proc = await asyncio.create_subprocess_exec(
                *cmd, "--no-guard", env={**base, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stderr=subprocess.PIPE
            )
            try:
                _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        clash = err.decode()
        assert proc.returncode != 0 and "address already in use" in clash, clash
        assert "listening on" not in clash, clash
        # a free port: the line comes once, after uvicorn has bound it
        proc, _ = await _start_serve("--upstream", upstream + "/v1", "--no-guard", env={})
        seen: list[str] = []
        try:
            await _lines_until(proc, "guardproxy listening on", seen, within=30)
        finally:
            await _stop(proc, seen)
    assert proc.returncode == 0
    bound = next(i for i, line in enumerate(seen) if "Uvicorn running on" in line)
    listening = [i for i, line in enumerate(seen) if "guardproxy listening on" in line]
    assert len(listening) == 1 and bound < listening[0], seen


# --- counters a dashboard or an absent() alert reads are there at 0 before a first event ---------------------


def _zero_series(text: str, name: str) -> set[str]:
    """The label values (as written) of ``name``'s series at 0."""
    prefix = name + "{"
    return {line[len(prefix) :].rsplit("} ", 1)[0] for line in text.splitlines() if line.startswith(prefix)
            and line.endswith(" 0.0")} | ({""} if f"{name} 0.0" in text.splitlines() else set())  # fmt: skip


async def test_event_counters_are_exported_at_zero_before_a_first_event() -> None:
    from guardproxy.routes import classify_route

    async with gateway() as env:  # speculative modes off, unguarded routes refused: these counters never move here
        text = (await env.client.get("/metrics")).text
    assert "guardproxy_speculative_cancelled_total 0.0" in text.splitlines()
    unguarded = _zero_series(text, "guardproxy_unguarded_forwards_total")
    for path in ("/v1/completions", "/v1/images/generations", "/v1/responses", "/v1/assistants", "/v1/nonsense"):
        route = classify_route("POST", path)
        assert route.kind.value == "unguarded", path
        assert f'route="{route.label}"' in unguarded, (path, unguarded)
    streamed = _zero_series(text, "guardproxy_stream_errors_total")
    for code in ("upstream_stream_error", "upstream_malformed", "upstream_timeout", "overloaded", "guard_unavailable"):
        assert f'code="{code}"' in streamed, (code, streamed)


async def test_every_code_a_stream_can_end_with_has_a_series_from_the_start() -> None:
    """The in-band codes of the gateway's own errors; an upstream's HTTP error comes before a stream starts."""
    from guardproxy import errors
    from guardproxy.app import error_payload
    from guardproxy.metrics import STREAM_ERROR_CODES
    from guardproxy.streaming import MalformedReply, SSEError, UpstreamErrorEvent

    raised_before_a_reply = (errors.RequestError, errors.AuthError, errors.RateLimited, errors.RouteNotGuarded,
                             errors.UpstreamHTTPError, errors.ConfigError)  # fmt: skip
    special: dict[type[BaseException], BaseException] = {  # those whose constructor takes more than a message
        MalformedReply: MalformedReply("choices", "x"), errors.ClassifierPartial: errors.ClassifierPartial("x", []),
        UpstreamErrorEvent: UpstreamErrorEvent("x", "x"),
    }  # fmt: skip

    def classes(cls: type[BaseException]) -> set[type[BaseException]]:
        return {cls, *(c for sub in cls.__subclasses__() for c in classes(sub))}

    # the gateway's own errors: a subclass elsewhere (the bench's NothingMeasured) is never raised in a stream
    gateway = {"guardproxy.errors", "guardproxy.streaming"}
    samples = [
        special.get(c) or c("x")
        for c in classes(errors.GuardProxyError)
        if not issubclass(c, raised_before_a_reply) and c.__module__ in gateway
    ]
    assert {errors.Overloaded, errors.UpstreamTimeout, SSEError, MalformedReply} <= {type(e) for e in samples}
    for exc in samples:
        code = error_payload(exc, in_band=True)[1]["error"]["code"]
        assert code in STREAM_ERROR_CODES, (type(exc).__name__, code)
