"""The harm threshold answers to each target group on its own: the hard authored asks are not hidden by easy ones."""

from __future__ import annotations

import numpy as np
import pytest

from guardproxy.training.calibration import (
    GRID,
    HARM_FLAG_TARGETS,
    HARM_MISS_TARGET,
    calibrate_harm,
    curve_without,
    harm_calibration_curve,
    harm_calibration_report,
    harm_group,
    highest_line_within,
)
from guardproxy.training.sources import Example


def _rows(source: str, label: str, scores: np.ndarray, harm: float | None) -> list[tuple[Example, float]]:
    return [
        (Example(text=f"{source} {i}", source=source, group=f"{source}-{i}", label=label, harm=harm), float(s))
        for i, s in enumerate(scores)
    ]


def _worst(rows: list[tuple[Example, float]], t: float) -> float:
    groups: dict[str, list[float]] = {}
    for e, s in rows:
        g = harm_group(e)
        if g is not None:
            groups.setdefault(g, []).append(s)
    ratios = []
    for g, vals in groups.items():
        v = np.array(vals)
        if g.startswith("harmful"):
            ratios.append(float(np.mean(v < t)) / HARM_MISS_TARGET)
        else:
            ratios.append(float(np.mean(v >= t)) / HARM_FLAG_TARGETS[g])
    return max(ratios)


def test_the_threshold_follows_the_hardest_harmful_group_and_is_minimax_over_groups() -> None:
    rng = np.random.default_rng(0)
    rows = (
        _rows("advbench", "harmful", rng.uniform(0.85, 1.0, 400), 1.0)  # many easy public asks
        + _rows("authored/prompts_reframed", "harmful", rng.uniform(0.25, 0.95, 40), 1.0)  # few hard reframings
        + _rows("clinc150", "benign", rng.uniform(0.0, 0.2, 400), 0.0)
        + _rows("authored/prompts_lookalike", "benign", rng.uniform(0.05, 0.45, 40), 0.0)
        + _rows("phtest", "borderline_benign", rng.uniform(0.0, 0.35, 100), 0.0)
        + _rows("itw_forbidden_questions", "policy_restricted", np.full(50, 0.99), 0.0)  # not a target group
    )
    examples = [e for e, _ in rows]
    scores = np.array([s for _, s in rows])
    t = calibrate_harm(examples, scores)

    # Pooled, the 400 easy asks make 5% misses cheap: the pooled rule would sit far above the hard asks.
    pooled_pos = scores[[e.harm == 1.0 for e in examples]]
    pooled_t = next(x for x in GRID[::-1] if np.mean(pooled_pos < x) <= HARM_MISS_TARGET)
    assert t < pooled_t
    authored = scores[[e.source == "authored/prompts_reframed" for e in examples]]
    assert np.mean(authored < t) < np.mean(authored < pooled_t)

    # No other threshold on the grid has a smaller worst ratio of rate to target.
    assert _worst(rows, t) <= min(_worst(rows, float(x)) for x in GRID) + 1e-9

    # The report the model card prints: each group's size and rate at the threshold, against its target.
    report = harm_calibration_report(examples, scores, t)
    assert set(report) == {"harmful_public", "harmful_authored", "ordinary", "lookalike", "phtest"}
    assert report["harmful_public"]["n"] == 400 and report["phtest"]["target"] == 0.05
    assert report["harmful_authored"]["miss_rate"] == float(np.mean(authored < t))
    worst = max(g.get("miss_rate", g.get("flag_rate", 0.0)) / g["target"] for g in report.values())
    assert abs(worst - _worst(rows, t)) < 1e-9


def test_groups_are_the_issue_targets() -> None:
    def group(source: str, label: str, harm: float | None) -> str | None:
        return harm_group(Example(text="x", source=source, group="g", label=label, harm=harm))

    assert group("harmbench", "harmful", 1.0) == "harmful_public"
    assert group("authored/prompts_contrast4", "harmful", 1.0) == "harmful_authored"
    assert group("authored/prompts_lookalike5", "benign", 0.0) == "lookalike"
    assert group("authored/conversations_long6", "benign", 0.0) == "ordinary"  # chat windows are ordinary talk
    assert group("gsm8k", "benign", 0.0) == "ordinary"
    assert group("phtest", "borderline_benign", 0.0) == "phtest"
    assert group("phtest", "borderline_controversial", None) is None


def test_by_kind_an_everyday_authored_request_is_ordinary_and_a_lookalike_stays_one() -> None:
    def row(kind: str | None, label: str = "benign") -> Example:
        meta = {} if kind is None else {"kind": kind}
        return Example(text="x", source="authored/prompts_everyday10", group="g", label=label, harm=0.0, meta=meta)

    assert harm_group(row("everyday")) == "lookalike"  # by file, the default (the shipped model's recipe)
    assert harm_group(row("everyday"), by_kind=True) == "ordinary"
    assert harm_group(row("lookalike"), by_kind=True) == "lookalike"
    assert harm_group(row(None), by_kind=True) == "lookalike"  # no kind: its file decides, as before

    # 100 easy everyday rows no longer dilute the look-alike group whose target binds: the threshold rises
    rng = np.random.default_rng(1)
    rows = (
        _rows("advbench", "harmful", rng.uniform(0.3, 1.0, 200), 1.0)
        + _rows("authored/prompts_lookalike", "benign", rng.uniform(0.0, 0.6, 60), 0.0)
        + _rows("clinc150", "benign", rng.uniform(0.0, 0.1, 400), 0.0)
    )
    for i in range(100):
        e = row("everyday")
        e.text, e.group = f"everyday {i}", f"everyday-{i}"
        rows.append((e, float(rng.uniform(0.0, 0.05))))
    examples, scores = [e for e, _ in rows], np.array([s for _, s in rows])
    assert calibrate_harm(examples, scores, by_kind=True) > calibrate_harm(examples, scores)
    report = harm_calibration_report(examples, scores, 0.5, by_kind=True)
    assert report["lookalike"]["n"] == 60 and report["ordinary"]["n"] == 500


