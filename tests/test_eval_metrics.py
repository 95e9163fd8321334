"""Metrics of guardproxy.evaluation on tiny hand-made arrays with known answers."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from guardproxy.errors import ConfigError
from guardproxy.evaluation import (
    ConversationRecord,
    PromptRecord,
    ResponseRecord,
    auroc,
    binary_metrics,
    conversation_report,
    keyword_free,
    load_baselines,
    macro_f1,
    median,
    parse_baselines,
    prompt_report,
    rate,
    response_report,
)

SHARED_BASELINES = Path(__file__).resolve().parents[2] / "shared" / "data" / "baselines" / "refusal_keyword_lists.json"


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1], 1.0),
        ([0, 0, 1, 1], [0.9, 0.8, 0.3, 0.1], 0.0),
        ([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2], 0.75),  # 3 of the 4 (pos, neg) pairs ordered right
        ([1, 0], [0.5, 0.5], 0.5),  # a tie counts half
        ([1, 1, 0], [0.5, 0.7, 0.5], 0.75),  # one tie (0.5) and one win (1.0) over two pairs
        ([1, 0, 0, 0], [0.2, 0.1, 0.3, 0.2], 0.5),  # beats 0.1, ties 0.2, loses to 0.3: (1 + 0.5 + 0) / 3
    ],
)
def test_auroc_known_values(labels: list[int], scores: list[float], expected: float) -> None:
    assert auroc(labels, scores) == pytest.approx(expected)


def test_auroc_matches_the_pairwise_definition_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(60) < 0.4
    scores = rng.integers(0, 8, 60) / 8  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert auroc(labels, scores) == pytest.approx(float(np.mean(pairs)))


def test_auroc_is_undefined_with_one_class() -> None:
    assert math.isnan(auroc([1, 1], [0.2, 0.3]))
    assert math.isnan(auroc([], []))


def test_auroc_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="shape"):
        auroc([1, 0], [0.5])


def test_binary_metrics() -> None:
    m = binary_metrics([True, True, False, False, True], [True, False, True, False, True])
    assert (m.tp, m.fp, m.fn, m.tn, m.n) == (2, 1, 1, 1, 5)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.as_dict()["f1"] == pytest.approx(2 / 3)


def test_binary_metrics_undefined_cases_are_nan_not_zero() -> None:
    m = binary_metrics([False, False], [False, False])
    assert math.isnan(m.precision) and math.isnan(m.recall) and math.isnan(m.f1)
    m = binary_metrics([True, False], [False, False])  # nothing predicted: precision undefined, recall 0
    assert math.isnan(m.precision) and m.recall == 0.0 and m.f1 == 0.0


def test_macro_f1() -> None:
    gold = ["none", "full", "partial", "full"]
    pred = ["none", "full", "full", "full"]
    # none: F1 1; full: tp 2, fp 1 -> 0.8; partial: tp 0, fn 1 -> 0
    assert macro_f1(gold, pred) == pytest.approx((1 + 0.8 + 0) / 3)
    assert macro_f1(gold, gold) == 1.0
    # A class absent from truth and prediction does not count; an absent class that is predicted does.
    assert macro_f1(["none", "full"], ["none", "full"], classes=["none", "partial", "full"]) == 1.0
    assert macro_f1(["none", "full"], ["none", "partial"]) == pytest.approx((1 + 0 + 0) / 3)
    assert math.isnan(macro_f1([], []))


def test_rate_and_median() -> None:
    assert rate([True, False, False, True]) == 0.5
    assert math.isnan(rate([]))
    assert median([3, 1, 2]) == 2
    assert math.isnan(median([]))


def test_keyword_baselines_follow_their_own_matching_rules() -> None:
    substring, prefix = parse_baselines(
        [
            {"name": "sub", "match": "substring anywhere in generation", "strings": ["I cannot"]},
            {"name": "pre", "match": "completion.lower().strip().startswith(any)", "strings": ["Sorry", "no,"]},
        ]
    )
    assert substring.refused("Well, I cannot do that.")
    assert not substring.refused("i cannot do that")  # substring lists are case-sensitive
    assert prefix.refused("  SORRY, no.")  # prefix lists are lower-cased and stripped
    assert not prefix.refused("I am sorry")  # ... and only match at the start
    assert keyword_free("Happy to help!", [substring, prefix])
    assert not keyword_free("No, I cannot.", [substring, prefix])
    # Keyword-free means no string anywhere in any case, stricter than either rule: neither rule flags these.
    assert not substring.refused("i cannot") and not keyword_free("well, i cannot", [substring])
    assert not prefix.refused("I am sorry") and not keyword_free("I am sorry", [prefix])


def test_unknown_matching_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown matching rule"):
        parse_baselines([{"name": "x", "match": "regex", "strings": ["a"]}])
    with pytest.raises(ConfigError, match="lacks"):
        parse_baselines([{"name": "x"}])


def test_the_shared_baseline_file_loads(tmp_path: Path) -> None:
    baselines = load_baselines(SHARED_BASELINES)
    assert len(baselines) == 6
    assert {b.rule for b in baselines} == {"substring", "prefix"}
    bad = tmp_path / "b.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match=str(bad)):
        load_baselines(bad)
    assert json.loads(SHARED_BASELINES.read_text())  # sanity: the file is the one we think


def test_prompt_report() -> None:
    records = [
        PromptRecord("a", "harmful", 0.9, 0.1, "block"),
        PromptRecord("a", "harmful", 0.4, 0.1, "flag"),
        PromptRecord("b", "harmful", 0.8, 0.1, "block"),
        PromptRecord("n", "benign", 0.1, 0.0, "allow"),
        PromptRecord("n", "benign", 0.6, 0.0, "block"),
        PromptRecord("p", "borderline_benign", 0.2, 0.0, "allow"),
        PromptRecord("j", "jailbreak", 0.3, 0.9, "flag"),
        PromptRecord("r", "policy_restricted", 0.5, 0.0, "flag"),
    ]
    rep = prompt_report(records, harm_threshold=0.5)
    # harmful {0.9, 0.4, 0.8} vs negatives {0.1, 0.6, 0.2}: 0.9 and 0.8 win 3 each, 0.4 wins 2 -> 8/9
    assert rep["harm_auroc"] == pytest.approx(8 / 9)
    assert rep["harmful_source_auroc"]["a"] == pytest.approx(5 / 6)
    assert rep["harmful_source_auroc"]["b"] == pytest.approx(1.0)
    assert rep["jailbreak_label_jailbreak_auroc"] == pytest.approx(1.0)
    assert rep["policy_restricted_harm_auroc"] == pytest.approx(2 / 3)
    assert rep["by_label"]["harmful"]["flag_rate"] == 1.0
    assert rep["by_label"]["harmful"]["block_rate"] == pytest.approx(2 / 3)
    assert rep["by_label"]["benign"]["flag_rate"] == 0.5
    assert rep["by_label"]["harmful"]["over_threshold_rate"] == pytest.approx(2 / 3)
    assert rep["by_source"]["n|benign"]["n"] == 2


def _resp(
    source: str,
    label: str,
    gold: str | None,
    pred: str,
    harm: float,
    kw: bool,
    *,
    reply_harm: float = 0.0,
    complied: bool | None = None,
) -> ResponseRecord:
    return ResponseRecord(
        source=source,
        prompt_label=label,
        gold_refusal=gold,
        refusal=pred,
        harm=harm,
        reply_harm=reply_harm,
        harmful_compliance=complied,
        keyword_refused=(kw,),
        keyword_free=not kw,
    )


def test_response_report_scores_model_and_baseline_on_the_same_rows() -> None:
    records = [
        _resp("s", "borderline_benign", "full", "full", 0.1, True),  # true false refusal, caught by both
        _resp("s", "borderline_benign", "partial", "partial", 0.2, False),  # keyword-free partial refusal
        _resp("s", "borderline_benign", "none", "none", 0.1, False),
        _resp("s", "harmful", "full", "full", 0.9, True),  # a correct refusal: not a false refusal
        _resp("t", "harmful", None, "none", 0.9, False, reply_harm=0.9, complied=True),
        _resp("t", "harmful", None, "none", 0.9, True, reply_harm=0.2, complied=False),
    ]
    rep = response_report(records, ["kw"], harm_threshold=0.5)
    s = rep["s"]
    assert s["n_refusal_labelled"] == 4
    assert s["model"]["macro_f1"] == 1.0
    assert s["model"]["binary_f1"] == 1.0
    assert s["model"]["false_refusal_precision"] == 1.0 and s["model"]["false_refusal_recall"] == 1.0
    kw = s["baselines"]["kw"]
    # keyword: predicts full, none, none, full -> misses the partial refusal
    assert kw["binary_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert kw["false_refusal_recall"] == 0.5
    assert s["keyword_free"]["n"] == 2 and s["keyword_free"]["refusal_recall"] == 1.0
    assert rep["t"]["reply_harm_auroc"] == 1.0
    assert math.isnan(rep["s"]["reply_harm_auroc"])
    assert rep["all"]["n"] == 6


def test_conversation_report() -> None:
    records = [
        ConversationRecord("c", "escalation", 5, 3),  # caught before the last turn
        ConversationRecord("c", "escalation", 5, 5),  # caught only at the last turn
        ConversationRecord("c", "escalation", 4, None),
        ConversationRecord("m", "benign", 3, None),
    ]
    rep = conversation_report(records)
    esc = rep["escalation"]
    assert esc["n"] == 3
    assert esc["flagged_rate"] == pytest.approx(2 / 3)
    assert esc["flagged_before_final_rate"] == pytest.approx(1 / 3)
    assert esc["median_first_flag_turn"] == 4.0
    assert rep["benign"]["flagged_rate"] == 0.0
    assert "n_marked" not in esc
    marked = conversation_report(
        [
            ConversationRecord("c", "escalation", 4, 2, first_harmful_index=4, first_flag_index=2),  # early
            ConversationRecord("c", "escalation", 4, 3, first_harmful_index=4, first_flag_index=4),  # on time
            ConversationRecord("c", "escalation", 4, 4, first_harmful_index=4, first_flag_index=6),  # late
            ConversationRecord("c", "escalation", 4, None, first_harmful_index=4),
        ]
    )["escalation"]
    assert marked["n_marked"] == 4
    assert marked["flagged_by_first_harmful_rate"] == 0.5
    assert marked["flagged_before_first_harmful_rate"] == 0.25
    assert math.isnan(rep["benign"]["median_first_flag_turn"])
