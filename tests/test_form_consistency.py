"""``guardproxy train --form-consistency W``: the loss between an ask's harm logit and its copy's without one form
word; needs the 'train' extra."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from guardproxy.encoding import load_tokenizer  # noqa: E402  (after the skip: these import torch)
from guardproxy.taxonomy import CATEGORY_IDS  # noqa: E402
from guardproxy.training.loop import Encoder, TrainConfig, consistency_loss, to_tensors, train  # noqa: E402
from guardproxy.training.model import GuardModel, base_model_dir, load_base_encoder, shrink_encoder  # noqa: E402
from guardproxy.training.sources import Example  # noqa: E402

BAD = ["steal a car", "poison a dog", "rob a bank", "burn a house", "stalk a woman", "forge a check"]
GOOD = ["bake a cake", "walk a dog", "open a bank account", "paint a house", "meet a woman", "cash a check"]


def test_the_loss_is_zero_for_equal_logits_and_pulls_both_sides_together() -> None:
    a = torch.tensor([2.0, -1.0], requires_grad=True)
    b = torch.tensor([2.0, 1.0], requires_grad=True)
    loss = consistency_loss(a, b)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(2.0)  # (0 + 4) / 2
    assert a.grad is not None and b.grad is not None
    # a step down the gradient raises the lower logit and lowers the higher one
    assert float(a.grad[1]) < 0 < float(b.grad[1]) and float(a.grad[0]) == float(b.grad[0]) == 0.0


def _gap(model: GuardModel, encoder: Encoder) -> float:
    """Mean absolute harm-logit gap between each harmful ask and the same ask without "how"."""
    asks = [Example(text=f"how {t}", source="advbench", group=t, label="x", harm=1.0) for t in BAD]
    bare = [Example(text=t, source="advbench", group=t, label="x", harm=1.0) for t in BAD]
    with torch.no_grad():
        return float(
            (model(**to_tensors(asks, encoder))["harm"] - model(**to_tensors(bare, encoder))["harm"]).abs().mean()
        )


def _trained(weight: float) -> tuple[GuardModel, Encoder]:
    # "how" is a perfect cue here: every harmful ask has it, no harmless one does.
    rows = [Example(text=f"how {t}", source="advbench", group=t, label="x", harm=1.0) for t in BAD]
    rows += [Example(text=t, source="clinc150", group=t, label="x", harm=0.0) for t in GOOD]
    torch.manual_seed(0)
    model = GuardModel(shrink_encoder(load_base_encoder(), 1), len(CATEGORY_IDS))
    encoder = Encoder(load_tokenizer(base_model_dir() / "tokenizer.json"), 32)
    cfg = TrainConfig(
        epochs=40.0,
        max_steps=40,
        lr=1e-3,
        warmup=0.0,
        frames_per_epoch=0,
        wraps_per_epoch=0,
        rewords_per_epoch=0,
        form_consistency=weight,
        consistency_rows=12,
    )
    summary = train(model, rows, encoder, cfg)
    assert ("loss_consistency" in summary) == (weight > 0)
    return model.eval(), encoder


def test_training_with_the_loss_leaves_a_deleted_form_word_less_weight_than_training_without() -> None:
    gap_without = _gap(*_trained(0.0))
    gap_with = _gap(*_trained(5.0))
    assert gap_with < 0.25 * gap_without
