"""What the guard reads, and what happens to what it cannot read: a request padded until its scoring times out keeps
the scores that came back (a harmful ask still blocks) and never opens the circuit every tenant shares; every reply
field a client shows is read by the output check, plain and streamed. Through the real gateway in front of a fake
upstream on 127.0.0.1, with the scripted classifier of ``tests.test_guard`` (it raises on a text not in its script)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from guardproxy.app import create_app
from guardproxy.errors import ClassifierBusy
from guardproxy.guard import GuardBundle, build_guard
from guardproxy.metrics import Metrics
from guardproxy.signals import PromptScore
from guardproxy.streaming import reasoning_of
from tests.gateway_support import CHAT, Canned, Headers
from tests.servers import serve
from tests.test_classifier import _gated_classifier, _GatedSession
from tests.test_guard import POLICIES, PROMPTS, REPLIES, ScriptedClassifier, make_settings

ASK = "ask for reply harmful"  # scripted benign (0.02); the reply decides


class TurnScript(ScriptedClassifier):
    """The scripted classifier, with every conversation window pass (``max_length`` set) benign: these tests are
    about the per-turn scores, and a window's text is the tracker's business."""

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        if max_length is not None:
            return [PromptScore(0.02, "none", 0.0, np.zeros(4, dtype=np.float32)) for _ in texts]
        return await super().score_prompts(texts, exact=exact)


@dataclass
class Gw:
    client: httpx.AsyncClient
    canned: Canned
    bundle: GuardBundle
    classifier: ScriptedClassifier

    async def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": "m", "messages": messages, "stream": stream, **extra}
        return await self.client.post(CHAT, json=body, headers={"authorization": "Bearer sk-client-key-123456"})


@asynccontextmanager
async def guarded(
    tmp_path: Path, policy: str = "default", *, prompts: dict[str, Any] | None = None, with_tracker: bool = True
) -> AsyncIterator[Gw]:
    canned = Canned()
    classifier = TurnScript({**PROMPTS, **(prompts or {})}, REPLIES)
    async with serve(canned) as up_url:
        settings = make_settings(tmp_path, up_url, POLICIES / f"{policy}.toml")
        bundle = build_guard(
            settings, classifier=classifier, metrics=Metrics(), with_drills=False, with_tracker=with_tracker
        )
        app = create_app(settings, pipeline=bundle.pipeline, extra_routes=bundle.routes)
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
            yield Gw(client, canned, bundle, classifier)


def _plain(message: dict[str, Any]) -> Any:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}
    body = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}

    def answer(_headers: Headers) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        return 200, [("content-type", "application/json")], [json.dumps(body).encode()]

    return answer


def _stream(deltas: list[dict[str, Any]]) -> Any:
    def event(delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def answer(_headers: Headers) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        chunks = [event(d, None) for d in deltas] + [event({}, "stop"), b"data: [DONE]\n\n"]
        return 200, [("content-type", "text/event-stream")], chunks

    return answer


def _tool_turns(n: int, text: str = "tool result {i}") -> list[dict[str, Any]]:
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(n)]
    return [
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": f"c{i}", "content": text.format(i=i)} for i in range(n)),
    ]


# --- item 2: a request padded until its scoring fails -----------------------------------------------------


@pytest.mark.parametrize("with_tracker", [True, False])
async def test_a_harmful_ask_still_blocks_when_the_scoring_of_its_tool_results_fails(
    tmp_path: Path, with_tracker: bool
) -> None:
    # the tool results are not in the script: their classifier call raises, as one that timed out does
    messages = [{"role": "user", "content": "harmful"}, *_tool_turns(3, "unscripted tool result {i}")]
    async with guarded(tmp_path, with_tracker=with_tracker) as gw:
        gw.canned.answer = _plain({"content": "OK"})
        r = await gw.chat(messages)
        assert r.headers["x-guardproxy-decision"] == "block", r.headers
        assert r.json()["choices"][0]["finish_reason"] == "content_filter"
        assert gw.canned.seen == []  # never forwarded
        # a benign ask in the same shape: the unscored tool results leave it to on_classifier_failure (flag)
        r = await gw.chat([{"role": "user", "content": "benign"}, *messages[1:]])
        assert r.headers["x-guardproxy-decision"] == "flag"
        assert r.headers["x-guardproxy-flag"] == "classifier_failure" or "classifier_failure" in str(r.headers)


async def test_a_fail_closed_policy_blocks_with_the_harm_rule_when_the_ask_was_scored(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "harmful"}, *_tool_turns(2, "unscripted tool result {i}")]
    async with guarded(tmp_path, "strict") as gw:
        r = await gw.chat(messages)
        assert r.headers["x-guardproxy-decision"] == "block"
        assert "classifier" not in r.json()["choices"][0]["message"]["content"].lower()


@pytest.mark.parametrize("with_tracker", [True, False])
async def test_texts_beyond_the_cap_are_not_scored_and_never_pass_silently(tmp_path: Path, with_tracker: bool) -> None:
    n = 70  # over guard.MAX_SCORED_TEXTS
    prompts = {f"tool result {i}": (0.02, "none", 0.0) for i in range(n)}
    async with guarded(tmp_path, prompts=prompts, with_tracker=with_tracker) as gw:
        gw.canned.answer = _plain({"content": "OK"})
        r = await gw.chat([{"role": "user", "content": "benign"}, *_tool_turns(n)])
        assert r.headers["x-guardproxy-decision"] == "flag"  # the default policy fails open, visibly
        scored = [t for t in gw.classifier.calls if t.startswith("tool result")]
        # the newest, user turns first: without a tracker the guard scores the ask itself, within the cap
        assert (
            len(scored) == (64 if with_tracker else 63)
            and "tool result 0" not in scored
            and f"tool result {n - 1}" in scored
        )
        r = await gw.chat([{"role": "user", "content": "harmful"}, *_tool_turns(n)])
        assert r.headers["x-guardproxy-decision"] == "block"
        # under the cap: every text scored, allowed
        r = await gw.chat([{"role": "user", "content": "benign"}, *_tool_turns(10)])
        assert r.headers["x-guardproxy-decision"] == "allow"


async def test_an_oversized_call_that_times_out_while_the_model_works_does_not_open_the_circuit() -> None:
    session = _GatedSession(delay=0.03)  # a working model, 30 ms a text, one text a batch
    session.gate.set()
    c = _gated_classifier(session, timeout=0.2, breaker_failures=1, cache_size=0)
    try:
        with pytest.raises(ClassifierBusy):
            await c.score_prompts([f"padding text {i}" for i in range(40)])
        assert c.breaker.state == "closed"
        await asyncio.sleep(1.3)  # the abandoned job stops at its next batch
        (after,) = await c.score_prompts(["another tenant's request"])
        assert after.harm == pytest.approx(0.25)
    finally:
        await c.aclose()


# --- item 9: every reply field a client shows ---------------------------------------------------------------

HARM = "HARMFUL-STEP one, then two."
ESCAPED = "".join(f"\\u{ord(ch):04x}" for ch in HARM)

PLAIN_REPLIES = {
    "refusal": {"content": None, "refusal": HARM},
    "audio_transcript": {"content": None, "audio": {"id": "a1", "data": "UklGRgAAAAA=", "transcript": HARM}},
    "custom_tool_input": {
        "content": None,
        "tool_calls": [{"id": "t1", "type": "custom", "custom": {"name": "shell", "input": HARM}}],
    },
    "mistral_thinking_part": {
        "content": [{"type": "thinking", "thinking": [{"type": "text", "text": HARM}]}, {"type": "text", "text": "-"}]
    },
    "reasoning_details": {"content": "-", "reasoning_details": [{"type": "reasoning.text", "text": HARM}]},
    "escaped_arguments": {
        "content": None,
        "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": f'{{"a": "{ESCAPED}"}}'}}
        ],
    },
}


@pytest.mark.parametrize("case", sorted(PLAIN_REPLIES))
async def test_every_field_of_a_plain_reply_is_checked(tmp_path: Path, case: str) -> None:
    async with guarded(tmp_path) as gw:
        gw.canned.answer = _plain(PLAIN_REPLIES[case])
        r = await gw.chat([{"role": "user", "content": ASK}])
        assert r.headers["x-guardproxy-decision"] == "block", r.headers
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter" and HARM not in json.dumps(choice)


STREAMED = {
    "refusal": [{"refusal": HARM[:10]}, {"refusal": HARM[10:]}],
    "audio_transcript": [{"audio": {"id": "a1", "transcript": HARM[:10]}}, {"audio": {"transcript": HARM[10:]}}],
    "custom_tool_input": [
        {"tool_calls": [{"index": 0, "id": "t1", "type": "custom", "custom": {"name": "shell", "input": HARM[:10]}}]},
        {"tool_calls": [{"index": 0, "custom": {"input": HARM[10:]}}]},
    ],
    "content_parts": [
        {"content": [{"type": "text", "text": HARM[:10]}]},
        {"content": [{"type": "text", "text": HARM[10:]}]},
    ],
    "escaped_arguments": [
        {
            "tool_calls": [
                {"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": "'}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": ESCAPED + '"}'}}]},
    ],
    "legacy_function_call": [
        {"function_call": {"name": "f", "arguments": '{"a": "' + HARM[:10]}},
        {"function_call": {"arguments": HARM[10:] + '"}'}},
    ],
}


@pytest.mark.parametrize("case", sorted(STREAMED))
async def test_every_field_of_a_streamed_reply_is_checked(tmp_path: Path, case: str) -> None:
    async with guarded(tmp_path) as gw:
        gw.canned.answer = _stream(STREAMED[case])
        r = await gw.chat([{"role": "user", "content": ASK}], stream=True)
        assert r.headers["x-guardproxy-decision"] == "block" or '"content_filter"' in r.text, r.text
        assert '"content_filter"' in r.text


def test_an_ordinary_reply_has_nothing_beside_its_text() -> None:
    """What the history records of an ordinary reply is unchanged: nothing of it moves to the side channel."""
    message = {
        "role": "assistant",
        "content": "plain text",
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a": "b\\nc"}'}}],
    }
    assert reasoning_of(message, frozenset({"f"})) == ""  # a call to a tool the request declared
    assert reasoning_of(message) == "f"  # a name the request did not declare is what the model wrote: read
    assert reasoning_of({"content": [{"type": "text", "text": "x"}], "refusal": None}) == ""


# --- items 7 and 8: every string of the request the model reads ---------------------------------------------

ASK_MARK = "HARMFUL-ASK"


class MarkClassifier(TurnScript):
    """Any text carrying ``ASK_MARK`` is harmful, any other benign: these tests are about what the guard reads."""

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        self.calls.extend(texts)
        return [
            PromptScore(0.95 if ASK_MARK in t else 0.02, "violent_crimes" if ASK_MARK in t else "none", 0.0,
                        np.zeros(4, dtype=np.float32))
            for t in texts
        ]  # fmt: skip


def _user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


ASK_PLACES: dict[str, dict[str, Any]] = {
    # item 7: content parts the upstream reads (vLLM: a thinking part is text, a tool_reference its name)
    "thinking_part": {
        "messages": [
            _user([{"type": "text", "text": "Please answer this:"}, {"type": "thinking", "thinking": ASK_MARK}])
        ]
    },  # fmt: skip
    "tool_reference_part": {"messages": [_user([{"type": "tool_reference", "name": ASK_MARK}])]},
    "text_on_an_image_part": {
        "messages": [_user([{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}, "text": ASK_MARK}])]
    },
    "tool_result_thinking_part": {
        "messages": [
            _user("hi"),
            *_tool_turns(1, "x")[:1],
            {"role": "tool", "tool_call_id": "c0", "content": [{"type": "thinking", "thinking": ASK_MARK}]},
        ]
    },  # fmt: skip
    # item 8: fields outside the messages' content
    "message_name": {"messages": [_user("hello", name=ASK_MARK)]},
    "tool_description": {
        "messages": [_user("hello")],
        "tools": [{"type": "function", "function": {"name": "f", "description": ASK_MARK, "parameters": {}}}],
    },
    "tool_parameter_description": {
        "messages": [_user("hello")],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": ASK_MARK}}},
                },
            }
        ],
    },  # fmt: skip
    "response_format_schema": {
        "messages": [_user("hello")],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "s",
                "schema": {"type": "object", "properties": {"steps": {"type": "string", "description": ASK_MARK}}},
            },
        },
    },  # fmt: skip
    "vllm_documents": {"messages": [_user("hello")], "documents": [{"title": "doc", "text": ASK_MARK}]},
    "vllm_chat_template": {"messages": [_user("hello")], "chat_template": "{{ '" + ASK_MARK + "' }}"},
    "prediction_content": {"messages": [_user("hello")], "prediction": {"type": "content", "content": ASK_MARK}},
}


SCHEMA_PLACES = ("tool_description", "tool_parameter_description", "response_format_schema")


@pytest.mark.parametrize("place", SCHEMA_PLACES)
async def test_tool_and_response_format_schemas_are_not_scored_by_default(tmp_path: Path, place: str) -> None:
    """They are the application's, fixed per app: one naming risky work would read as harmful on every request."""
    from guardproxy.pipeline import Exchange

    settings = make_settings(tmp_path, "http://127.0.0.1:9", POLICIES / "default.toml")
    bundle = build_guard(settings, classifier=MarkClassifier(PROMPTS, REPLIES), with_drills=False, with_tracker=False)
    assert bundle.guard is not None
    try:
        verdict = await bundle.guard.check_input(
            Exchange("r1", "tenant-a", "chat", {"model": "m", **ASK_PLACES[place]})
        )
        assert verdict.action.value == "allow", place
    finally:
        await bundle.guard.aclose()


