"""The pipeline's hook points on both paths: allow, flag, block input, block output (plain and mid-stream),
speculative forwarding, every choice checked, tool-call arguments, retry notes and the finish hook."""

from __future__ import annotations

import asyncio
import json

import pytest

from guardproxy import chat
from guardproxy.errors import ClassifierError
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.pipeline import Action, Exchange, Verdict
from tests.gateway_support import CHAT, HELLO, Env, ScriptedCheck, env, gateway, shared_env, sse_events, streamed_text

pytestmark = pytest.mark.asyncio(loop_scope="module")
__all__ = ["env", "shared_env"]  # fixtures

REFUSAL = "I can't help with that, because it could hurt someone; here is a safer alternative."
BLOCK = Verdict(
    action=Action.BLOCK, reason="test", category="S1", reply_text=REFUSAL, annotations={"decision": "block"}
)
FLAG = Verdict(action=Action.FLAG, reason="test", annotations={"decision": "flag", "x-guardproxy-policy": "p@1"})
LONG_REPLY = " ".join(f"word{i}" for i in range(200)) + " FORBIDDEN " + " ".join(f"tail{i}" for i in range(50))


async def _finished(check: ScriptedCheck, count: int = 1) -> None:
    for _ in range(200):
        if len(check.finished) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("pipeline.finish was not called")


@pytest.mark.parametrize("stream", [False, True])
async def test_allow_checks_input_and_every_output(stream: bool) -> None:
    check = ScriptedCheck()
    async with gateway(checks=[check]) as own:  # its own app: start() and aclose() are asserted
        r = await own.client.post(CHAT, json={**HELLO, "stream": stream})
        assert r.status_code == 200
        await _finished(check)
    assert check.started and check.closed
    (ex,) = check.finished
    assert ex.outcome == "ok"
    assert ex.reply_texts == {0: own.fake.reply}
    assert ex.upstream_status == 200
    assert {"parse", "input_check", "output_check", "upstream"} <= set(ex.timings)
    assert "authorization" not in ex.headers
    assert check.outputs[-1] == (0, own.fake.reply, True)


@pytest.mark.parametrize("stream", [False, True])
async def test_flag_annotates_response_headers(stream: bool, env: Env) -> None:
    check = ScriptedCheck(input_verdict=FLAG)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream}, headers={"authorization": "Bearer sk-x"})
    assert r.status_code == 200
    assert r.headers["x-guardproxy-decision"] == "flag"
    assert r.headers["x-guardproxy-policy"] == "p@1"
    await _finished(check)
    assert check.finished[0].input_verdict == FLAG


async def test_block_input_plain_gets_refusal_and_never_reaches_upstream(env: Env) -> None:
    check = ScriptedCheck(input_verdict=BLOCK)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "n": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert [c["message"]["content"] for c in body["choices"]] == [REFUSAL, REFUSAL]
    assert {c["finish_reason"] for c in body["choices"]} == {"content_filter"}
    assert r.headers["x-guardproxy-decision"] == "block"
    assert env.fake.requests == []
    await _finished(check)
    assert check.finished[0].outcome == "blocked_input"


async def test_block_input_stream_gets_refusal_as_sse(env: Env) -> None:
    check = ScriptedCheck(input_verdict=BLOCK)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert streamed_text(events) == REFUSAL
    assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert env.fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_block_with_status_code_is_an_openai_error(stream: bool) -> None:
    verdict = Verdict(action=Action.BLOCK, reply_text="Request refused by policy.", status_code=400)
    async with gateway(checks=[ScriptedCheck(input_verdict=verdict)]) as env:
        r = await env.client.post(CHAT, json={**HELLO, "stream": stream})
        assert r.status_code == 400
        assert r.json()["error"] == {
            "message": "Request refused by policy.",
            "type": "content_filter",
            "param": None,
            "code": "content_filter",
        }


