"""The shared HMAC secret is checked when the gateway starts, not at its first request: ``guardproxy serve`` with a
redis:// state backend and a missing or too-short ``state.hmac_secret`` exits at once with one line naming the
setting; a replica whose secret differs from the fingerprint another replica stored in Redis reports it (ERROR
line, ``guardproxy_state_secret_mismatch`` at 1) before it takes a request. The machine's real Redis at
127.0.0.1:6379, under a key prefix of each test's own."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from guardproxy.conversation.integrity import secret_fingerprint
from guardproxy.server import GatewayServer, build_app, uvicorn_config
from guardproxy.settings import Settings
from tests.hardening_support import FakeClassifier
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
SECRET = "boot-check-secret-of-forty-characters-xx"  # 40 characters


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``guardproxy serve`` with the real guard model and the given GUARDPROXY_* variables (no others)."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("GUARDPROXY_")}
    cmd = [sys.executable, "-m", "guardproxy.cli", "serve", "--port", str(free_port()),
           "--upstream", "http://127.0.0.1:9/v1", "--store", f"sqlite:///{tmp_path / 'drills.db'}"]  # fmt: skip
    return subprocess.run(
        cmd, env={**base, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("secret", "problem"),
    [(None, "is not set"), ("", "is not set"), ("short-but-not-empty", "shorter than 32 characters")],
)
def test_serve_with_redis_state_and_no_usable_secret_exits_naming_the_setting(
    tmp_path: Path, redis_prefix: str, secret: str | None, problem: str
) -> None:
    env = {"GUARDPROXY_STATE__URL": REDIS_URL, "GUARDPROXY_STATE__PREFIX": redis_prefix}
    if secret is not None:
        env["GUARDPROXY_STATE__HMAC_SECRET"] = secret
    proc = _serve(tmp_path, **env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert line.startswith("guardproxy serve: error: GUARDPROXY_STATE__HMAC_SECRET (state.hmac_secret) ")
    assert problem in line and "redis" in line
    if secret:
        assert secret not in proc.stdout + proc.stderr
    # refused before the guard model loads or the port is bound
    assert "listening on" not in proc.stderr and "Traceback" not in proc.stderr


async def _started(settings: Settings) -> tuple[GatewayServer, asyncio.Task[None]]:
    built = build_app(settings, classifier=FakeClassifier())
    server = GatewayServer(uvicorn_config(built.app, settings, log_level="warning"), built)
    task = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "the gateway did not start within 10 s"
    return server, task


async def _stopped(server: GatewayServer, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, timeout=20)


def _settings(tmp_path: Path, redis_prefix: str, *, url: str = REDIS_URL) -> Settings:
    return Settings(
        server={"port": free_port(), "shutdown_timeout": 0.5},
        upstream={"base_url": "http://127.0.0.1:9/v1"},
        state={"url": url, "hmac_secret": SECRET, "prefix": redis_prefix},
        drills={"store": f"sqlite:///{tmp_path / 'drills.db'}"},
    )


def _mismatch(server: GatewayServer) -> float | None:
    value: float | None = server.built.app.state.metrics.registry.get_sample_value("guardproxy_state_secret_mismatch")
    return value


async def test_a_replica_whose_secret_differs_from_the_stored_fingerprint_reports_it_at_startup(
    tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis(port=6379)
    try:
        # another replica, on another secret, got there first
        await client.set(f"{redis_prefix}k:hmac", secret_fingerprint(b"the other replicas' secret, also long"), ex=60)
        with caplog.at_level(logging.INFO, logger="guardproxy"):
            server, task = await _started(_settings(tmp_path, redis_prefix))
            try:
                # no request yet: the check ran at startup
                assert _mismatch(server) == 1.0
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                assert len(errors) == 1, errors
                assert "different state.hmac_secret values" in errors[0] and redis_prefix in errors[0]
                assert "GUARDPROXY_STATE__HMAC_SECRET" in errors[0]
            finally:
                await _stopped(server, task)
        assert SECRET not in caplog.text
        # reported, not taken over: the other replicas' fingerprint stays
        assert (
            await client.get(f"{redis_prefix}k:hmac")
            == secret_fingerprint(b"the other replicas' secret, also long").encode()
        )
    finally:
        await client.aclose()


async def test_a_replica_on_a_fresh_prefix_claims_the_fingerprint_at_startup(
    tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis(port=6379)
    try:
        with caplog.at_level(logging.INFO, logger="guardproxy"):
            server, task = await _started(_settings(tmp_path, redis_prefix))
            try:
                assert await client.get(f"{redis_prefix}k:hmac") == secret_fingerprint(SECRET.encode()).encode()
                assert _mismatch(server) == 0.0
                assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            finally:
                await _stopped(server, task)
    finally:
        await client.aclose()


async def test_redis_down_at_startup_is_a_warning_and_the_gateway_starts(
    tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="guardproxy"):
        server, task = await _started(_settings(tmp_path, redis_prefix, url=f"redis://127.0.0.1:{free_port()}/0"))
        try:
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("state.hmac_secret not checked at startup" in w for w in warnings), warnings
            assert _mismatch(server) == 0.0
        finally:
            await _stopped(server, task)