@pytest.mark.parametrize("with_tracker", [True, False])
@pytest.mark.parametrize("place", sorted(ASK_PLACES))
async def test_an_ask_anywhere_the_model_reads_it_is_scored(tmp_path: Path, place: str, with_tracker: bool) -> None:
    from guardproxy.pipeline import Exchange

    settings = make_settings(tmp_path, "http://127.0.0.1:9", POLICIES / "default.toml")
    if place in SCHEMA_PLACES:  # the application's own: scored where clients write them (guard.score_schemas)
        settings = settings.model_copy(update={"guard": settings.guard.model_copy(update={"score_schemas": True})})
    bundle = build_guard(
        settings, classifier=MarkClassifier(PROMPTS, REPLIES), with_drills=False, with_tracker=with_tracker
    )
    assert bundle.guard is not None
    try:
        body = {"model": "m", **ASK_PLACES[place]}
        verdict = await bundle.guard.check_input(Exchange("r1", "tenant-a", "chat", body))
        assert verdict.action.value == "block", place
        # the same request without the ask passes: it is the ask that blocks, not the shape
        clean = json.loads(json.dumps(body).replace(ASK_MARK, "a harmless note"))
        verdict = await bundle.guard.check_input(Exchange("r2", "tenant-b", "chat", clean))
        assert verdict.action.value == "allow", place
    finally:
        await bundle.guard.aclose()


