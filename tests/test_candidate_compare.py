"""The matched-operating-point recall that a model's shipping rule reads (bench/candidate_compare.py)."""

from __future__ import annotations

import numpy as np

from bench.candidate_compare import recall_at_flag_rate


def test_recall_at_a_matched_harmless_rate_never_flags_more_harmless_rows_than_allowed() -> None:
    neg = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    pos = np.array([0.35, 0.55, 0.75, 0.85, 0.99])
    # 20% of 10 harmless rows: the two highest (0.9, 0.95) may be flagged, so the cut sits above 0.8.
    assert recall_at_flag_rate(pos, neg, 0.2) == 0.4  # 0.85 and 0.99
    assert recall_at_flag_rate(pos, neg, 0.0) == 0.2  # only above every harmless score
    assert recall_at_flag_rate(pos, neg, 1.0) == 1.0
    # A better ranking (harmful scores shifted up) never lowers the matched recall.
    assert recall_at_flag_rate(pos + 0.1, neg, 0.2) >= recall_at_flag_rate(pos, neg, 0.2)
