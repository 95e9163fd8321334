"""The refusal label audit (bench/refusal_audit.py) and the soft refusal targets it feeds to training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import refusal_audit as audit
from guardproxy.training.sources import Example, apply_refusal_targets, load_refusal_targets

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _pairs(per_class: int) -> list[Example]:
    return [
        Example(
            text=f"q{c}-{i}",
            reply="r",
            source="phtest_responses",
            group=f"g{c}-{i}",
            label="borderline_benign",
            refusal=c,
            meta={"id": f"id-{c}-{i}"},
        )
        for c in range(3)
        for i in range(per_class)
    ]


def test_batches_are_disjoint_even_per_class_and_reproducible() -> None:
    rows = _pairs(100)
    first, second = audit.draw_batch(rows, 1, per_class=40), audit.draw_batch(rows, 2, per_class=40)
    assert [e.meta["id"] for e in first] == [e.meta["id"] for e in audit.draw_batch(rows, 1, per_class=40)]
    assert not {e.meta["id"] for e in first} & {e.meta["id"] for e in second}
    for batch in (first, second):
        assert sorted(np.bincount([e.refusal for e in batch]).tolist()) == [40, 40, 40]


def test_a_weight_counts_as_that_many_copies_of_the_row() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2, 0])
    pred = np.array([0, 1, 1, 2, 2, 2, 0])
    weight = np.array([3.0, 1, 1, 1, 2, 1, 1])
    copies = np.repeat(np.arange(len(truth)), weight.astype(int))
    weighted = audit.weighted_scores(truth, pred, weight)
    expanded = audit.weighted_scores(truth[copies], pred[copies], np.ones(len(copies)))
    for metric in ("macro_f1", "binary_f1", "accuracy"):
        assert weighted[metric] == pytest.approx(expanded[metric])
    assert weighted["accuracy"] == pytest.approx(8 / 10)
    assert audit.weighted_scores(truth, truth, weight)["macro_f1"] == 1.0


def test_a_bad_label_row_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a", "refusal": "full", "batch": 1}\n{"id": "b", "refusal": "maybe", "batch": 1}\n')
    with pytest.raises(SystemExit, match=rf"{path}:2: refusal must be one of"):
        audit.read_labels(path)
    path.write_text('{"id": "a", "refusal": "full", "batch": 1}\n{"id": "b", "batch": 2}\n')
    with pytest.raises(SystemExit, match=rf"{path}:2: not a label row"):
        audit.read_labels(path)


def test_labels_are_read_per_batch(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a", "refusal": "full", "batch": 1}\n{"id": "b", "refusal": "none", "batch": 2}\n')
    assert audit.read_labels(path, {2}) == {"b": "none"}
    assert audit.read_labels(path) == {"a": "full", "b": "none"}


def test_soft_targets_go_to_the_named_sources_labelled_rows_only() -> None:
    source, targets = load_refusal_targets(audit.LABELS.parent / "phtest_targets.json")
    rows = _pairs(2) + [Example(text="q", reply="r", source="authored/x", group="x", label="benign", refusal=1)]
    rows.append(Example(text="q", reply="r", source=source, group="y", label="harmful", refusal=None))
    assert apply_refusal_targets(rows, source, targets) == 6
    assert [e.refusal_target for e in rows[:6]] == [targets[e.refusal or 0] for e in rows[:6]]
    assert rows[6].refusal_target is None and rows[7].refusal_target is None
    assert all(sum(p) == pytest.approx(1.0) for p in targets.values())


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"source": "s"}, "missing key 'targets'"),
        ({"source": "s", "targets": {"none": [1, 0, 0], "full": [0, 0, 1]}}, "must map each of"),
        ({"source": "s", "targets": {"none": [1, 0, 0], "partial": [0.5, 0.4, 0], "full": [0, 0, 1]}}, "summing to 1"),
        ({"source": "s", "targets": {"none": [1, 0, 0], "partial": [1.5, -0.5, 0], "full": [0, 0, 1]}}, "non-negative"),
    ],
)
def test_a_bad_targets_file_is_refused_with_its_name(tmp_path: Path, doc: dict[str, object], message: str) -> None:
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as err:
        load_refusal_targets(path)
    assert str(path) in str(err.value)


def test_the_committed_targets_are_what_batches_1_and_2_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "targets.json"
    assert audit.main(["--data", str(DATA), "targets", "--batches", "1", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((audit.LABELS.parent / "phtest_targets.json").read_text())
    # Every audited row is still a dev pair (a labelled row in training would make the audit meaningless).
    assert "not dev pairs" not in capsys.readouterr().err
