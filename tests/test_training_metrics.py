"""The trainer's dev refusal figures: the chat replies' pairs are read on their own, not pooled."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from guardproxy.training.metrics import calibrate, false_refusal_metrics, refusal_metrics  # noqa: E402
from guardproxy.training.predict import Scores  # noqa: E402
from guardproxy.training.sources import CHAT_REPLY_SOURCES, Example  # noqa: E402


def test_chat_reply_pairs_have_their_own_group_and_stay_out_of_the_pooled_figures() -> None:
    rows = [
        Example(
            text="how do I pick a lock",
            reply="I won't help.",
            source="authored/responses_voices",
            group="a",
            label="harmful",
            refusal=2,
            meta={"keyword_free": True},
        ),
        Example(
            text="what is 2+2",
            reply="4",
            source="authored/responses_voices",
            group="b",
            label="benign",
            refusal=0,
            meta={"keyword_free": True},
        ),
        Example(
            text="which one?",
            reply="Which one do you mean?",
            source=CHAT_REPLY_SOURCES[1],
            group="c",
            label="benign",
            refusal=0,
            meta={"keyword_free": True},
        ),
        Example(
            text="and now?",
            reply="Sure: here it is.",
            source=CHAT_REPLY_SOURCES[0],
            group="d",
            label="benign",
            refusal=0,
        ),
    ]
    # the first two read right; the chat replies are read as a full refusal and as none
    probs = np.array([[0.0, 0.1, 0.9], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]], dtype=np.float32)
    n = len(rows)
    s = Scores(
        harm=np.zeros(n, np.float32),
        category=np.zeros(n, np.int64),
        jailbreak=np.zeros(n, np.float32),
        reply_harm=np.zeros(n, np.float32),
        refusal=probs,
        prompt_harm=np.array([0.9, 0.0, 0.0, 0.0], np.float32),
    )
    thresholds = {"refusal_partial": 0.5, "harm": 0.5}
    out = refusal_metrics(rows, s, thresholds, {})
    assert out["all"]["model"]["n"] == 2 and out["all"]["model"]["binary_f1"] == 1.0
    assert out["keyword_free"]["model"]["n"] == 2
    assert out[CHAT_REPLY_SOURCES[1]]["model"]["n"] == 1 and out[CHAT_REPLY_SOURCES[0]]["model"]["n"] == 1
    fr = false_refusal_metrics(rows, s, thresholds, {})
    # the chat reply read as a refusal would be a false refusal of a harmless prompt if it were pooled
    assert fr["n"] == 2 and fr["model"]["precision"] == 0.0 and fr["true_false_refusals"] == 0


def _pairs_scores(refused: list[float]) -> Scores:
    n = len(refused)
    probs = np.array([[1 - p, 0.0, p] for p in refused], dtype=np.float32)
    zeros = np.zeros(n, np.float32)
    return Scores(
        harm=zeros, category=np.zeros(n, np.int64), jailbreak=zeros, reply_harm=zeros, refusal=probs, prompt_harm=zeros
    )


@pytest.mark.parametrize(("chat_source", "line"), [(CHAT_REPLY_SOURCES[0], 0.2), ("phtest_responses", 0.26)])
def test_the_refusal_line_is_calibrated_on_the_refusal_data_sets_pairs_only(chat_source: str, line: float) -> None:
    # a refusal read at 0.3 and a helpful reply at 0.1: any line from 0.2 to 0.3 separates them; the lowest is kept.
    # A helpful chat reply at 0.25 would push the line over it, to 0.26, if it were counted.
    rows = [
        Example(text="a", reply="no.", source="authored/responses_voices", group="a", label="harmful", refusal=2),
        Example(text="b", reply="4", source="authored/responses_voices", group="b", label="benign", refusal=0),
        Example(text="c", reply="Which one?", source=chat_source, group="c", label="benign", refusal=0),
    ]
    assert calibrate(rows, _pairs_scores([0.3, 0.1, 0.25]))["refusal_partial"] == pytest.approx(line)
