"""The candidates' judging table (bench/candidate_table.py) counts as the ship rules count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.candidate_table import main, read_column
from guardproxy.settings import PROJECT_ROOT

CANDIDATES = PROJECT_ROOT / "bench" / "results" / "candidates"


def test_the_committed_2251_files_give_the_counts_its_verdict_was_read_from() -> None:
    # bench/results/candidates/README.md, "2.25.1": its table was counted by hand from these files before the tool.
    seed2, _ = read_column(str(CANDIDATES / "2.25.1"), "gp-long14")
    seed3, _ = read_column(str(CANDIDATES / "2.25.1-r"), "gp-long14")
    assert seed2.values["the same without gp-long14* chats"] == 30
    assert seed3.values["the same without gp-long14* chats"] == 19
    assert seed2.parts["harmless conversations flagged (of 385)"] == "5+11+6+0+10"
    assert seed2.values["escalations caught (of 140)"] == 137
    assert seed2.values["identity: harmless about people flagged (of 330)"] == 7
    assert seed2.values["identity, blind set: harmless about people flagged (of 462)"] == 39
    assert seed3.values["identity, blind set: harmful about people flagged (of 396)"] == 365
    assert seed2.values["harm line"] == pytest.approx(0.35)


def test_the_committed_2260_deletion_files_give_the_flips_its_verdict_was_read_from(tmp_path: Path) -> None:
    # bench/results/candidates/README.md, "2.26.0": form-word flips 43 and 32 (mean 37.5), any word 74 and 70.
    seed2, _ = read_column(str(CANDIDATES / "2.26.0"), "gp-long14")
    seed3, _ = read_column(str(CANDIDATES / "2.26.0-r"), "gp-long14")
    assert (
        seed2.values["verdicts one form word turns (of 300)"],
        seed3.values["verdicts one form word turns (of 300)"],
    ) == (43, 32)
    assert (
        seed2.values["verdicts any one word turns (of 300)"],
        seed3.values["verdicts any one word turns (of 300)"],
    ) == (74, 70)
    broken = json.loads((CANDIDATES / "2.26.0.word_deletion.json").read_text())
    del broken["summary"]["harmless"]["allowed_one_form_deletion_flags"]
    (tmp_path / "d.word_deletion.json").write_text(json.dumps(broken))
    assert main([str(tmp_path / "d")]) == 2


def test_the_leave_out_prefix_only_subtracts_flagged_chats_it_names(tmp_path: Path) -> None:
    src = json.loads((CANDIDATES / "2.25.1.conversation_eval.json").read_text())
    flags = src["results"]["dev/authored:benign"]["first_flags"]
    named = sum(1 for f in flags if f["id"].startswith("gp-conv2"))
    assert named  # the file has flagged chats of that family to count
    (tmp_path / "c.conversation_eval.json").write_text(json.dumps(src))

    everything, _ = read_column(str(tmp_path / "c"), None)
    fewer, _ = read_column(str(tmp_path / "c"), "gp-conv2")

    total = everything.values["harmless conversations flagged (of 385)"]
    assert fewer.values["the same without gp-conv2* chats"] == total - named
    assert "the same without gp-long14* chats" not in everything.values


def test_a_missing_file_leaves_its_rows_out_and_a_broken_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(CANDIDATES / "2.25.1.metrics.json", tmp_path / "a.metrics.json")
    assert main([str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| harm line | 0.35 |" in out
    assert "harmless conversations" not in out  # no conversation_eval file for this prefix

    (tmp_path / "b.pooled.compare.json").write_text(json.dumps({"sets": {}}))
    assert main([str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "b.pooled.compare.json" in err and "sets/harm_english_pooled.jsonl" in err

    assert main([str(tmp_path / "nothing")]) == 2
    assert "none of the prefixes" in capsys.readouterr().err


def test_the_closing_mark_rows_come_from_an_end_punctuation_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # bench/RESULTS.md, "The closing mark": 2.25.1 flags 90.1% / 90.6% / 87.4% of the English harmful rows with no
    # mark / "?" / ".", and the mark turns 95 + 49 verdicts.
    shutil.copy(PROJECT_ROOT / "bench" / "results" / "end_punctuation_2251.json", tmp_path / "s.end_punctuation.json")
    col, raw = read_column(str(tmp_path / "s"), None)
    assert col.values["verdicts the closing mark turns"] == 144 == raw["end punctuation"]["turned"]
    assert col.values['closing mark: harmful flagged, "."'] == pytest.approx(0.874, abs=5e-4)
    assert col.values["closing mark: harmless flagged, no mark"] == pytest.approx(0.067, abs=5e-4)
    broken = json.loads((tmp_path / "s.end_punctuation.json").read_text())
    del broken["summary"]["harmful"]["flagged_share"]
    (tmp_path / "b.end_punctuation.json").write_text(json.dumps(broken))
    assert main([str(tmp_path / "b")]) == 2
    assert "b.end_punctuation.json: no field summary/harmful/flagged_share/none" in capsys.readouterr().err


def test_the_frame_rows_come_from_a_frames_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # bench/RESULTS.md, "Frames": 2.25.1 keeps 76.4% of its harmful flags in the thriller frame (the worst) and the
    # grandma frame flags 20.8% of the harmless asks it allows plain (the worst).
    shutil.copy(PROJECT_ROOT / "bench" / "results" / "frames_2251.json", tmp_path / "s.frames.json")
    col, raw = read_column(str(tmp_path / "s"), None)
    assert col.values["frames: harmful flags kept, worst frame"] == pytest.approx(0.7637)
    assert col.values["frames: harmless asks flagged framed, worst frame"] == pytest.approx(0.2083)
    assert len(raw["frames"]["kept"]) == 9 and "plain" not in raw["frames"]["kept"]
    mean = col.values["frames: harmful flags kept, mean of 9"]
    assert min(raw["frames"]["kept"].values()) < mean < max(raw["frames"]["kept"].values())
    broken = json.loads((tmp_path / "s.frames.json").read_text())
    del broken["summary"]["frames"]["thriller"]["added_share"]
    (tmp_path / "b.frames.json").write_text(json.dumps(broken))
    assert main([str(tmp_path / "b")]) == 2
    assert "b.frames.json: no field summary/frames/thriller/added_share" in capsys.readouterr().err


def test_the_ask_form_rows_come_from_an_ask_forms_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # bench/RESULTS.md, "Ask forms": 2.34.1 flags 63 of 96 make-asks for a hazard, 11 of 96 for a home-made thing,
    # none of the 60 about-asks, and 3 of the 12 hazards in every make-form.
    shutil.copy(PROJECT_ROOT / "bench" / "results" / "ask_forms_2341.json", tmp_path / "s.ask_forms.json")
    col, raw = read_column(str(tmp_path / "s"), None)
    assert col.values["ask forms: make-asks for a hazard flagged"] == pytest.approx(63 / 96, abs=1e-4)
    assert col.values["ask forms: make-asks for a home-made thing flagged"] == pytest.approx(11 / 96, abs=1e-4)
    assert col.values["ask forms: about-asks for a hazard flagged"] == 0.0
    assert col.values["ask forms: hazards flagged in every make-form (of 12)"] == 3
    assert set(raw["ask forms"]) == {"make_hazard", "make_lookalike", "about_hazard"}
    broken = json.loads((tmp_path / "s.ask_forms.json").read_text())
    del broken["summary"]["cells"]["make_lookalike"]["share"]
    (tmp_path / "b.ask_forms.json").write_text(json.dumps(broken))
    assert main([str(tmp_path / "b")]) == 2
    assert "b.ask_forms.json: no field summary/cells/make_lookalike/share" in capsys.readouterr().err


def test_the_helpful_reply_rows_come_from_a_helpful_replies_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # bench/results/candidates/README.md, "2.31.0": 2.25.1 reads 123 of the 982 dev chat replies as refusals (86
    # authored + 37 MT-Bench), 69 of the 73 not in English, and on challenge14 28 of 103 helpful replies as refusals
    # and 10 of its 76 refusals as none.
    # and 50 of the 908 replies in the challenge sets' harmless chats (31 + 19)
    chats = json.loads((PROJECT_ROOT / "bench" / "results" / "helpful_replies_2251_chats.json").read_text())
    chats["pairs"] = json.loads(
        (PROJECT_ROOT / "bench" / "results" / "helpful_replies_2251_challenge14.json").read_text()
    )["pairs"]
    (tmp_path / "h.helpful_replies.json").write_text(json.dumps(chats))
    col, _ = read_column(str(tmp_path / "h"), None)
    assert col.values["dev chats: helpful replies read as refusals (of 982)"] == 123
    assert col.parts["dev chats: helpful replies read as refusals (of 982)"] == "86+37"
    assert col.values["dev chats: the same, replies not in English (of 73)"] == 69
    assert col.values["challenge chats: helpful replies read as refusals (of 908)"] == 50
    assert col.parts["challenge chats: helpful replies read as refusals (of 908)"] == "31+19"
    assert col.values["refusal_challenge14: helpful read as refusals (of 103)"] == 28
    assert col.values["refusal_challenge14: refusals read as none (of 76)"] == 10
    del chats["conversations"]["authored"]["by_language"]
    (tmp_path / "b.helpful_replies.json").write_text(json.dumps(chats))
    assert main([str(tmp_path / "b")]) == 2
    assert "b.helpful_replies.json: no field authored/by_language" in capsys.readouterr().err


def test_the_decisions_changed_row_comes_from_a_compare_file_that_has_them_and_only_then(tmp_path: Path) -> None:
    kept = json.loads((CANDIDATES / "2.33.0.pooled.compare.json").read_text())  # written before decisions_changed
    (tmp_path / "old.pooled.compare.json").write_text(json.dumps(kept))
    col, _ = read_column(str(tmp_path / "old"), None)
    assert "English pooled: AUROC" in col.values
    assert not any("decisions changed" in row for row in col.values)
    changed = {"harmful_newly_allowed": 7, "harmful_newly_flagged": 3, "harmless_newly_flagged": 5}
    kept["sets"]["harm_english_pooled.jsonl"]["candidate"]["decisions_changed"] = changed | {
        "harmless_newly_allowed": 1
    }
    (tmp_path / "new.pooled.compare.json").write_text(json.dumps(kept))
    col, _ = read_column(str(tmp_path / "new"), None)
    row = "English pooled: decisions changed against the baseline"
    assert col.values[row] == 16 and col.parts[row] == "7/3/5/1"
    assert "other languages pooled: decisions changed against the baseline" not in col.values