def test_the_curve_gives_every_group_its_rate_on_the_grid_and_a_recall_held_line_can_be_read_off_it() -> None:
    rng = np.random.default_rng(2)
    rows = (
        _rows("advbench", "harmful", rng.uniform(0.5, 1.0, 300), 1.0)
        + _rows("authored/prompts_reframed", "harmful", rng.uniform(0.1, 0.9, 81), 1.0)  # k of 81: no short decimal
        + _rows("clinc150", "benign", rng.uniform(0.0, 0.3, 300), 0.0)
        + _rows("authored/prompts_lookalike", "benign", rng.uniform(0.0, 0.6, 80), 0.0)
    )
    examples, scores = [e for e, _ in rows], np.array([s for _, s in rows])
    curve = harm_calibration_curve(examples, scores)
    assert curve["grid"] == [float(t) for t in GRID]
    assert set(curve) == {"grid", "harmful_public", "harmful_authored", "ordinary", "lookalike", "harmful_sources"}
    # At any threshold the curve agrees with the report the card prints.
    i = curve["grid"].index(0.42)
    report = harm_calibration_report(examples, scores, 0.42)
    assert abs(curve["harmful_authored"][i] - report["harmful_authored"]["miss_rate"]) < 1e-6
    assert abs(curve["lookalike"][i] - report["lookalike"]["flag_rate"]) < 1e-6
    # Miss rates rise with the threshold and flag rates fall.
    assert all(a <= b for a, b in zip(curve["harmful_authored"], curve["harmful_authored"][1:], strict=False))
    assert all(a >= b for a, b in zip(curve["lookalike"], curve["lookalike"][1:], strict=False))

    # The line that holds a recall: the highest threshold missing at most 20% of the authored asks and 5% of the
    # public ones; one step up breaks a limit.
    limits = {"harmful_authored": 0.20, "harmful_public": 0.05}
    t = highest_line_within(curve, limits)
    assert t is not None
    authored = scores[[e.source == "authored/prompts_reframed" for e in examples]]
    public = scores[[e.source == "advbench" for e in examples]]
    assert np.mean(authored < t) <= 0.20 and np.mean(public < t) <= 0.05
    above = round(t + 0.01, 2)
    assert np.mean(authored < above) > 0.20 or np.mean(public < above) > 0.05
    assert highest_line_within(curve, {"harmful_authored": -1.0}) is None  # no line misses less than nothing

    # A limit given as another model's rate on the same rows (k of n) holds at a line that misses exactly k.
    k = int(np.sum(authored < 0.5))
    exact = highest_line_within(curve, {"harmful_authored": k / len(authored)})
    assert exact is not None and exact >= 0.5 and np.sum(authored < exact) == k


def test_a_line_can_hold_the_older_rows_of_a_group_while_a_new_batch_of_easy_asks_shares_it() -> None:
    rng = np.random.default_rng(3)
    rows = (
        _rows("advbench", "harmful", rng.uniform(0.4, 1.0, 200), 1.0)
        + _rows("authored/prompts_reframed", "harmful", rng.uniform(0.1, 0.9, 90), 1.0)
        + _rows("authored/prompts_new", "harmful", rng.uniform(0.8, 1.0, 30), 1.0)  # the new batch: all easy
        + _rows("clinc150", "benign", rng.uniform(0.0, 0.3, 200), 0.0)
    )
    examples, scores = [e for e, _ in rows], np.array([s for _, s in rows])
    curve = harm_calibration_curve(examples, scores)
    sources = curve["harmful_sources"]
    assert set(sources) == {"advbench", "authored/prompts_reframed", "authored/prompts_new"}
    assert sources["authored/prompts_new"] == {
        "group": "harmful_authored",
        "n": 30,
        "missed": [int(np.sum(scores[290:320] < t)) for t in GRID],
    }
    older = scores[200:290]
    limit = {"harmful_authored": float(np.mean(older < 0.5))}
    # Counted with the easy batch, the group misses less at every line, so the line that holds the rate rises and
    # the older rows lose recall; counted without it, the line holds the older rows' rate.
    with_batch = highest_line_within(curve, limit)
    without = highest_line_within(curve_without(curve, ["authored/prompts_new"]), limit)
    assert with_batch is not None and without is not None and with_batch > without >= 0.5
    assert np.mean(older < with_batch) > limit["harmful_authored"] >= np.mean(older < without)
    # The other groups are untouched, and a source the curve never saw is an error, not a silent no-op.
    assert curve_without(curve, ["authored/prompts_new"])["harmful_public"] == curve["harmful_public"]
    with pytest.raises(KeyError, match="authored/prompts_typo"):
        curve_without(curve, ["authored/prompts_typo"])
