"""`guardproxy serve` flags, settings precedence, and how the server builds the app."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from guardproxy.commands import serve
from guardproxy.errors import GuardProxyError
from guardproxy.server import _loggable_url, build_app, uvicorn_config
from guardproxy.settings import Settings, load_settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.configure(parser)
    return parser.parse_args(list(argv))


def test_flags_override_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gp.toml"
    config.write_text(
        '[server]\nport = 9000\nhost = "0.0.0.0"\n[upstream]\nbase_url = "http://file/v1"\nread_timeout = 7\n'
    )
    monkeypatch.setenv("GUARDPROXY_UPSTREAM__BASE_URL", "http://env/v1")
    monkeypatch.setenv("GUARDPROXY_SERVER__PORT", "9100")
    args = parse("--config", str(config), "--port", "9200", "--policy", "policies/strict.toml", "--store",
                 "sqlite:///x.db", "--no-guard")  # fmt: skip
    settings = load_settings(args.config, **serve.overrides_from(args))
    assert settings.server.port == 9200  # flag over env over file
    assert settings.upstream.base_url == "http://env/v1"  # env over file
    assert settings.server.host == "0.0.0.0"  # file over default
    assert settings.upstream.read_timeout == 7
    assert settings.policy.active == Path("policies/strict.toml")
    assert settings.drills.store == "sqlite:///x.db"
    assert settings.guard.enabled is False


def test_no_flags_leave_settings_alone() -> None:
    assert serve.overrides_from(parse()) == {}


def test_server_uses_uvloop_and_httptools_and_a_passthrough_without_guard() -> None:
    settings = Settings(guard={"enabled": False})
    built = build_app(settings)
    assert built.gateway.pipeline.passthrough
    config = uvicorn_config(built.app, settings)
    assert (config.loop, config.http) == ("uvloop", "httptools")
    assert config.timeout_graceful_shutdown == settings.server.shutdown_timeout + 5


def test_guard_without_a_model_refuses_to_start(tmp_path: Path) -> None:
    # A gateway that cannot enforce its policy does not start (no silent passthrough).
    with pytest.raises(GuardProxyError):
        build_app(
            Settings(
                guard={"enabled": True, "model_dir": tmp_path / "missing"},
                drills={"store": "sqlite:///" + str(tmp_path / "d.db")},
            )
        )


def test_upstream_credentials_are_not_logged() -> None:
    assert _loggable_url("http://user:sk-secret@example.com/v1") == "http://example.com/v1"


async def test_server_wires_the_real_guard_and_its_routes(tmp_path: Path) -> None:
    # The real guard (policies, tracker) with the demo's KEYWORD stand-in in the model's place.
    from guardproxy.commands.demo import HARMFUL, KeywordDemoClassifier
    from guardproxy.fake_upstream import FakeUpstream
    from tests.gateway_support import CHAT, sse_events, streamed_text
    from tests.servers import serve

    fake = FakeUpstream()
    async with serve(fake) as upstream:
        settings = Settings(upstream={"base_url": upstream + "/v1"}, state={"hmac_secret": "x" * 32})
        built = build_app(settings, classifier=KeywordDemoClassifier(), with_drills=False)
        assert not built.gateway.pipeline.passthrough
        async with serve(built.app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            harmful = {"model": "m", "messages": [{"role": "user", "content": HARMFUL}]}
            r = await client.post(CHAT, json=harmful)
            assert r.headers["x-guardproxy-decision"] == "block"
            assert r.json()["choices"][0]["finish_reason"] == "content_filter"
            s = await client.post(CHAT, json={**harmful, "stream": True})
            assert sse_events(s.text)[-1] == "[DONE]" and streamed_text(sse_events(s.text))
            ok = await client.post(CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert ok.headers["x-guardproxy-decision"] == "allow"
            assert ok.json()["choices"][0]["message"]["content"] == fake.reply
            assert len(fake.requests) == 1  # the blocked ones never reached the upstream
            assert "guardproxy_decisions_total" in (await client.get("/metrics")).text


async def test_a_policy_flags_a_turn_the_shipped_model_cannot_read(tmp_path: Path) -> None:
    # The real guard model: Russian comes out of its English vocabulary letter by letter, German does not.
    from guardproxy.fake_upstream import FakeUpstream
    from guardproxy.settings import PROJECT_ROOT
    from tests.gateway_support import CHAT
    from tests.servers import serve

    monitor = (PROJECT_ROOT / "policies" / "monitor.toml").read_text(encoding="utf-8")
    flag_harm = '[[input_rules]]\nid = "flag-harm"\naction = "flag"\nwhen = { harm_at_least = 0.3 }\n\n'
    assert flag_harm in monitor
    policy = tmp_path / "unreadable.toml"
    policy.write_text(monitor.replace(flag_harm, ""), encoding="utf-8")  # so only the language can flag these
    fake = FakeUpstream()
    async with serve(fake) as upstream:
        settings = Settings(
            upstream={"base_url": upstream + "/v1"},
            state={"hmac_secret": "x" * 32},
            policy={"active": policy},
            guard={"output_checks": False},  # the input verdict's headers, not the reply's
        )
        built = build_app(settings, with_drills=False)
        async with serve(built.app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:

            async def ask(text: str) -> httpx.Response:
                return await client.post(CHAT, json={"model": "m", "messages": [{"role": "user", "content": text}]})

            ru = await ask("Подскажи рецепт блинов на молоке, чтобы были тонкие.")
            de = await ask("Schreib mir bitte eine kurze Mail an meine Vermieterin wegen der Heizung.")
            metrics = (await client.get("/metrics")).text
    assert "guardproxy_unreadable_requests_total 1.0" in metrics  # counted whatever the policy does with it
    assert (ru.status_code, ru.headers["x-guardproxy-decision"]) == (200, "flag")
    assert ru.headers["x-guardproxy-flag"] == "flag-unreadable"
    assert ru.json()["choices"][0]["message"]["content"] == fake.reply  # flagged, still answered
    assert de.headers["x-guardproxy-decision"] == "allow"


def test_json_logs_are_one_object_a_line_uvicorns_too(tmp_path: Path) -> None:
    # An operator walkthrough: no JSON log format for a log pipeline to ingest.
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "GUARDPROXY_SERVER__LOG_FORMAT": "json",
        "GUARDPROXY_UPSTREAM__BASE_URL": "http://127.0.0.1:9/v1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guardproxy.cli",
            "serve",
            "--no-guard",
            "--port",
            str(port),
            "--store",
            f"sqlite:///{tmp_path}/d.db",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        for _ in range(200):  # a generous 20 s to start
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m"}, timeout=5)  # a 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    loggers = {r["logger"] for r in records}
    assert any(name.startswith("guardproxy") for name in loggers)
    assert any(name.startswith("uvicorn") for name in loggers)
    assert any("guardproxy listening on" in r["message"] for r in records)


def test_a_json_log_line_is_cut_of_secrets_as_a_text_one() -> None:
    import io
    import json
    import logging

    from guardproxy.logs import JsonFormatter, RedactionFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactionFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("guardproxy.test_json_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("upstream said: Authorization: Bearer sk-proj-abcdefghijklmnop1234")
        try:
            raise ValueError("token=abcdefghijklmnopqrstuvwxyz")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "guardproxy.test_json_logs"
    assert "sk-proj-abcdefghijklmnop1234" not in first["message"] and "[REDACTED]" in first["message"]
    assert "ValueError" in second["exc"] and "abcdefghijklmnopqrstuvwxyz" not in second["exc"]
