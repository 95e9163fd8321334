"""The stream relay on its own: whatever the upstream's read boundaries, every event goes out once, in
order, and the stream ends with [DONE], with the guard's block, or with an error, never silently cut."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.errors import UpstreamStreamError
from guardproxy.pipeline import Action, Exchange, Pipeline, Verdict
from guardproxy.streaming import SSEParser, StreamGuard, relay
from tests.gateway_support import ScriptedCheck


def chunk(i: int, text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    obj = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": i, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def run(raw: bytes, cuts: list[int], guard: StreamGuard | None = None) -> tuple[str, bytes, list[bool]]:
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    sent = bytearray()
    more_flags: list[bool] = []

    async def source() -> AsyncIterator[bytes]:
        for p in pieces:
            yield p

    async def send(data: bytes, more: bool) -> None:
        sent.extend(data)
        more_flags.append(more)

    outcome = await relay(source(), send, guard=guard, max_event_chars=1 << 20)
    return outcome, bytes(sent), more_flags


def data_events(raw: bytes) -> list[str]:
    parser = SSEParser()
    return [e.data for e in parser.feed(raw) + parser.close() if not e.comment]


_texts = st.lists(st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(texts=_texts, data=st.data())
async def test_passthrough_relays_every_event_once_in_order(texts: list[str], data: st.DataObject) -> None:
    raw = b"".join(chunk(0, t) for t in texts) + chunk(0, None, "stop") + b"data: [DONE]\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    outcome, sent, more = await run(raw, cuts)
    assert outcome == "ok"
    assert data_events(sent) == data_events(raw)
    assert more[-1] is False and all(more[:-1])


@settings(max_examples=100, deadline=None)
@given(texts=_texts, data=st.data())
async def test_guarded_relay_checks_and_keeps_the_text(texts: list[str], data: st.DataObject) -> None:
    check = ScriptedCheck()
    ex = Exchange(request_id="r", tenant="t", route="/v1/chat/completions", body={}, stream=True)
    guard = StreamGuard(Pipeline([check], output_check_chars=8), ex)
    raw = b"".join(chunk(0, t) for t in texts) + chunk(0, None, "stop") + b"data: [DONE]\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    outcome, sent, _ = await run(raw, cuts, guard)
    guard.record()
    assert outcome == "ok"
    assert data_events(sent) == data_events(raw)
    assert ex.reply_texts == {0: "".join(texts)}
    assert check.outputs[-1] == (0, "".join(texts), True)  # the final check saw the whole reply


async def test_guarded_block_cuts_before_the_event_that_tripped_it() -> None:
    block = Verdict(action=Action.BLOCK, reply_text="no")
    check = ScriptedCheck(block_output_on="BAD", output_verdict=block)
    ex = Exchange(request_id="r", tenant="t", route="/v1/chat/completions", body={}, stream=True)
    guard = StreamGuard(Pipeline([check], output_check_chars=1), ex)
    raw = chunk(0, "good ") + chunk(0, "BAD ") + chunk(0, "after") + chunk(0, None, "stop") + b"data: [DONE]\n\n"
    outcome, sent, _ = await run(raw, [], guard)
    assert outcome == "blocked_output"
    events = data_events(sent)
    assert events[-1] == "[DONE]"
    relayed = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [c["delta"].get("content") for c in relayed] == ["good ", "no"]
    assert relayed[-1]["finish_reason"] == "content_filter"


@pytest.mark.parametrize(
    "raw",
    [
        chunk(0, "half"),  # cut: no finish, no [DONE]
        chunk(0, "a") + b'data: {"error": {"message": "boom"}}\n\n',
        chunk(0, "a") + b"data: " + b"x" * 64,  # cut inside an event
        chunk(0, "a", "stop") + b'data: {"usage": ',  # finished, then cut inside the usage event
    ],
    ids=["no_finish", "error_event", "cut_inside_event", "cut_after_finish"],
)
@pytest.mark.parametrize("guarded", [False, True])
async def test_cut_or_failed_streams_raise(raw: bytes, guarded: bool) -> None:
    ex = Exchange(request_id="r", tenant="t", route="/v1/chat/completions", body={}, stream=True)
    guard = StreamGuard(Pipeline([ScriptedCheck()]), ex) if guarded else None
    with pytest.raises(UpstreamStreamError):
        await run(raw, [len(raw) // 2], guard)
