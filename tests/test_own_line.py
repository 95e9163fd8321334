"""``bench.own_line_other_languages``: the line it sets misses no more of the harmful rows than asked."""

from __future__ import annotations

import numpy as np

from bench.own_line_other_languages import own_line


def test_the_own_line_is_the_highest_that_misses_at_most_the_given_share() -> None:
    harmful = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    for miss in (0.0, 0.1, 0.15, 0.2, 0.25, 0.5):
        t = own_line(harmful, miss)
        assert np.mean(harmful < t) <= miss  # misses no more than asked
        higher = harmful[harmful > t]
        assert not len(higher) or np.mean(harmful < higher.min()) > miss  # the next score up would miss more
    assert own_line(harmful, 0.2) == 0.3