async def test_block_output_plain_replaces_only_the_blocked_choice(env: Env) -> None:
    env.fake.replies = ["a fine answer", "a FORBIDDEN answer"]
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "n": 2})
    choices = r.json()["choices"]
    assert choices[0]["message"]["content"] == "a fine answer"
    assert choices[1]["message"]["content"] == REFUSAL
    assert choices[1]["finish_reason"] == "content_filter"
    assert "FORBIDDEN" not in r.text
    await _finished(check)
    # Every choice was checked, each once, final.
    assert sorted(check.outputs) == [(0, "a fine answer", True), (1, "a FORBIDDEN answer", True)]
    assert check.finished[0].outcome == "blocked_output"


async def test_a_blocked_plain_choice_keeps_nothing_of_the_upstreams_reply(env: Env) -> None:
    env.fake.reply = "a FORBIDDEN answer in many tokens"
    env.fake.reasoning = "thinking it over"
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "logprobs": True})
    (choice,) = r.json()["choices"]
    assert choice["message"] == {"role": "assistant", "content": REFUSAL} and choice["logprobs"] is None
    assert r.json()["id"].startswith("chatcmpl-guard-")  # not the id of a completion the upstream may have stored
    assert "FORBIDDEN" not in r.text and "thinking" not in r.text  # neither its tokens nor its reasoning


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reasoning_models_thoughts_are_checked_but_not_recorded_as_the_reply(stream: bool, env: Env) -> None:
    env.fake.reply = "Here you go."
    env.fake.reasoning = "The user wants it, so FORBIDDEN step one, step two, step three"
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    env.pipeline.output_check_chars = 16
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream})
    if stream:
        events = sse_events(r.text)
        assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
        relayed = "".join(c["delta"].get("reasoning_content", "") for e in events[:-1] for c in e["choices"])
        assert len(relayed) < len(env.fake.reasoning)  # cut within one check step of it, as a reply would be
    else:
        assert r.json()["choices"][0]["message"]["content"] == REFUSAL
    await _finished(check)
    assert "FORBIDDEN" not in check.finished[0].reply_texts.get(0, "")  # the reply text the history records
    assert "FORBIDDEN" in check.finished[0].reply_reasoning[0]


async def test_a_stream_block_ends_every_choice_asked_for_and_keeps_what_was_relayed(env: Env) -> None:
    env.fake.replies = [LONG_REPLY, "the second choice"]  # the fake streams choice 0 whole, then choice 1
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    env.pipeline.output_check_chars = 64
    r = await env.client.post(CHAT, json={**HELLO, "n": 2, "stream": True})
    events = sse_events(r.text)
    last = {c["index"]: c["finish_reason"] for c in events[-2]["choices"]}
    assert last == {0: "content_filter", 1: "content_filter"}  # choice 1 had not started
    relayed = "".join(c["delta"].get("content", "") for e in events[:-2] for c in e["choices"] if c["index"] == 0)
    await _finished(check)
    assert relayed and check.finished[0].relayed_chars[0] == len(relayed)
    assert check.finished[0].reply_texts[0].startswith(relayed)


