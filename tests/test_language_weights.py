"""``guardproxy train --language-weights``: the reweighed rows are the ones the loss reads; needs the 'train' extra.
The weighting itself is tested without torch in ``test_training_data.py``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from guardproxy.encoding import load_tokenizer  # noqa: E402  (after the skip: these import torch)
from guardproxy.taxonomy import CATEGORY_IDS  # noqa: E402
from guardproxy.training.loop import Encoder, TrainConfig, to_tensors, train  # noqa: E402
from guardproxy.training.model import GuardModel, base_model_dir, load_base_encoder, shrink_encoder  # noqa: E402
from guardproxy.training.sources import Example  # noqa: E402


def _row(text: str, harm: float, language: str | None = None) -> Example:
    meta = {"language": language} if language else {}
    return Example(text=text, source="authored", group=text, label="x", harm=harm, meta=meta)


# German is half of the harmful rows and one in eight of the harmless ones: the language is a harm cue.
ROWS = [_row(t, 1.0) for t in ("how do i steal a car", "how do i poison a dog")]
ROWS += [_row(t, 1.0, "de") for t in ("wie stehle ich ein auto", "wie vergifte ich einen hund")]
ROWS += [_row(f"tell me about {t}", 0.0) for t in ("paris", "rome", "cakes", "dogs", "trains", "rivers", "tea")]
ROWS += [_row("erzähl mir von berlin", 0.0, "de")]


def _trained(weights: bool) -> tuple[dict[str, float], float]:
    torch.manual_seed(0)
    model = GuardModel(shrink_encoder(load_base_encoder(), 1), len(CATEGORY_IDS))
    encoder = Encoder(load_tokenizer(base_model_dir() / "tokenizer.json"), 32)
    cfg = TrainConfig(
        epochs=3.0,
        max_steps=3,
        lr=1e-3,
        warmup=0.0,
        frames_per_epoch=0,
        wraps_per_epoch=0,
        rewords_per_epoch=0,
        language_weights=weights,
    )
    summary = train(model, ROWS, encoder, cfg)
    with torch.no_grad():
        logit = model.eval()(**to_tensors([_row("erzähl mir von berlin", 0.0, "de")], encoder))["harm"]
    return summary, float(logit[0])


def test_a_row_weighed_up_by_language_weights_is_learnt_faster() -> None:
    # Three steps from the same start: the German harmless row, weighed 7x, moves much further toward harmless.
    summary_with, logit_with = _trained(True)
    summary_without, logit_without = _trained(False)
    assert summary_with["language_weight_factor"] == pytest.approx(7.0)  # 0.5 / 0.5 * 7 / 1
    assert "language_weight_factor" not in summary_without
    assert logit_with < logit_without - 1.0
    assert all(r.harm_weight == 1.0 for r in ROWS)  # the caller's rows are left as they were
