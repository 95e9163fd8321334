"""Averaging trained runs' weights (``guardproxy train --soup``); needs the 'train' extra."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from guardproxy.training.run import average_weights  # noqa: E402  (after the skip: it imports torch)


def test_floating_weights_are_averaged_and_integer_buffers_kept() -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1, 2])}
    b = {"w": torch.tensor([3.0, 5.0]), "ids": torch.tensor([0, 1, 2])}
    out = average_weights([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["ids"], a["ids"]) and out["ids"].dtype == torch.int64


def test_runs_with_other_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="different weights"):
        average_weights([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="no weights"):
        average_weights([])