def test_binary_payloads_and_system_fields_are_not_scored() -> None:
    from guardproxy.guard import request_texts, scored_texts

    messages = [
        {"role": "system", "content": "operator", "name": "operator-name"},
        _user([
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRgAAAAA=", "format": "wav"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "notes.pdf"}},
            {"type": "text", "text": "look"},
        ]),
    ]  # fmt: skip
    assert [t.text for t in scored_texts(messages)] == ["look\nnotes.pdf"]
    assert request_texts({"messages": messages}, messages) == []  # a system message's name is the operator's
    assert [t.text for t in request_texts({}, messages, score_system=True)] == ["operator-name"]


async def test_a_part_of_an_earlier_user_turn_in_an_unverified_history_is_scored(tmp_path: Path) -> None:
    from guardproxy.pipeline import Exchange

    settings = make_settings(tmp_path, "http://127.0.0.1:9", POLICIES / "default.toml")
    bundle = build_guard(settings, classifier=MarkClassifier(PROMPTS, REPLIES), with_drills=False)
    assert bundle.guard is not None
    try:
        messages = [
            _user([{"type": "thinking", "thinking": ASK_MARK}]),
            {"role": "assistant", "content": "Sure."},  # never relayed by this gateway: unverified
            _user("go on"),
        ]
        verdict = await bundle.guard.check_input(
            Exchange("r1", "tenant-a", "chat", {"model": "m", "messages": messages})
        )
        assert verdict.action.value == "block"
    finally:
        await bundle.guard.aclose()
