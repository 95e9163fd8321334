"""A malformed or hostile upstream cannot get text past the output check: what reaches the client is what the check
read, or an error. A plain reply whose shape leaves in doubt what a client shows is a 502 with no upstream text; a
stream that turns malformed ends as a block ends (every choice ends, then ``[DONE]``); text after a choice's
``finish_reason`` or after ``[DONE]`` is not relayed. Every field a client shows is checked on both paths.

The upstream is ``Canned``: a real HTTP server on 127.0.0.1 that sends the raw bytes each test gives it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from guardproxy.pipeline import Action, Verdict
from tests.gateway_support import CHAT, HELLO, Canned, Env, ScriptedCheck, canned_gateway, sse_events, streamed_text

pytestmark = pytest.mark.asyncio(loop_scope="module")
Pair = tuple[Env, Canned]

BAD = "BADWORD"  # the scripted check blocks any choice whose text or side text holds it
WITHHELD = "[withheld]"
SSE = [("content-type", "text/event-stream")]
JSON = [("content-type", "application/json")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared() -> AsyncIterator[Pair]:
    async with canned_gateway() as pair:
        yield pair


@pytest_asyncio.fixture(loop_scope="module")
async def guarded(shared: Pair) -> Pair:
    """The gateway in front of ``Canned``, with a check that blocks any text holding ``BAD``, run on every event."""
    env, canned = shared
    canned.seen.clear()
    block = Verdict(action=Action.BLOCK, reply_text=WITHHELD)
    env.pipeline.checks = [ScriptedCheck(block_output_on=BAD, output_verdict=block)]
    env.pipeline.output_check_chars = 1
    return shared


def completion(*choices: Any, **extra: Any) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "choices": list(choices), **extra}).encode()


def message(index: Any = 0, **fields: Any) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", **fields}, "finish_reason": "stop"}


def event(*choices: Any) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "choices": list(choices)}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def delta(index: Any = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish}


DONE = b"data: [DONE]\n\n"


def malformed_count(env: Env, path: str) -> float:
    """guardproxy_upstream_malformed_total summed over problems, for ``path`` (plain or stream)."""
    samples = [s for m in env.app.state.metrics.registry.collect() for s in m.samples]
    return sum(s.value for s in samples if s.name == "guardproxy_upstream_malformed_total" and s.labels["path"] == path)


FINE = "A fine answer."


# -- plain replies --------------------------------------------------------------------------------------------------

MALFORMED_PLAIN = {
    "duplicate_index_bad_first": completion(message(0, content=BAD), message(0, content=FINE)),
    "duplicate_index_bad_second": completion(message(0, content=FINE), message(0, content=BAD)),
    "string_index_colliding": completion(message("0", content=BAD), message(0, content=FINE)),
    "negative_index": completion(message(-1, content=BAD)),
    "bool_index": completion(message(True, content=BAD)),
    "choices_object": completion(choices={"0": message(0, content=BAD)}),
    "choice_string": completion(BAD),
    "message_string": completion({"index": 0, "message": BAD, "finish_reason": "stop"}),
    "content_object": completion(message(content={"type": "text", "text": BAD})),
    "content_part_text_object": completion(message(content=[{"type": "text", "text": {"value": BAD}}])),
    "content_number_part": completion(message(content=[7, {"type": "text", "text": BAD}])),
    "refusal_list": completion(message(content=None, refusal=[BAD])),
    "reasoning_list": completion(message(content=FINE, reasoning_content=[BAD])),
    "audio_transcript_list": completion(message(content=None, audio={"id": "a", "transcript": [BAD]})),
    "tool_calls_object": completion(
        message(content=None, tool_calls={"0": {"type": "function", "function": {"name": "f", "arguments": BAD}}})
    ),
    "tool_arguments_object": completion(
        message(
            content=None,
            tool_calls=[{"id": "t", "type": "function", "function": {"name": "f", "arguments": {"a": BAD}}}],
        )
    ),
    "custom_input_object": completion(
        message(content=None, tool_calls=[{"id": "t", "type": "custom", "custom": {"name": "f", "input": [BAD]}}])
    ),
    "function_call_arguments_object": completion(
        message(content=None, function_call={"name": "f", "arguments": {"a": BAD}})
    ),
    # a key a Go client (encoding/json) matches ignoring case, so reads as the field the check reads
    "choices_case_variant": json.dumps({"id": "c1", "Choices": [message(0, content=BAD)]}).encode(),
    "choices_upper_case": json.dumps({"id": "c1", "choices": [], "CHOICES": [message(0, content=BAD)]}).encode(),
    "choices_long_s": json.dumps({"id": "c1", "choice\u017f": [message(0, content=BAD)]}).encode(),
    "message_case_variant": completion({"index": 0, "Message": {"role": "assistant", "content": BAD}}),
    "message_beside_message": completion(
        {"index": 0, "message": {"role": "assistant", "content": FINE}, "MESSAGE": {"content": BAD}}
    ),
    "index_case_variant": completion(message(0, content=FINE), {"Index": 0, "message": {"content": BAD}}),
    "logprobs_case_variant": completion({**message(0, content=BAD), "Logprobs": {"content": [{"token": BAD}]}}),
    "content_case_variant": completion(message(content=None, Content=BAD)),
    "tool_calls_case_variant": completion(
        message(content=None, Tool_calls=[{"id": "t", "type": "function", "function": {"name": "f", "arguments": BAD}}])
    ),
    "arguments_case_variant": completion(
        message(content=None, tool_calls=[{"id": "t", "type": "function", "function": {"name": "f", "Arguments": BAD}}])
    ),
    "reasoning_case_variant": completion(message(content=FINE, Reasoning_Content=BAD)),
}


@pytest.mark.parametrize("body", MALFORMED_PLAIN.values(), ids=MALFORMED_PLAIN.keys())
async def test_a_plain_reply_the_gateway_cannot_read_with_certainty_is_a_502(body: bytes, guarded: Pair) -> None:
    env, canned = guarded
    before = malformed_count(env, "plain")
    canned.answer = lambda _h: (200, JSON, [body])
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 502, r.text
    assert malformed_count(env, "plain") == before + 1
    error = r.json()["error"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_malformed"
    assert "malformed" in error["message"]
    assert BAD not in r.text and FINE not in r.text  # no upstream text at all


SAFE_PLAIN = {
    "reasoning_content": message(1, content=FINE, reasoning_content=BAD),
    "reasoning": message(1, content=FINE, reasoning=BAD),
    "refusal": message(1, content=None, refusal=BAD),
    "audio_transcript": message(1, content=None, audio={"id": "a", "data": "", "transcript": BAD}),
    "tool_arguments": message(
        1, content=None, tool_calls=[{"id": "t", "type": "function", "function": {"name": "f", "arguments": BAD}}]
    ),
    "custom_tool_input": message(
        1, content=None, tool_calls=[{"id": "t", "type": "custom", "custom": {"name": "f", "input": BAD}}]
    ),
    "function_call": message(1, content=None, function_call={"name": "f", "arguments": BAD}),
    "thinking_part": message(1, content=[{"type": "thinking", "thinking": BAD}, {"type": "text", "text": FINE}]),
    "index_beyond_n": message(7, content=BAD),
    "tool_name": message(
        1, content=None, tool_calls=[{"id": "t", "type": "function", "function": {"name": BAD, "arguments": "{}"}}]
    ),
    "custom_tool_name": message(
        1, content=None, tool_calls=[{"id": "t", "type": "custom", "custom": {"name": BAD, "input": "x"}}]
    ),
    "function_call_name": message(1, content=None, function_call={"name": BAD, "arguments": "{}"}),
    "text_part_content": message(1, content=[{"type": "text", "content": BAD}]),
    "untyped_part_without_text": message(1, content=[{"value": BAD}]),
    "output_text_part_beside_text": message(1, content=[{"type": "output_text", "text": FINE, "annotations": [BAD]}]),
}


@pytest.mark.parametrize("choice", SAFE_PLAIN.values(), ids=SAFE_PLAIN.keys())
async def test_every_field_of_a_plain_reply_a_client_shows_is_checked(choice: dict[str, Any], guarded: Pair) -> None:
    env, canned = guarded
    canned.answer = lambda _h: (200, JSON, [completion(message(0, content=FINE), choice)])
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 200, r.text
    assert BAD not in r.text
    assert any(c["finish_reason"] == "content_filter" for c in r.json()["choices"])


async def test_choices_without_an_index_are_checked_and_blocked_at_their_position(guarded: Pair) -> None:
    env, canned = guarded
    unindexed = [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"} for text in (FINE, BAD)]
    canned.answer = lambda _h: (200, JSON, [completion(*unindexed)])
    r = await env.client.post(CHAT, json={**HELLO, "n": 2})
    assert r.status_code == 200 and BAD not in r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["stop", "content_filter"]


async def test_a_well_formed_plain_reply_goes_out_byte_for_byte(guarded: Pair) -> None:
    env, canned = guarded
    body = completion(message(0, content=FINE), message(1, content=None, refusal="No."), usage={"total_tokens": 3})
    canned.answer = lambda _h: (200, JSON, [body])
    r = await env.client.post(CHAT, json={**HELLO, "n": 2})
    assert r.status_code == 200 and r.content == body


# -- streams --------------------------------------------------------------------------------------------------------

MALFORMED_STREAM = {
    "duplicate_index_in_one_event": event(delta(0, content=FINE), delta(0, content=FINE)),
    "string_index": event(delta("0", content=FINE)),
    "negative_index": event(delta(-1, content=FINE)),
    "choices_object": b'data: {"id":"c1","choices":{"0":{"index":0,"delta":{"content":"' + BAD.encode() + b'"}}}}\n\n',
    "choice_string": event(BAD),
    "delta_string": event({"index": 0, "delta": BAD, "finish_reason": None}),
    "content_object": event(delta(content={"type": "text", "text": BAD})),
    "content_part_text_object": event(delta(content=[{"type": "text", "text": {"value": BAD}}])),
    "refusal_list": event(delta(refusal=[BAD])),
    "reasoning_list": event(delta(reasoning_content=[BAD])),
    "audio_transcript_list": event(delta(audio={"transcript": [BAD]})),
    "tool_calls_object": event(delta(tool_calls={"0": {"index": 0, "function": {"arguments": BAD}}})),
    "tool_arguments_object": event(delta(tool_calls=[{"index": 0, "function": {"arguments": {"a": BAD}}}])),
    "function_call_arguments_object": event(delta(function_call={"arguments": {"a": BAD}})),
    "choices_case_variant": b"data: " + json.dumps({"id": "c1", "Choices": [delta(0, content=BAD)]}).encode() + b"\n\n",
    "delta_case_variant": event({"index": 0, "Delta": {"content": BAD}, "finish_reason": None}),
    "content_case_variant": event(delta(CONTENT=BAD)),
    "tool_calls_case_variant": event(delta(Tool_calls=[{"index": 0, "function": {"arguments": BAD}}])),
    "finish_reason_case_variant": event({"index": 0, "delta": {}, "Finish_reason": "stop"}),
}


@pytest.mark.parametrize("bad", MALFORMED_STREAM.values(), ids=MALFORMED_STREAM.keys())
async def test_a_stream_that_turns_malformed_ends_as_a_block_ends(
    bad: bytes, guarded: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    env, canned = guarded
    before = malformed_count(env, "stream")
    raw = event(delta(0, role="assistant", content="Hello. ")) + bad + event(delta(0, content=" more")) + DONE
    canned.answer = lambda _h: (200, SSE, [raw])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-request-id": "rid-malformed"})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert BAD not in r.text and FINE not in r.text and "more" not in r.text
    assert [c["delta"].get("content") for c in events[0]["choices"]] == ["Hello. "]
    assert [(c["index"], c["finish_reason"]) for c in events[-2]["choices"]] == [(0, "content_filter")]
    lines = [
        r.getMessage() for r in caplog.records if "rid-malformed" in r.getMessage() and r.name != "guardproxy.access"
    ]
    assert len(lines) == 1 and "malformed" in lines[0] and BAD not in lines[0], lines
    assert malformed_count(env, "stream") == before + 1


async def test_text_after_a_choices_finish_reason_is_dropped_and_logged(
    guarded: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    env, canned = guarded
    env.pipeline.output_check_chars = 256  # the default: the last check of a choice runs at its finish_reason
    raw = (
        event(delta(0, role="assistant", content="Hello."), delta(1, role="assistant", content="Hi."))
        + event(delta(0, "stop"))
        + event(delta(0, content=BAD), delta(1, content=" there."))  # choice 0 finished: its text is not relayed
        + event(delta(0, refusal=BAD))
        + event(delta(1, "stop"))
        + DONE
    )
    canned.answer = lambda _h: (200, SSE, [raw])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True, "n": 2}, headers={"x-request-id": "rid-late"})
    events = sse_events(r.text)
    assert BAD not in r.text
    assert events[-1] == "[DONE]"
    assert streamed_text(events, 0) == "Hello." and streamed_text(events, 1) == "Hi. there."
    finishes = [(c["index"], c["finish_reason"]) for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert finishes == [(0, "stop"), (1, "stop")]
    lines = [r.getMessage() for r in caplog.records if "rid-late" in r.getMessage() and r.name != "guardproxy.access"]
    assert len(lines) == 1 and "after its finish_reason" in lines[0] and BAD not in lines[0], lines


async def test_nothing_after_done_is_relayed(guarded: Pair) -> None:
    env, canned = guarded
    raw = event(delta(0, "stop", content=FINE)) + DONE + event(delta(0, content=BAD)) + DONE
    canned.answer = lambda _h: (200, SSE, [raw[: len(raw) - 20], raw[len(raw) - 20 :]])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    assert BAD not in r.text and r.text.endswith("data: [DONE]\n\n") and r.text.count("[DONE]") == 1


SAFE_STREAM = {
    "reasoning_content": delta(reasoning_content=BAD),
    "reasoning": delta(reasoning=BAD),
    "refusal": delta(refusal=BAD),
    "audio_transcript": delta(audio={"id": "a", "transcript": BAD}),
    "tool_arguments": delta(tool_calls=[{"index": 0, "id": "t", "function": {"name": "f", "arguments": BAD}}]),
    "custom_tool_input": delta(tool_calls=[{"index": 0, "id": "t", "type": "custom", "custom": {"input": BAD}}]),
    "function_call": delta(function_call={"name": "f", "arguments": BAD}),
    "thinking_part": delta(content=[{"type": "thinking", "thinking": BAD}]),
    "index_beyond_n": delta(7, content=BAD),
    "tool_name": delta(tool_calls=[{"index": 0, "id": "t", "type": "function", "function": {"name": BAD}}]),
    "custom_tool_name": delta(tool_calls=[{"index": 0, "id": "t", "type": "custom", "custom": {"name": BAD}}]),
    "function_call_name": delta(function_call={"name": BAD}),
    "text_part_content": delta(content=[{"type": "text", "content": BAD}]),
    "untyped_part_without_text": delta(content=[{"value": BAD}]),
}


@pytest.mark.parametrize("choice", SAFE_STREAM.values(), ids=SAFE_STREAM.keys())
async def test_every_field_of_a_stream_a_client_shows_is_checked(choice: dict[str, Any], guarded: Pair) -> None:
    env, canned = guarded
    ends = [delta(i, "stop") for i in sorted({0, choice["index"]})]
    raw = event(delta(0, content=FINE)) + event(choice) + event(*ends)
    canned.answer = lambda _h: (200, SSE, [raw + DONE])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    assert BAD not in r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "content_filter" in json.dumps(events[-2])


async def test_a_tool_name_streamed_in_pieces_is_read_joined(guarded: Pair) -> None:
    env, canned = guarded
    call = {"index": 0, "id": "t", "type": "function", "function": {"name": BAD[:4], "arguments": ""}}
    raw = (
        event(delta(0, role="assistant", content=None, tool_calls=[call]))
        + event(delta(0, tool_calls=[{"index": 0, "function": {"name": BAD[4:], "arguments": "{}"}}]))
        + event(delta(0, "tool_calls"))
        + DONE
    )
    canned.answer = lambda _h: (200, SSE, [raw])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert BAD[4:] not in r.text  # the event that completed the name was withheld


async def test_a_well_formed_stream_goes_out_byte_for_byte(guarded: Pair) -> None:
    env, canned = guarded
    raw = (
        event(delta(0, role="assistant", content=""), delta(1, role="assistant", content=""))
        + event(delta(0, content=FINE))
        + event(delta(1, refusal="No."))
        + event(delta(0, "stop"), delta(1, "stop"))
        + b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"total_tokens":3}}\n\n'
        + DONE
    )
    canned.answer = lambda _h: (200, SSE, [raw])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True, "n": 2})
    assert r.content == raw


async def test_the_choices_of_a_stream_share_one_unchecked_allowance(guarded: Pair) -> None:
    # A red team: with n > 1 each choice had its own output_check_chars, so n choices relayed up to n times as much
    # of a reply the check then blocked. Four choices, ten characters each an event, an allowance of 25: the check
    # runs once the four together hold 25 unchecked, and the event that brings the bad text is withheld.
    env, canned = guarded
    env.pipeline.output_check_chars = 25
    first = event(*(delta(i, content="a" * 10) for i in range(4)))
    second = event(*(delta(i, content=("b" * 3 + BAD) if i == 1 else "c" * 10) for i in range(4)))
    ends = event(*(delta(i, "stop") for i in range(4)))
    canned.answer = lambda _h: (200, SSE, [first + second + ends + DONE])
    r = await env.client.post(CHAT, json={**HELLO, "stream": True, "n": 4})
    assert BAD not in r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "content_filter" in json.dumps(events[-2])
    assert "a" * 10 in r.text  # the first event, checked clean, was relayed
