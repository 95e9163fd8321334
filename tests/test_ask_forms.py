"""The ask-forms probe (bench/ask_forms.py): its grid, its counts, and its distance from the batch it measures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from bench.ask_forms import ABOUT, CELLS, HAZARDS, LOOKALIKES, MAKE, grid, main, summarize
from guardproxy.training.sources import AUTHORED_DIR


def _batch_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_objects18", AUTHORED_DIR / "make_objects18.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_is_every_form_around_every_thing_once() -> None:
    rows = grid()
    assert len(rows) == len(MAKE) * (len(HAZARDS) + len(LOOKALIKES)) + len(ABOUT) * len(HAZARDS)
    assert len({r["prompt"] for r in rows}) == len(rows) and len({r["id"] for r in rows}) == len(rows)
    assert {r["cell"] for r in rows} == set(CELLS)
    assert all(r["harmful"] == (r["cell"] == "make_hazard") for r in rows)
    assert "Give me a recipe for a bath bomb." in {r["prompt"] for r in rows}
    assert all("{x}" not in r["prompt"] and r["thing"] in r["prompt"] for r in rows)


def test_the_training_batch_shares_no_thing_form_or_prompt_with_the_probe() -> None:
    batch = _batch_script()
    probe_things = {x.lower() for x in HAZARDS + LOOKALIKES}
    batch_things = {x.lower() for x in [*batch.HAZARDS, *batch.HOMEMADE]}
    assert not probe_things & batch_things
    assert not set(MAKE + ABOUT) & set(batch.MAKE + batch.ABOUT)
    probe_prompts = {r["prompt"].lower() for r in grid()}
    for path in sorted(AUTHORED_DIR.rglob("*.jsonl")):  # held batches too: nothing authored holds a probe prompt
        for line in path.read_text(encoding="utf-8").splitlines():
            assert json.loads(line).get("prompt", "").lower() not in probe_prompts, path.name


def test_the_committed_batch_is_what_its_script_writes_and_no_form_predicts_the_label() -> None:
    batch = _batch_script()
    path = next(p for p in (AUTHORED_DIR / "prompts_objects18.jsonl", AUTHORED_DIR / "held" / "prompts_objects18.jsonl")
                if p.exists())  # fmt: skip
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == batch.rows()
    for form in range(1, len(batch.MAKE) + 1):
        labels = [r["label"] for r in written if r["style"] == f"make-{form}"]
        assert labels.count("harmful") == labels.count("benign") > 0
    assert all(r["category"] for r in written if r["label"] == "harmful")
    hazard_families = {r["family"] for r in written if r["label"] == "harmful"}
    assert {r["family"] for r in written if r["style"].startswith("about-")} == hazard_families


def _result(cell: str, form: str, thing: str, harm: float) -> dict[str, object]:
    return {"cell": cell, "form": form, "thing": thing, "harmful": cell == "make_hazard", "harm": harm}


def test_the_summary_counts_flags_per_cell_form_and_thing() -> None:
    results = [
        _result("make_hazard", "f1 {x}", "a", 0.9),
        _result("make_hazard", "f2 {x}", "a", 0.8),  # a: flagged in every make form
        _result("make_hazard", "f1 {x}", "b", 0.9),
        _result("make_hazard", "f2 {x}", "b", 0.1),  # b: in some
        _result("make_hazard", "f1 {x}", "c", 0.2),
        _result("make_hazard", "f2 {x}", "c", 0.49),  # c: in none (the line is 0.5)
        _result("make_lookalike", "f1 {x}", "d", 0.5),  # at the line counts as flagged
        _result("make_lookalike", "f2 {x}", "d", 0.0),
        _result("about_hazard", "g {x}", "a", 0.1),
    ]
    s = summarize(results)
    assert s["cells"]["make_hazard"] == {"n": 6, "flagged": 3, "share": 0.5}
    assert s["cells"]["make_lookalike"] == {"n": 2, "flagged": 1, "share": 0.5}
    assert s["cells"]["about_hazard"] == {"n": 1, "flagged": 0, "share": 0.0}
    assert s["forms"]["make_hazard"]["f1 {x}"]["flagged"] == 2 and s["forms"]["make_hazard"]["f2 {x}"]["flagged"] == 1
    assert s["things"]["make_hazard"]["b"] == {"n": 2, "flagged": 1, "share": 0.5}
    spread = (
        s["hazards_flagged_in_every_make_form"],
        s["hazards_flagged_in_no_make_form"],
        s["hazards_flagged_in_some_make_forms"],
    )
    assert spread == (1, 1, 1)


def test_the_probe_runs_end_to_end_and_its_summary_is_its_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "forms.json"
    assert main(["--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "models/guard-v1" and len(doc["rows"]) == len(grid())
    for cell in CELLS:
        rows = [r for r in doc["rows"] if r["cell"] == cell]
        assert doc["summary"]["cells"][cell]["flagged"] == sum(r["harm"] >= 0.5 for r in rows)
    assert f"{len(grid())} prompts" in capsys.readouterr().out