async def test_a_blocked_stream_still_sends_the_usage_it_was_asked_for(env: Env) -> None:
    env.pipeline.checks = [ScriptedCheck(input_verdict=BLOCK)]
    body = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events((await env.client.post(CHAT, json=body)).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 0


async def test_block_output_mid_stream_cuts_before_the_chunk(env: Env) -> None:
    env.fake.reply = LONG_REPLY
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    env.pipeline.output_check_chars = 64
    r = await env.client.post(CHAT, json={**HELLO, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    text = streamed_text(events)
    assert text.startswith("word0 word1") and text.endswith(REFUSAL)
    relayed = text[: -len(REFUSAL)]
    # Checked every 64 characters: at most one step of text after the trigger got out, and the
    # chunk that tripped the check was withheld (the checked text is longer than what was relayed).
    assert len(relayed) < LONG_REPLY.index("FORBIDDEN") + len("FORBIDDEN") + 64
    blocked_text = check.outputs[-1][1]
    assert "FORBIDDEN" in blocked_text and blocked_text.startswith(relayed) and len(blocked_text) > len(relayed)
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "content_filter"
    assert last["delta"]["content"] == REFUSAL
    await _finished(check)
    # Checked repeatedly as the text grew, never finally (the block came first).
    assert len(check.outputs) > 3
    assert not any(final for _, _, final in check.outputs)
    assert check.finished[0].outcome == "blocked_output"
    assert "FORBIDDEN" in check.finished[0].reply_texts[0]


async def test_stream_final_check_blocks_before_the_finishing_chunk() -> None:
    # The whole reply is shorter than one check step: only the final check sees it.
    fake = FakeUpstream(reply="short FORBIDDEN reply")
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    async with gateway(fake, checks=[check], output_check_chars=10_000) as env:
        r = await env.client.post(CHAT, json={**HELLO, "stream": True})
        events = sse_events(r.text)
        assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
        assert all(c.get("finish_reason") != "stop" for e in events[:-1] for c in e["choices"])
    assert check.outputs == [(0, "short FORBIDDEN reply", True)]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_arguments_are_checked(stream: bool, env: Env) -> None:
    env.fake.tool_call = ("run", json.dumps({"cmd": "FORBIDDEN thing", "pad": "x" * 40}))
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    env.pipeline.output_check_chars = 16
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream})
    assert r.status_code == 200
    if stream:
        events = sse_events(r.text)
        assert events[-2]["choices"][0]["finish_reason"] == "content_filter"
    else:
        assert r.json()["choices"][0]["finish_reason"] == "content_filter"
    assert any("FORBIDDEN" in text for _, text, _ in check.outputs)


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_are_all_checked(stream: bool, env: Env) -> None:
    env.fake.replies = ["first answer", "second answer", "third answer"]
    check = ScriptedCheck()
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "n": 3, "stream": stream})
    assert r.status_code == 200
    await _finished(check)
    finals = {(i, text) for i, text, final in check.outputs if final}
    assert finals == {(0, "first answer"), (1, "second answer"), (2, "third answer")}
    assert check.finished[0].reply_texts == {0: "first answer", 1: "second answer", 2: "third answer"}


async def test_retry_note_re_asks_once_with_a_system_note(env: Env) -> None:
    env.fake.reply = "I cannot help RETRYME"
    check = ScriptedCheck(retry_note_on="RETRYME")
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 200
    assert len(env.fake.requests) == 2
    retry_body = env.fake.requests[1].body
    assert retry_body["messages"][-1] == {"role": "system", "content": "Please answer the question helpfully."}
    await _finished(check)
    # Both replies checked; the second one's retry note is not acted on again.
    assert len(check.outputs) == 2
    assert check.finished[0].state["retried"] is True


@pytest.mark.parametrize("send_hold", [None, 2.0], ids=["default", "long-hold"])
async def test_speculative_forwarding_overlaps_the_check(
    monkeypatch: pytest.MonkeyPatch, send_hold: float | None
) -> None:
    # The check waits for the request to reach the upstream socket (its tokenizing would slow the send), at most
    # SEND_HOLD_S: with a 2 s hold, only the send's signal lets the two 0.5 s halves overlap.
    if send_hold is not None:
        monkeypatch.setattr(chat, "SEND_HOLD_S", send_hold)
    fake = FakeUpstream(ttft=0.5)
    check = ScriptedCheck(input_delay=0.5)
    async with gateway(fake, checks=[check], guard={"enabled": False, "speculative": True}) as env:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await env.client.post(CHAT, json=HELLO)
        elapsed = loop.time() - t0
        assert r.status_code == 200
        assert elapsed < 0.9, elapsed  # serial (or waiting out the hold) would take >= 1.0 s


async def test_speculative_block_cancels_the_upstream_call() -> None:
    fake = FakeUpstream(ttft=5.0)
    check = ScriptedCheck(input_verdict=BLOCK, input_delay=0.2)
    async with gateway(fake, checks=[check], guard={"enabled": False, "speculative": True}) as env:
        r = await env.client.post(CHAT, json=HELLO)
        assert r.json()["choices"][0]["message"]["content"] == REFUSAL
        await asyncio.wait_for(env.fake.cancelled.wait(), timeout=2)
        assert env.fake.cancellations == 1


