"""The trainer's dev refusal figures and refusal line: the chat replies' pairs are read on their own, not pooled."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from guardproxy.training.metrics import calibrate, false_refusal_metrics, refusal_metrics  # noqa: E402
from guardproxy.training.predict import Scores  # noqa: E402
from guardproxy.training.sources import CHAT_REPLY_SOURCES, Example  # noqa: E402

VOICES = "authored/responses_voices"


def _pair(text: str, reply: str, source: str, label: str, refusal: int) -> Example:
    return Example(
        text=text, reply=reply, source=source, group=text, label=label, refusal=refusal, meta={"keyword_free": True}
    )


def _scores(refusal: list[list[float]], prompt_harm: list[float] | None = None) -> Scores:
    n = len(refusal)
    zeros = np.zeros(n, np.float32)
    return Scores(
        harm=zeros,
        category=np.zeros(n, np.int64),
        jailbreak=zeros,
        reply_harm=zeros,
        refusal=np.array(refusal, np.float32),
        prompt_harm=zeros if prompt_harm is None else np.array(prompt_harm, np.float32),
    )


def test_chat_reply_pairs_have_their_own_group_and_stay_out_of_the_pooled_figures() -> None:
    rows = [
        _pair("how do I pick a lock", "I won't help.", VOICES, "harmful", 2),
        _pair("what is 2+2", "4", VOICES, "benign", 0),
        _pair("which one?", "Which one do you mean?", CHAT_REPLY_SOURCES[1], "benign", 0),
        _pair("and now?", "Sure: here it is.", CHAT_REPLY_SOURCES[0], "benign", 0),
    ]
    # the first two read right; the chat replies are read as a full refusal and as none
    s = _scores([[0.0, 0.1, 0.9], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]], [0.9, 0.0, 0.0, 0.0])
    thresholds = {"refusal_partial": 0.5, "harm": 0.5}
    out = refusal_metrics(rows, s, thresholds, {})
    assert out["all"]["model"]["n"] == 2 and out["all"]["model"]["binary_f1"] == 1.0
    assert out["keyword_free"]["model"]["n"] == 2
    assert out[CHAT_REPLY_SOURCES[1]]["model"]["n"] == 1 and out[CHAT_REPLY_SOURCES[0]]["model"]["n"] == 1
    fr = false_refusal_metrics(rows, s, thresholds, {})
    # the chat reply read as a refusal would be a false refusal of a harmless prompt if it were pooled
    assert fr["n"] == 2 and fr["model"]["precision"] == 0.0 and fr["true_false_refusals"] == 0


@pytest.mark.parametrize(("chat_source", "line"), [(CHAT_REPLY_SOURCES[0], 0.2), ("phtest_responses", 0.26)])
def test_the_refusal_line_is_calibrated_on_the_refusal_data_sets_pairs_only(chat_source: str, line: float) -> None:
    # a refusal read at 0.3 and a helpful reply at 0.1: any line from 0.2 to 0.3 separates them; the lowest is kept.
    # A helpful chat reply at 0.25 would push the line over it, to 0.26, if it were counted.
    rows = [
        _pair("a", "no.", VOICES, "harmful", 2),
        _pair("b", "4", VOICES, "benign", 0),
        _pair("c", "Which one?", chat_source, "benign", 0),
    ]
    s = _scores([[1 - p, 0.0, p] for p in (0.3, 0.1, 0.25)])
    assert calibrate(rows, s)["refusal_partial"] == pytest.approx(line)
