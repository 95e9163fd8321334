"""The access log: one line per finished request on ``guardproxy.access``, through the real app in front of a FAKE
upstream (both real servers on 127.0.0.1), read as the operator reads it: the text line (key=value) and the JSON
object ``server.log_format = "json"`` writes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardproxy.logs import JsonFormatter
from guardproxy.pipeline import Action, Verdict
from guardproxy.settings import load_settings
from tests.gateway_support import CHAT, HELLO, Env, ScriptedCheck, env, gateway, shared_env
from tests.hardening_support import FakeClassifier, guarded

ASYNC = pytest.mark.asyncio(loop_scope="module")  # the shared gateway lives in the module's loop
__all__ = ["env", "shared_env"]  # fixtures

ACCESS = "guardproxy.access"
BLOCK = Verdict(action=Action.BLOCK, reason="test", category="S1", reply_text="No.", annotations={"decision": "block"})
KEY = "sk-secret-abcdefghijklmnop123456"
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ACCESS)
    return caplog


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS]


async def lines(caplog: pytest.LogCaptureFixture, count: int = 1, settle: float = 0.1) -> list[logging.LogRecord]:
    """The access records once ``count`` are there (a line is written when the gateway finished the response, which
    may be a moment after the client read it), after ``settle`` seconds more, so that a second line would show."""
    for _ in range(500):
        if len(records(caplog)) >= count:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(settle)
    return records(caplog)


def kv(record: logging.LogRecord) -> dict[str, Any]:
    """The text line as key=value pairs; a quoted value is a JSON string."""
    line = record.getMessage()
    pairs = {k: json.loads(v) if v.startswith('"') else v for k, v in _PAIR.findall(line)}
    assert " ".join(f"{k}={v}" for k, v in _PAIR.findall(line)) == line, line  # nothing but pairs
    return pairs


def as_json(record: logging.LogRecord) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return obj


@ASYNC
async def test_an_allowed_request_logs_one_line(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    r = await env.client.post(CHAT, json=HELLO, headers={"x-request-id": "req-allow-1"})
    assert r.status_code == 200
    (record,) = await lines(access)
    assert record.levelno == logging.INFO
    line = kv(record)
    assert line["method"] == "POST" and line["path"] == CHAT and line["status"] == "200"
    assert float(line["duration_ms"]) > 0
    assert line["request_id"] == "req-allow-1" == r.headers["x-request-id"]
    assert line["action"] == "allow" and line["fallback"] == "-" and line["outcome"] == "ok" and line["error"] == "-"
    assert line["upstream_status"] == "200"
    assert line["bytes_sent"] == str(len(r.content))
    assert line["streamed"] == "false" and line["disconnected"] == "false"
    assert line["tenant"] == "anonymous"  # no key: pass-through mode's tenant without one


@ASYNC
async def test_a_blocked_request_logs_action_block(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck(input_verdict=BLOCK)]
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 200 and env.fake.requests == []
    (record,) = await lines(access)
    line = kv(record)
    assert line["action"] == "block" and line["status"] == "200" and line["outcome"] == "blocked_input"
    assert line["upstream_status"] == "-"  # never sent upstream
    assert line["request_id"] == r.headers["x-request-id"]


@ASYNC
async def test_an_output_block_mid_stream_logs_action_block(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck(block_output_on="FAKE", output_verdict=BLOCK)]
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    assert r.status_code == 200
    (record,) = await lines(access)
    line = kv(record)
    assert line["action"] == "block" and line["streamed"] == "true" and line["upstream_status"] == "200"
    assert line["outcome"] == "blocked_output"


@ASYNC
async def test_a_stream_the_upstream_breaks_names_the_error(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    env.fake.fault = "reset_mid_stream"
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    assert r.status_code == 200  # the headers went out: the error ends the stream in-band
    (record,) = await lines(access)
    line = kv(record)
    assert (line["status"], line["outcome"], line["error"]) == ("200", "upstream_error", "upstream_stream_error")


@ASYNC
async def test_neither_the_query_nor_the_key_is_logged(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    r = await env.client.post(
        CHAT + "?api-key=secret-query-value&api-version=2024-06-01",
        json=HELLO,
        headers={
            "authorization": f"Bearer {KEY}",
            "api-key": "azure-secret-value-0123456789",
            "x-request-id": "sk-rid-abcdefghijklmnop",  # a client's id shaped like a key
        },
    )
    assert r.status_code == 200
    (record,) = await lines(access)
    line = kv(record)
    assert line["path"] == CHAT
    assert line["tenant"] == "k:" + hashlib.sha256(KEY.encode()).hexdigest()[:16]  # the gateway's hash of the key
    for text in (record.getMessage(), JsonFormatter().format(record)):
        for secret in ("secret-query-value", "api-key", "api-version", "?", KEY, "sk-secret", "azure-secret", "sk-rid"):
            assert secret not in text, (secret, text)
        assert "hello" not in text and "FAKE" not in text  # no message or reply text


@ASYNC
async def test_a_stream_logs_once_when_it_ends(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    env.fake.token_interval = 0.02
    body = b""
    async with env.client.stream("POST", CHAT, json={**HELLO, "stream": True}) as r:
        async for chunk in r.aiter_raw():
            if not body:
                await asyncio.sleep(0.05)
                assert records(access) == []  # under way: not yet
            body += chunk
    (record,) = await lines(access)
    line = kv(record)
    assert line["status"] == "200" and line["streamed"] == "true" and line["disconnected"] == "false"
    assert line["action"] == "allow" and line["upstream_status"] == "200"
    assert line["bytes_sent"] == str(len(body)) and body.endswith(b"data: [DONE]\n\n")


@ASYNC
async def test_a_client_gone_mid_stream_logs_disconnected(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    env.fake.token_interval = 0.05
    async with env.client.stream("POST", CHAT, json={**HELLO, "stream": True}) as r:
        async for _chunk in r.aiter_raw():
            break  # the client goes away after the first chunk
    (record,) = await lines(access, settle=0.3)
    line = kv(record)
    assert line["disconnected"] == "true" and line["status"] == "200" and line["streamed"] == "true"
    assert line["outcome"] == "client_disconnected"
    assert int(line["bytes_sent"]) > 0


@ASYNC
async def test_a_forwarded_route_and_an_upstream_error(env: Env, access: pytest.LogCaptureFixture) -> None:
    r = await env.client.get("/v1/models")
    assert r.status_code == 200
    env.fake.fault = "status_503"
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 503
    first, second = (kv(rec) for rec in await lines(access, 2))
    assert (first["method"], first["path"], first["status"], first["upstream_status"]) == ("GET", "/v1/models",
                                                                                           "200", "200")  # fmt: skip
    assert first["action"] == "-"  # not a guarded request
    assert (second["status"], second["upstream_status"], second["error"]) == ("503", "503", "upstream_503")


@ASYNC
async def test_json_format_gives_one_field_each(env: Env, access: pytest.LogCaptureFixture) -> None:
    env.pipeline.checks = [ScriptedCheck()]
    r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-request-id": "req-json-1"})
    assert r.status_code == 200
    (record,) = await lines(access)
    obj = as_json(record)
    assert obj["logger"] == ACCESS and obj["level"] == "INFO" and obj["message"]
    assert obj["method"] == "POST" and obj["path"] == CHAT and obj["status"] == 200
    assert isinstance(obj["duration_ms"], float) and obj["duration_ms"] > 0
    assert obj["request_id"] == "req-json-1" and obj["tenant"] == "anonymous"
    assert obj["action"] == "allow" and obj["fallback"] is None and obj["upstream_status"] == 200
    assert obj["outcome"] == "ok" and obj["error"] is None
    assert obj["bytes_sent"] == len(r.content) and obj["streamed"] is True and obj["disconnected"] is False


@ASYNC
async def test_a_failure_fallback_is_named(tmp_path: Path, access: pytest.LogCaptureFixture) -> None:
    # the real guard with a classifier that fails: the default policy's on_classifier_failure (fail_open) decides
    async with guarded(tmp_path, FakeClassifier(mode="raise")) as g:
        r = await g.client.post(CHAT, json=HELLO)
        assert r.status_code == 200
        (record,) = await lines(access)
    line = kv(record)
    assert line["action"] == "flag" and line["fallback"] == "classifier_fail_open"
    assert as_json(record)["fallback"] == "classifier_fail_open"


@ASYNC
async def test_other_routes_are_logged_too(env: Env, access: pytest.LogCaptureFixture) -> None:
    r = await env.client.get("/healthz?token=secret-probe-value")
    assert r.status_code == 200
    (record,) = await lines(access)
    line = kv(record)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/healthz", "200")
    assert line["request_id"] == r.headers["x-request-id"] and "secret-probe-value" not in record.getMessage()


@ASYNC
async def test_an_odd_path_is_one_quoted_value(env: Env, access: pytest.LogCaptureFixture) -> None:
    r = await env.client.get("/v1/a%0Ab%20c%22%3Fx=1")  # a newline, a space, a quote, a '?'
    assert r.status_code == 400
    (record,) = await lines(access)
    assert "\n" not in record.getMessage()
    assert kv(record)["path"] == '/v1/a\nb c"'  # cut at the decoded '?', escaped, one value


@ASYNC
async def test_access_log_off_logs_nothing(access: pytest.LogCaptureFixture) -> None:
    async with gateway(server={"access_log": False}) as own:
        assert (await own.client.post(CHAT, json=HELLO)).status_code == 200
        assert (await own.client.get("/healthz")).status_code == 200
        await asyncio.sleep(0.2)
    assert records(access) == []


def test_the_setting_reads_from_the_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().server.access_log is True
    config = tmp_path / "g.toml"
    config.write_text("[server]\naccess_log = false\n")
    assert load_settings(config).server.access_log is False
    monkeypatch.setenv("GUARDPROXY_SERVER__ACCESS_LOG", "false")
    assert load_settings().server.access_log is False


def test_serve_writes_json_access_lines(tmp_path: Path) -> None:
    # the real command: its own handler and the JSON format (an INFO line: --log-level warning silences it)
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_vars = {
        **os.environ,
        "GUARDPROXY_SERVER__LOG_FORMAT": "json",
        "GUARDPROXY_UPSTREAM__BASE_URL": "http://127.0.0.1:9/v1",
    }
    cmd = [sys.executable, "-m", "guardproxy.cli", "serve", "--no-guard", "--port", str(port),
           "--store", f"sqlite:///{tmp_path}/d.db"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_vars)
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions?key=q-secret", json=HELLO,
                       headers={"authorization": f"Bearer {KEY}"}, timeout=10)  # fmt: skip
        assert r.status_code == 502  # nothing listens upstream
        time.sleep(0.3)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    objs = [json.loads(line) for line in out.splitlines() if line.strip()]
    chat = [o for o in objs if o["logger"] == ACCESS and o.get("path") == CHAT]
    assert len(chat) == 1, out
    assert chat[0]["status"] == 502 and chat[0]["upstream_status"] is None and chat[0]["action"] is None
    assert chat[0]["error"] == "upstream_unreachable"
    assert chat[0]["tenant"] == "k:" + hashlib.sha256(KEY.encode()).hexdigest()[:16]
    assert KEY not in out and "q-secret" not in out
