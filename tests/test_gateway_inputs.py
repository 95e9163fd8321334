"""Bad input: every way a request can be wrong gets its status and a named, OpenAI-shaped error."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.errors import RequestError
from guardproxy.settings import LimitSettings
from guardproxy.validation import json_depth_exceeds, parse_chat, parsed_depth_exceeds
from tests.gateway_support import CHAT, HELLO, Env, gateway

MSG = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MSG, **fields}).encode()


BAD_INPUTS: list[tuple[str, bytes, str, str | None]] = [
    # (id, raw body, error code, param)
    ("empty", b"", "empty_body", None),
    ("whitespace", b"  \n ", "empty_body", None),
    ("invalid_json", b'{"messages": [', "invalid_json", None),
    ("invalid_utf8", b'{"model": "\xff\xfe", "messages": []}', "invalid_utf8", None),
    (
        "lone_surrogate",
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "invalid_unicode",
        None,
    ),
    ("lone_low_surrogate", b'{"messages": [{"role": "user", "content": "a\\udc00b"}]}', "invalid_unicode", None),
    ("nan", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "invalid_json", None),
    ("infinity", b'{"messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}', "invalid_json", None),
    (
        "duplicate_keys",
        b'{"messages": [], "messages": [{"role": "user", "content": "x"}]}',
        "duplicate_key",
        "messages",
    ),
    (
        "nested_duplicate",
        b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}',
        "duplicate_key",
        "messages[0].role",
    ),
    ("deep_20000", b"[" * 20_000 + b"]" * 20_000, "json_too_deep", None),
    ("deep_in_messages", b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", "json_too_deep", None),
    ("not_object", b"[1, 2]", "invalid_type", None),
    ("string_body", b'"hello"', "invalid_type", None),
    ("missing_messages", b'{"model": "m"}', "missing_required_parameter", "messages"),
    ("messages_not_array", b'{"messages": "hi"}', "invalid_type", "messages"),
    ("messages_empty", b'{"messages": []}', "empty_array", "messages"),
    ("message_not_object", b'{"messages": ["hi"]}', "invalid_type", "messages[0]"),
    ("role_missing", b'{"messages": [{"content": "hi"}]}', "invalid_type", "messages[0].role"),
    ("content_number", b'{"messages": [{"role": "user", "content": 5}]}', "invalid_type", "messages[0].content"),
    (
        "part_not_object",
        b'{"messages": [{"role": "user", "content": ["x"]}]}',
        "invalid_type",
        "messages[0].content[0]",
    ),
    (
        "text_part_not_string",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
        "invalid_type",
        "messages[0].content[0].text",
    ),
    ("model_number", body(model=5), "invalid_type", "model"),
    ("stream_string", body(stream="yes"), "invalid_type", "stream"),
    ("n_zero", body(n=0), "invalid_value", "n"),
    ("n_huge", body(n=1000), "invalid_value", "n"),
    ("n_bool", body(n=True), "invalid_type", "n"),
    ("n_float", body(n=1.5), "invalid_type", "n"),
    ("max_tokens_absurd", body(max_tokens=10**12), "invalid_value", "max_tokens"),
    ("max_tokens_negative", body(max_tokens=-1), "invalid_value", "max_tokens"),
    ("max_completion_tokens_string", body(max_completion_tokens="9"), "invalid_type", "max_completion_tokens"),
    ("too_many_messages", json.dumps({"messages": MSG * 10_000}).encode(), "too_many_messages", "messages"),
    ("too_many_user_messages", json.dumps({"messages": MSG * 513}).encode(), "too_many_user_messages", "messages"),
    ("bom", b'\xef\xbb\xbf{"messages": []}', "invalid_json", None),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env() -> AsyncIterator[Env]:
    async with gateway(limits={"max_messages": 2048}) as e:
        yield e


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("raw", "code", "param"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_is_a_named_400(env: Env, raw: bytes, code: str, param: str | None) -> None:
    r = await env.client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code
    assert err["param"] == param
    assert err["message"]
    assert env.fake.requests == []


async def test_large_bodies_are_parsed_off_the_loop_with_the_same_rules() -> None:
    async with gateway() as env:
        big = "word " * 200_000  # ~1 MB: above the inline-parse size
        ok = await env.client.post(CHAT, json={"model": "m", "messages": [{"role": "user", "content": big}]})
        assert ok.status_code == 200
        assert env.fake.requests[-1].body["messages"][0]["content"] == big
        deep = b'{"pad": "' + b"x" * 400_000 + b'", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        bad = await env.client.post(CHAT, content=deep)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "json_too_deep"


async def test_compressed_request_body_is_refused() -> None:
    async with gateway() as env:
        raw = gzip.compress(json.dumps(HELLO).encode())
        r = await env.client.post(CHAT, content=raw, headers={"content-encoding": "gzip"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "unsupported_encoding"
        assert env.fake.requests == []


async def test_max_tokens_is_clamped_when_a_cap_is_set() -> None:
    async with gateway(limits={"max_tokens_cap": 512}) as env:
        r = await env.client.post(CHAT, content=body(max_tokens=100_000))
        assert r.status_code == 200
        assert env.fake.requests[0].body["max_tokens"] == 512


async def test_body_over_limit_by_content_length_is_413_before_reading() -> None:
    async with gateway(limits={"max_body_bytes": 1024}) as env:
        host, port = env.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        # A lying Content-Length: 10 MB announced, a few bytes sent. The answer must not wait for the rest.
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {10 * 1024 * 1024}\r\n\r\n{{}}".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert head.startswith(b"HTTP/1.1 413")
        writer.close()
        assert env.fake.requests == []


async def test_chunked_body_over_limit_is_413_while_streaming_in() -> None:
    async with gateway(limits={"max_body_bytes": 64 * 1024}) as env:
        host, port = env.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n" % 16384 + b" " * 16384 + b"\r\n"
        for _ in range(8):  # 128 KiB, and the body never ends: the answer cannot wait for its end
            writer.write(chunk)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert head.startswith(b"HTTP/1.1 413")
        writer.close()
        assert env.fake.requests == []


async def test_too_many_headers_is_431() -> None:
    async with gateway(limits={"max_headers": 20}) as env:
        r = await env.client.post(CHAT, json=HELLO, headers={f"x-h{i}": "v" for i in range(30)})
        assert r.status_code == 431
        assert r.json()["error"]["code"] == "headers_too_large"


async def test_oversized_headers_is_431() -> None:
    async with gateway(limits={"max_header_bytes": 1024}) as env:
        r = await env.client.post(CHAT, json=HELLO, headers={"x-big": "v" * 2000})
        assert r.status_code == 431
        assert env.fake.requests == []


# -- properties of the parser ---------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
LIMITS = LimitSettings()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_arbitrary_bytes_only_raise_request_errors(raw: bytes) -> None:
    try:
        parse_chat(raw, LIMITS)
    except RequestError as exc:
        assert exc.status_code == 400
        json.dumps({"error": str(exc)})  # the error body itself serializes


@settings(max_examples=300, deadline=None)
@given(_json)
def test_any_json_value_is_accepted_or_named(value: Any) -> None:
    raw = json.dumps(value).encode()
    try:
        req = parse_chat(raw, LIMITS)
    except RequestError:
        return
    assert req.body == value


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text()}),
        min_size=1,
        max_size=5,
    ),
    stream=st.booleans(),
)
def test_valid_requests_round_trip(messages: list[dict[str, str]], stream: bool) -> None:
    payload = {"model": "m", "messages": messages, "stream": stream}
    req = parse_chat(json.dumps(payload).encode(), LIMITS)
    assert req.body == payload and req.stream is stream and not req.changed


@given(st.integers(1, 200), st.integers(4, 100))
def test_depth_scan_matches_nesting(depth: int, limit: int) -> None:
    text = '{"a": "[[[[", "b": ' + "[" * depth + "]" * depth + "}"
    assert json_depth_exceeds(text, limit) is (depth + 1 > limit)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_json)
def test_depth_scan_agrees_with_the_parsed_depth(value: Any) -> None:
    text = json.dumps(value)
    for limit in (1, 2, 3, 4, 6):
        assert json_depth_exceeds(text, limit) is (_depth(value) > limit), (text, limit)
        assert parsed_depth_exceeds(value, limit) is (_depth(value) > limit), (text, limit)
