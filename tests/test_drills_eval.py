"""The loop closes: a small recorded session → review labels → ``guardproxy drills export --reviewed`` →
``guardproxy eval`` with the shipped guard model scores it as a labelled drill set."""

from __future__ import annotations

import json
from pathlib import Path

from guardproxy.settings import Settings
from tests.test_drills_export import cli, record_session

MODEL_DIR = Settings().guard.model_dir


async def test_export_then_eval_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "drills.db"
    await record_session(db)
    out = tmp_path / "set"
    assert await cli(["drills", "export", "--store", f"sqlite:///{db}", "--out", str(out), "--reviewed"]) == 0
    files = [str(out / n) for n in ("prompts.jsonl", "responses.jsonl", "conversations.jsonl")]
    metrics_path = tmp_path / "metrics.json"
    code = await cli(["eval", *files, "--model", str(MODEL_DIR), "--json", str(metrics_path), "--no-progress"])
    assert code == 0
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    # every exported row was scored as a labelled row of its kind (nothing skipped as unlabelled)
    assert metrics["unlabelled_rows_skipped"] == 0
    by_label = metrics["prompts"]["by_label"]
    assert by_label["harmful"]["n"] == 2 and by_label["benign"]["n"] == 2  # the two-turn drill is a conversation
    assert metrics["responses"]
    assert metrics["conversations"]["benign"]["n"] == 1


async def test_report_with_the_guard_models_embeddings(tmp_path: Path) -> None:
    db = tmp_path / "drills.db"
    await record_session(db)
    out = tmp_path / "report"
    code = await cli(["drills", "report", "--store", f"sqlite:///{db}", "--out", str(out), "--model", str(MODEL_DIR)])
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["embedding"] == "model"
    assert report["refusal_concentration"]["all"]["refusals"] == 3
    # seven unrelated requests make no family: in the raw embedding, where any two harmless requests sit at a
    # cosine near 0.96, they did
    assert report["decision_consistency"] == {"families": 0}
