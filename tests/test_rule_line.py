"""``bench.rule_line`` reads a rule's harm line off a run's kept metrics, and the kept candidates' lines reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import rule_line
from guardproxy.training.calibration import curve_without, harm_calibration_curve, highest_line_within
from guardproxy.training.sources import Example

CANDIDATES = Path(__file__).resolve().parent.parent / "bench" / "results" / "candidates"
LIMITS = ["--max-miss", "harmful_authored=39/284", "--max-miss", "harmful_public=22/269"]


def _metrics(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(7)
    rows: list[tuple[Example, float]] = []
    for source, label, harm, lo, hi, n in [
        ("advbench", "harmful", 1.0, 0.3, 1.0, 120),
        ("authored/prompts_reframed", "harmful", 1.0, 0.1, 0.9, 80),
        ("authored/prompts_easy", "harmful", 1.0, 0.85, 1.0, 40),
        ("clinc150", "benign", 0.0, 0.0, 0.4, 100),
    ]:
        for i, s in enumerate(rng.uniform(lo, hi, n)):
            e = Example(text=f"{source} {i}", source=source, group=f"{source}-{i}", label=label, harm=harm)
            rows.append((e, s))
    curve = harm_calibration_curve([e for e, _ in rows], np.array([s for _, s in rows]))
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"harm_calibration_curve": curve}))
    return path, curve


def test_the_line_is_the_calibration_modules_line_and_the_kept_rows_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, curve = _metrics(tmp_path)
    limits = {"harmful_authored": 0.25, "harmful_public": 0.1}
    out_json = tmp_path / "lines.json"
    argv = [str(path), "--leave-out", "authored/prompts_easy", "--leave-out-if-present", "authored/not_there"]
    argv += ["--max-miss", "harmful_authored=1/4", "--max-miss", "harmful_public=0.1", "--json", str(out_json)]
    assert rule_line.main(argv) == 0
    want = highest_line_within(curve_without(curve, ["authored/prompts_easy"]), limits)
    assert want is not None
    res = json.loads(out_json.read_text())[str(path)]
    assert res["line"] == want and res["left_out"] == ["authored/prompts_easy"]
    authored = res["groups"]["harmful_authored"]
    assert authored["rows"] == 80 and authored["missed"] <= 80 / 4
    assert f"line {want:.2f}" in capsys.readouterr().out
    # A batch named "if present" that the curve has is left out just as --leave-out leaves it out.
    present = tmp_path / "present.json"
    argv = [str(path), "--leave-out-if-present", "authored/prompts_easy", "--json", str(present)]
    assert rule_line.main(argv + ["--max-miss", "harmful_authored=1/4", "--max-miss", "harmful_public=0.1"]) == 0
    assert json.loads(present.read_text())[str(path)]["line"] == want
    capsys.readouterr()
    # Counted with the easy batch the authored group misses less, so the same limit allows a line at least as high.
    assert rule_line.main([str(path), "--max-miss", "harmful_authored=1/4", "--max-miss", "harmful_public=0.1"]) == 0
    assert float(capsys.readouterr().out.split("line ")[1][:4]) >= want


def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = _metrics(tmp_path)
    assert rule_line.main([str(path), "--leave-out", "authored/typo", *LIMITS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "authored/typo" in err
    assert rule_line.main([str(path), "--max-miss", "harmful_other=0.1"]) == 2
    assert "harmful_other" in capsys.readouterr().err
    assert rule_line.main([str(path), "--max-miss", "lookalike=0.1"]) == 2  # a flag rate, not a miss rate
    assert "lookalike" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"harm_calibration_curve": ')
    assert rule_line.main([str(broken), *LIMITS]) == 2
    assert str(broken) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rule_line.main([str(path), "--max-miss", "harmful_public=1/0"])


@pytest.mark.parametrize("prefix", ["2.25.1", "2.25.1-r", "2.32.0", "2.32.0-r"])
def test_the_kept_candidates_lines_reproduce_from_their_metrics(prefix: str, tmp_path: Path) -> None:
    # These rules set the line without the identity batch; the judged config holds the line the run was scored at.
    metrics = CANDIDATES / f"{prefix}.metrics.json"
    out = tmp_path / "lines.json"
    argv = [str(metrics), "--leave-out", "authored/prompts_identity15", *LIMITS, "--json", str(out)]
    assert rule_line.main(argv) == 0
    res = json.loads(out.read_text())[str(metrics)]
    assert res["groups"]["harmful_authored"]["rows"] == 284 and res["groups"]["harmful_public"]["rows"] == 269
    config = json.loads((CANDIDATES / f"{prefix}.config.json").read_text())
    assert res["line"] == pytest.approx(config["thresholds"]["harm"])