async def test_annotations_from_output_verdict_on_plain_reply(env: Env) -> None:
    check = ScriptedCheck(block_output_on="FAKE", output_verdict=FLAG)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json=HELLO)
    assert r.headers["x-guardproxy-decision"] == "flag"
    assert r.json()["choices"][0]["message"]["content"] == env.fake.reply


async def test_invalid_json_event_fails_the_guarded_stream_in_band(env: Env) -> None:
    check = ScriptedCheck()
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "stream": True}, headers={"x-fake-fault": "invalid_json_sse"})
    events = sse_events(r.text.replace("data: {not json\n\n", ""))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_stream_error"
    await _finished(check)
    assert check.finished[0].outcome == "upstream_error"


class RaisingCheck(ScriptedCheck):
    """A check whose classifier fails, on input or on output."""

    def __init__(self, *, on: str, exc: Exception) -> None:
        super().__init__()
        self.on, self.exc = on, exc

    async def check_input(self, exchange: Exchange) -> Verdict:
        if self.on == "input":
            raise self.exc
        return await super().check_input(exchange)

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict:
        if self.on == "output":
            raise self.exc
        return await super().check_output(exchange, choice, text, final=final)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [(ClassifierError("model timed out"), 503, "guard_unavailable"), (RuntimeError("bug"), 500, "internal_error")],
)
@pytest.mark.parametrize("on", ["input", "output"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_check_that_raises_is_an_explicit_error(
    exc: Exception, status: int, code: str, on: str, stream: bool, env: Env
) -> None:
    check = RaisingCheck(on=on, exc=exc)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json={**HELLO, "stream": stream})
    if stream and on == "output":  # headers already sent: the stream ends in-band
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == code
        # The final check failed before the finishing chunk: nothing claims the reply completed.
        assert all(c.get("finish_reason") != "stop" for e in events[:-2] for c in e.get("choices", []))
    else:
        assert r.status_code == status
        assert r.json()["error"]["code"] == code
        assert "bug" not in r.text  # internal details stay in the log
    await _finished(check)
    assert check.finished[0].outcome == "error"


async def test_annotation_names_are_sanitized_and_not_repeated(env: Env) -> None:
    weird = Verdict(action=Action.FLAG, annotations={"Decision": "flag", "bad name:\r\nx": "a\r\nb"})
    later = Verdict(action=Action.FLAG, annotations={"decision": "block"})
    check = ScriptedCheck(input_verdict=weird, block_output_on="FAKE", output_verdict=later)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json=HELLO)
    assert r.status_code == 200
    assert r.headers.get_list("x-guardproxy-decision") == ["block"]  # the later verdict's value, once
    assert r.headers["x-guardproxy-bad-name---x"] == "a  b"


async def test_a_large_reply_is_checked_whole(env: Env) -> None:
    env.fake.reply = "long " * 100_000 + "FORBIDDEN"  # ~500 KB: parsed off the event loop
    check = ScriptedCheck(block_output_on="FORBIDDEN", output_verdict=BLOCK)
    env.pipeline.checks = [check]
    r = await env.client.post(CHAT, json=HELLO)
    assert r.json()["choices"][0]["message"]["content"] == REFUSAL


class StuckFinish(ScriptedCheck):
    """A check whose finish hangs until released (a state backend that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def finish(self, exchange: Exchange) -> None:
        await self.release.wait()
        await super().finish(exchange)


async def test_pending_finish_work_is_bounded_and_never_delays_replies(env: Env) -> None:
    check = StuckFinish()
    env.pipeline.checks = [check]
    gw = env.app.state.gateway
    gw.max_pending_finish = 3
    try:
        for _ in range(6):
            assert (await env.client.post(CHAT, json=HELLO)).status_code == 200
        assert len(gw.finish_tasks) == 3
        assert "guardproxy_finish_dropped_total 3.0" in (await env.client.get("/metrics")).text
    finally:
        check.release.set()
        gw.max_pending_finish = 10_000
    await _finished(check, 3)
