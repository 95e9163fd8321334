"""Client auth (replace and pass-through modes), per-tenant rate limits, capacity, health and metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from guardproxy.app import create_app
from guardproxy.auth import RateLimiter, hash_key
from guardproxy.errors import ConfigError, RateLimited
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.server import build_app
from guardproxy.settings import Settings, load_settings
from tests.gateway_support import CHAT, HELLO, ScriptedCheck, gateway
from tests.servers import free_port, serve

ROOT = Path(__file__).resolve().parent.parent

GATEWAY_KEY = "gw-key-alice-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-9876543210"
REPLACE = {
    "upstream": {"api_key": UPSTREAM_KEY},
    "auth": {"gateway_keys": {"alice": hash_key(GATEWAY_KEY), "bob": hash_key("gw-key-bob-0000000000")}},
}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong-key"},
        {"authorization": f"Basic {GATEWAY_KEY}"},
        {"authorization": f"Bearer {UPSTREAM_KEY}"},  # the upstream key is not a gateway key
    ],
    ids=["missing", "wrong", "not_bearer", "upstream_key"],
)
async def test_replace_mode_rejects_without_a_gateway_key(headers: dict[str, str]) -> None:
    async with gateway(**REPLACE) as env:
        r = await env.client.post(CHAT, json=HELLO, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert UPSTREAM_KEY not in r.text
        assert env.fake.requests == []
        r = await env.client.get("/v1/models", headers=headers)
        assert r.status_code == 401


async def test_replace_mode_swaps_the_key_and_names_the_tenant() -> None:
    check = ScriptedCheck()
    async with gateway(checks=[check], **REPLACE) as env:
        r = await env.client.post(CHAT, json=HELLO, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
        assert r.status_code == 200
        assert env.fake.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert check.inputs[0].tenant == "alice"
        assert "authorization" not in check.inputs[0].headers


async def test_replace_mode_sends_the_key_in_azures_api_key_header_when_told() -> None:
    azure = {**REPLACE, "upstream": {"api_key": UPSTREAM_KEY, "api_key_header": "api-key"}}
    async with gateway(**azure) as env:
        r = await env.client.post(CHAT, json=HELLO, headers={"authorization": f"Bearer {GATEWAY_KEY}"})
        assert r.status_code == 200
        sent = env.fake.requests[0].headers
        assert sent["api-key"] == UPSTREAM_KEY
        assert "authorization" not in sent  # the client's gateway key never goes upstream


async def test_pass_through_tenant_is_a_key_hash() -> None:
    check = ScriptedCheck()
    async with gateway(checks=[check]) as env:
        await env.client.post(CHAT, json=HELLO, headers={"authorization": "Bearer sk-client-1"})
        await env.client.post(CHAT, json=HELLO)
        assert check.inputs[0].tenant == "k:" + hash_key("sk-client-1")[:16]
        assert check.inputs[1].tenant == "anonymous"
        await env.client.post(CHAT, json=HELLO, headers={"api-key": "sk-client-1"})  # Azure's header
        assert check.inputs[2].tenant == check.inputs[0].tenant
        assert "api-key" not in check.inputs[2].headers


async def test_two_authorization_headers_are_refused() -> None:
    async with gateway() as env:
        headers = [("authorization", "Bearer key-one"), ("authorization", "Bearer key-two")]
        r = await env.client.post(CHAT, json=HELLO, headers=headers)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "duplicate_header"
        assert env.fake.requests == []


def test_replace_mode_without_gateway_keys_refuses_to_start() -> None:
    with pytest.raises(ConfigError):
        create_app(Settings(upstream={"api_key": "sk-x"}))


def test_gateway_keys_without_an_upstream_key_refuse_to_start() -> None:
    # Pass-through mode checks no gateway key: configured keys would be ignored and every client let in.
    settings = Settings(auth={"gateway_keys": {"team-a": hash_key(GATEWAY_KEY)}}, guard={"enabled": False})
    with pytest.raises(ConfigError, match=r"auth\.gateway_keys is set but upstream\.api_key is not"):
        create_app(settings)
    with pytest.raises(ConfigError, match="upstream.api_key"):
        build_app(settings)


def test_a_gateway_key_that_is_not_hex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="auth.gateway_keys.team-a"):
        create_app(Settings(upstream={"api_key": "sk-x"}, auth={"gateway_keys": {"team-a": "not-hex"}}))


def _readme_toml() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```toml\n# guardproxy.toml")
    return text[start + len("```toml\n") : text.index("```", start + 7)]


def test_serve_with_gateway_keys_and_no_upstream_key_exits_with_one_config_line(tmp_path: Path) -> None:
    config = tmp_path / "guardproxy.toml"
    config.write_text(
        f'[upstream]\nbase_url = "http://127.0.0.1:9/v1"\n\n[auth.gateway_keys]\nteam-a = "{hash_key(GATEWAY_KEY)}"\n'
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "guardproxy.cli", "serve", "--config", str(config), "--port", str(port)],
            cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the gateway started (and served) with gateway keys but no upstream key") from exc
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == [
        "guardproxy serve: error: auth.gateway_keys is set but upstream.api_key is not: gateway keys are checked "
        "only in replace mode; set upstream.api_key (the key the gateway sends upstream) or remove auth.gateway_keys"
    ], out.stderr
    assert "Traceback" not in out.stderr


async def test_readme_example_config_enforces_its_gateway_keys(tmp_path: Path) -> None:
    # The README's guardproxy.toml, pointed at a FAKE upstream: a client without team-a's key gets 401.
    config = tmp_path / "guardproxy.toml"
    config.write_text(_readme_toml())
    fake = FakeUpstream()
    async with serve(fake) as upstream_url:
        settings = load_settings(config, upstream={"base_url": upstream_url + "/v1"}, guard={"enabled": False})
        assert settings.auth.gateway_keys and settings.upstream.api_key is not None
        app = create_app(settings)
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            for headers in ({"authorization": "Bearer whatever"}, {}):
                r = await client.post(CHAT, json=HELLO, headers=headers)
                assert r.status_code == 401, r.text
        assert fake.requests == []


async def test_rate_limit_per_tenant_is_429_with_retry_after() -> None:
    async with gateway(limits={"rate_per_second": 0.01, "rate_burst": 2}) as env:
        a = {"authorization": "Bearer tenant-a"}
        assert (await env.client.post(CHAT, json=HELLO, headers=a)).status_code == 200
        assert (await env.client.post(CHAT, json=HELLO, headers=a)).status_code == 200
        r = await env.client.post(CHAT, json=HELLO, headers=a)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
        # Another tenant has its own bucket.
        assert (await env.client.post(CHAT, json=HELLO, headers={"authorization": "Bearer b"})).status_code == 200
        assert len(env.fake.requests) == 3


def test_token_bucket_refills() -> None:
    limiter = RateLimiter(rate=2.0, burst=1)
    limiter.acquire("t", now=0.0)
    with pytest.raises(RateLimited) as exc:
        limiter.acquire("t", now=0.1)
    assert exc.value.retry_after == pytest.approx(0.4)
    limiter.acquire("t", now=0.6)


def test_token_bucket_table_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_tenants=10)
    for i in range(100):
        limiter.acquire(f"t{i}", now=0.0)
    assert len(limiter._buckets) == 10


async def test_over_capacity_is_a_fast_503() -> None:
    fake = FakeUpstream(ttft=1.0)
    async with gateway(fake, server={"max_concurrent_requests": 2}) as env:
        busy = [asyncio.create_task(env.client.post(CHAT, json=HELLO)) for _ in range(2)]
        for _ in range(100):
            if len(env.fake.requests) == 2:
                break
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await env.client.post(CHAT, json=HELLO)
        assert loop.time() - t0 < 0.5
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        assert [t.status_code for t in await asyncio.gather(*busy)] == [200, 200]


async def test_every_response_carries_a_request_id() -> None:
    async with gateway() as env:
        responses = {
            "healthz": await env.client.get("/healthz"),
            "readyz": await env.client.get("/readyz"),
            "metrics": await env.client.get("/metrics"),
            "404": await env.client.get("/no/such/route"),
            "404 post": await env.client.post("/nowhere", json={}),
            "v1": await env.client.post(CHAT, json=HELLO),
            "v1 400": await env.client.post(CHAT, json={"messages": []}),
            "v1 431": await env.client.post(CHAT, json=HELLO, headers={f"x-h{i}": "v" for i in range(120)}),
        }
        assert responses["404"].status_code == 404 and responses["v1 431"].status_code == 431
        ids = {name: r.headers.get("x-request-id") for name, r in responses.items()}
        assert all(ids.values()), ids
        assert len(set(ids.values())) == len(ids), ids  # a new one each
        assert all(len(r.headers.get_list("x-request-id")) == 1 for r in responses.values())
        # the client's own id, when it is a sane token, comes back; a junk one is replaced
        for path in ("/healthz", "/nowhere", CHAT):
            r = await env.client.post(path, json=HELLO, headers={"x-request-id": "client-id-42"})
            assert r.headers["x-request-id"] == "client-id-42", path
            r = await env.client.post(path, json=HELLO, headers={"x-request-id": "bad id <script>"})
            assert r.headers["x-request-id"] not in ("", "bad id <script>"), path


async def test_health_ready_and_metrics() -> None:
    check = ScriptedCheck()
    async with gateway(checks=[check]) as env:
        assert (await env.client.get("/healthz")).json() == {"status": "ok"}
        assert (await env.client.get("/readyz")).status_code == 200
        await env.client.post(CHAT, json=HELLO)
        await env.client.post(CHAT, json={"messages": []})
        env.app.state.metrics.observe_decision("default", "flag")
        text = (await env.client.get("/metrics")).text
        assert 'guardproxy_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
        assert 'guardproxy_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
        assert 'guardproxy_decisions_total{action="flag",policy="default",role="active"} 1.0' in text
        for stage in ("parse", "input_check", "output_check", "upstream"):
            assert f'guardproxy_stage_seconds_count{{stage="{stage}"}} 1.0' in text
        assert 'guardproxy_upstream_seconds_count{route="/v1/chat/completions"} 1.0' in text
        assert "sk-" not in text


async def test_metrics_registries_are_per_app() -> None:
    async with gateway() as one, gateway() as two:
        await one.client.post(CHAT, json=HELLO)
        text = (await two.client.get("/metrics")).text
        assert 'status="200"' not in text


async def test_extra_metrics_for_other_parts() -> None:
    async with gateway() as env:
        metrics = env.app.state.metrics
        c = metrics.counter("guardproxy_test_things", "things", ["kind"])
        assert metrics.counter("guardproxy_test_things", "things", ["kind"]) is c
        c.labels("x").inc(3)
        assert 'guardproxy_test_things_total{kind="x"} 3.0' in (await env.client.get("/metrics")).text


async def test_metric_labels_stay_bounded_whatever_the_path() -> None:
    async with gateway() as env:
        for i in range(20):
            await env.client.get(f"/v1/made-up-{chr(97 + i)}")
        text = (await env.client.get("/metrics")).text
        assert "made-up" not in text
        assert 'route="/v1/other"' in text
