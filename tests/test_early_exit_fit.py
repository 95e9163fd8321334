"""``python -m guardproxy.training.early_exit``'s fit, on synthetic pooled states (needs scikit-learn, the train
extra): the threshold honours ``--miss`` on the calibration split, short rows never exit, and the folded linear
models read raw states as the fitted ones read standardized states."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from guardproxy.training.early_exit import fit  # noqa: E402

THRESHOLDS = {"harm": 0.35, "jailbreak": 0.05}


def _split(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """States whose first coordinate drives the whole model's harm; the rest is noise on another scale."""
    x = np.concatenate([rng.normal(size=(n, 1)), rng.normal(loc=5.0, scale=3.0, size=(n, 3))], axis=1)
    harm = 1 / (1 + np.exp(-(3.0 * x[:, 0] - 1.0)))
    return {
        "x": x.astype(np.float32),
        "harm": harm,
        "jailbreak": np.full(n, 0.001),
        "ids": rng.integers(8, 64, size=n),
    }


def test_the_threshold_lets_at_most_the_miss_share_of_kept_calibration_rows_exit() -> None:
    rng = np.random.default_rng(0)
    scored = {split: _split(rng, 3000) for split in ("train", "calibration", "dev")}
    head, threshold, harm, _jailbreak, report = fit(
        scored, THRESHOLDS, harm_line=0.15, jailbreak_line=0.5, miss=0.01, min_ids=24
    )
    cal = scored["calibration"]
    kept = np.array([h >= 0.15 * 2 * 0.35 for h in cal["harm"]])  # operating 0.15 = raw 0.105 below the threshold
    eligible = cal["ids"] >= 24
    exits = (head(cal["x"]) < threshold) & eligible
    assert (exits & kept).sum() <= 0.01 * (kept & eligible).sum()
    assert report["calibration"]["kept_that_exit"] == int((exits & kept).sum())
    assert report["calibration"]["exit_rate"] == pytest.approx(float(exits.mean()), abs=1e-4)
    assert not exits[~eligible].any()
    assert report["dev"]["exit_rate_of_the_rest"] > 0.3  # a separable teacher leaves many rows to exit
    # the harm estimate reads the raw states: it tracks the whole model's harm where rows exit
    est = 1 / (1 + np.exp(-harm(cal["x"]).astype(np.float64)))
    assert np.corrcoef(est, cal["harm"])[0, 1] > 0.9


def test_a_teacher_with_nothing_to_keep_is_an_error() -> None:
    rng = np.random.default_rng(1)
    scored = {split: _split(rng, 200) for split in ("train", "calibration", "dev")}
    for split in scored.values():
        split["harm"] = np.zeros_like(split["harm"])
    with pytest.raises(ValueError, match="all on one side"):
        fit(scored, THRESHOLDS, harm_line=0.15, jailbreak_line=0.5, miss=0.01, min_ids=24)
