"""Bad input to the CLI: one line naming the file (and line) or the variable, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guardproxy.cli import main
from guardproxy.policy import check_policy_file, load_policy
from guardproxy.policyset import PolicySet
from guardproxy.settings import PROJECT_ROOT, Settings

MODEL_DIR = Settings().guard.model_dir

POLICY = """schema_version = 1
name = "{name}"
version = "1"
harm_threshold = {harm_threshold}
on_classifier_failure = "fail_open"
on_state_failure = "fail_open"
flag_header = {flag_header}

[refusals]
default = "This request was declined by the test policy because it could cause harm; ask for a safer version."

[[input_rules]]
id = "jailbreak"
action = "block"
status_code = {status_code}
when = {{ jailbreak_at_least = {jailbreak} }}
"""


def _policy(**values: str) -> str:
    fields = {"name": "cwd-policy", "harm_threshold": "0.5", "flag_header": "false", "status_code": "400"}
    return POLICY.format(**{**fields, "jailbreak": "0.5", **values})


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if " INFO " not in ln]


def _gp(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as a person runs it."""
    exe = Path(sys.executable).with_name("guardproxy")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, check=False
    )


# --- 1. an input file that cannot be opened ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["score", "eval"])
def test_a_missing_input_file_is_one_line_naming_it(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nofile.jsonl"
    assert main([command, str(missing), "--model", str(MODEL_DIR)]) == 2
    assert _err_lines(capsys) == [
        f"guardproxy {command}: error: {missing}: cannot read file: No such file or directory"
    ]


def test_a_directory_as_input_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", str(tmp_path), "--model", str(MODEL_DIR)]) == 2
    assert _err_lines(capsys) == [f"guardproxy score: error: {tmp_path}: cannot read file: Is a directory"]


def test_a_missing_relative_input_file_through_the_entry_point(tmp_path: Path) -> None:
    proc = _gp("score", "nofile.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "guardproxy score: error: nofile.jsonl: cannot read file: No such file or directory\n"
    assert proc.stdout == ""


# --- 2. environment settings that do not parse -----------------------------------------------------------------


def test_an_unparsable_list_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GUARDPROXY_POLICY__SHADOWS", "pol/ok.toml")  # not a JSON list
    monkeypatch.setenv("GUARDPROXY_POLICY__ACTIVE", str(PROJECT_ROOT / "policies" / "strict.toml"))  # fine as it is
    assert main(["classify", "hi", "--model", str(MODEL_DIR)]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("guardproxy classify: error: GUARDPROXY_POLICY__SHADOWS: not valid JSON (")
    assert "written as JSON" in line


def test_an_unparsable_table_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GUARDPROXY_LIMITS", "{max_n: 3")
    assert main(["classify", "hi", "--model", str(MODEL_DIR)]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("guardproxy classify: error: GUARDPROXY_LIMITS: not valid JSON (")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GUARDPROXY_LIMITS__MAX_N": "abc"}, "GUARDPROXY_LIMITS__MAX_N: Input should be a valid integer"),
        ({"GUARDPROXY_GUARD__THREADS": "0"}, "GUARDPROXY_GUARD__THREADS: Input should be greater than or equal to 1"),
        ({"GUARDPROXY_LIMITS": '{"max_n": "abc"}'}, "GUARDPROXY_LIMITS: Input should be a valid integer"),
    ],
)
def test_a_bad_setting_value_names_its_variable(
    env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["classify", "hi", "--model", str(MODEL_DIR)]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith(f"guardproxy classify: error: {expected}"), line


def test_bad_settings_through_the_entry_point_are_one_line_without_traceback(tmp_path: Path) -> None:
    for env in ({"GUARDPROXY_POLICY__SHADOWS": "pol/ok.toml"}, {"GUARDPROXY_LIMITS__MAX_N": "abc"}):
        proc = _gp("classify", "hi", cwd=tmp_path, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"guardproxy classify: error: {next(iter(env))}: ")


# --- 3. relative policy paths: the current directory, then the project root ------------------------------------


def test_a_relative_policy_path_works_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["classify", "hi", "--policy", "policies/strict.toml", "--model", str(MODEL_DIR)]) == 0
    strict = load_policy(PROJECT_ROOT / "policies" / "strict.toml")
    assert f"under {strict.ref}" in capsys.readouterr().out
    assert main(["policy", "check", "policies/strict.toml"]) == 0
    assert capsys.readouterr().out == "policies/strict.toml: ok\n"
    assert PolicySet(Path("policies/strict.toml")).default.ref == strict.ref  # as the gateway reads policy.active


def test_a_relative_policy_path_reads_the_current_directory_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "strict.toml").write_text(_policy(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_policy("policies/strict.toml").name == "cwd-policy"
    assert load_policy(Path("policies/strict.toml")).source == (tmp_path / "policies" / "strict.toml").resolve()


def test_a_policy_file_that_cannot_be_read_has_no_made_up_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "check", "nope.toml", str(tmp_path)]) == 1
    assert _err_lines(capsys) == [
        f"nope.toml: cannot read file: No such file or directory (nor under {PROJECT_ROOT})",
        f"{tmp_path}: cannot read file: Is a directory",
        "2 of 2 file(s) invalid",
    ]
    assert main(["classify", "hi", "--policy", "nope.toml", "--model", str(MODEL_DIR)]) == 2
    assert _err_lines(capsys) == [
        f"guardproxy classify: error: nope.toml: cannot read file: No such file or directory (nor under {PROJECT_ROOT})"
    ]


def test_a_policy_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    (issue,) = check_policy_file(path)
    assert str(issue) == f"{path}: cannot read file: not UTF-8: invalid continuation byte at byte 11"


def test_the_installed_entry_point_finds_a_relative_policy_from_elsewhere(tmp_path: Path) -> None:
    shutil.copy(PROJECT_ROOT / "policies" / "monitor.toml", tmp_path / "mine.toml")
    proc = _gp("policy", "check", "mine.toml", "policies/strict.toml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "mine.toml: ok\npolicies/strict.toml: ok\n"


# --- 4. invalid JSON rows: the message says "at" once ------------------------------------------------------------


def test_an_invalid_json_row_reads_once_at(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "x", "prompt": "a\tb"}\n', encoding="utf-8")  # a raw tab inside a JSON string
    assert main(["score", str(path), "--model", str(MODEL_DIR)]) == 1
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["error"] == f"{path}:1: invalid JSON: Invalid control character at column 25"


# --- 5. policy values of the wrong type are refused, not converted -------------------------------------------


@pytest.mark.parametrize(
    ("values", "line", "field", "message"),
    [
        ({"jailbreak": '"0.5"'}, 16, "input_rules[0].when.jailbreak_at_least", "Input should be a valid number"),
        ({"harm_threshold": '"0.5"'}, 4, "harm_threshold", "Input should be a valid number"),
        ({"jailbreak": "true"}, 16, "input_rules[0].when.jailbreak_at_least", "Input should be a valid number"),
        ({"flag_header": '"true"'}, 7, "flag_header", "Input should be a valid boolean"),
        ({"status_code": '"403"'}, 15, "input_rules[0].status_code", "Input should be a valid integer"),
    ],
)
def test_policy_check_refuses_a_string_or_boolean_where_a_number_is_required(
    values: dict[str, str],
    line: int,
    field: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "typed.toml"
    path.write_text(_policy(**values), encoding="utf-8")
    assert main(["policy", "check", str(path)]) == 1
    first, last = _err_lines(capsys)
    assert first.startswith(f"{path}:{line}: {field}: {message}"), first
    assert last == "1 of 1 file(s) invalid"


def test_policy_numbers_written_as_numbers_still_load(tmp_path: Path) -> None:
    path = tmp_path / "typed.toml"
    path.write_text(_policy(jailbreak="1", harm_threshold="0.5", flag_header="true"), encoding="utf-8")
    policy = load_policy(path)
    assert policy.input_rules[0].when.jailbreak_at_least == 1.0 and policy.flag_header is True


# --- 6. a policy with several problems: serve lists every one, not "and N more" ----------------------------------


def test_serve_on_a_broken_policy_prints_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "two.toml"
    text = _policy(harm_threshold="1.5").replace('id = "jailbreak"', 'id = "Jailbreak"')
    path.write_text(text, encoding="utf-8")
    proc = _gp("serve", "--policy", str(path), "--port", "0", "--store", f"sqlite:///{tmp_path / 'd.db'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if " INFO " not in ln]
    assert [ln.split(": ", 3)[2] for ln in lines] == [f"{path}:4", f"{path}:13"], lines
    assert all(ln.startswith("guardproxy serve: error: ") for ln in lines)
    assert "more)" not in proc.stderr
