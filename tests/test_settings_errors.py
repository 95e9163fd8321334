"""A config file that is not TOML, or settings that fail validation: one line per problem, naming the file and
line of each value the file set and the variable of each value the environment set; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardproxy.errors import ConfigError
from guardproxy.settings import InvalidSettings, load_settings

INVALID = """# gateway settings
[server]
port = "eighty"

[limits]
max_n = 0
max_messages = 10

[upstream]
transport = "curl"
"""


def _gp(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed entry point, as a person runs it (no GUARDPROXY_* of ours leaks in)."""
    exe = Path(sys.executable).with_name("guardproxy")
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("GUARDPROXY_")}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, cwd=cwd, env={**base, **(env or {})}, check=False
    )


@pytest.fixture(autouse=True)
def _no_guardproxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("GUARDPROXY_"):
            monkeypatch.delenv(key)


# --- a file that is not TOML -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_a_toml_syntax_error_is_one_line_at_its_line(how: str, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[server]\nport = 9000\n\n[limits\nmax_n = 3\n", encoding="utf-8")
    if how == "flag":
        proc = _gp("serve", "--config", "bad.toml", cwd=tmp_path)
    else:
        proc = _gp("serve", cwd=tmp_path, env={"GUARDPROXY_CONFIG_FILE": "bad.toml"})
    assert proc.returncode == 2
    assert proc.stderr == (
        "guardproxy serve: error: bad.toml:4: TOML syntax error: Expected ']' at the end of a table declaration "
        "(column 8)\n"
    )


def test_a_toml_error_at_the_end_of_the_file_names_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.toml"
    path.write_text("[server]\nport =", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value) == f"{path}:2: TOML syntax error: Invalid value (at the end of the file)"


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "latin1.toml").write_bytes('[server]\nhost = "caf\xe9"\n'.encode("latin-1"))
    proc = _gp("serve", "--config", "latin1.toml", cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("guardproxy serve: error: latin1.toml: cannot read file: not UTF-8: ")


# --- values that fail validation -------------------------------------------------------------------------------


def test_every_invalid_value_in_the_file_is_listed_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gp.toml"
    path.write_text(INVALID, encoding="utf-8")
    with pytest.raises(InvalidSettings) as err:
        load_settings(path)
    assert sorted(err.value.issues) == [
        f"{path}:10: upstream.transport: Input should be 'aiohttp' or 'httpx'",
        f"{path}:3: server.port: Input should be a valid integer, unable to parse string as an integer",
        f"{path}:6: limits.max_n: Input should be greater than or equal to 1",
    ]
    assert err.value.where == str(path)


def test_a_value_from_the_environment_names_its_variable_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gp.toml"
    path.write_text(INVALID, encoding="utf-8")
    monkeypatch.setenv("GUARDPROXY_SERVER__PORT", "9000")  # a good value over the file's bad one
    monkeypatch.setenv("GUARDPROXY_LIMITS__MAX_MESSAGES", "0")  # a bad value over the file's good one
    monkeypatch.setenv("GUARDPROXY_STATE", '{"ttl_seconds": "a day"}')  # a table as JSON
    monkeypatch.setenv("GUARDPROXY_SERVER__LOG_LEVEL", "LOUD")
    with pytest.raises(InvalidSettings) as err:
        load_settings(path)
    assert set(err.value.issues) == {
        "GUARDPROXY_SERVER__LOG_LEVEL: Input should be 'critical', 'error', 'warning', 'info', 'debug' or 'trace'",
        f"{path}:10: upstream.transport: Input should be 'aiohttp' or 'httpx'",
        f"{path}:6: limits.max_n: Input should be greater than or equal to 1",
        "GUARDPROXY_LIMITS__MAX_MESSAGES: Input should be greater than or equal to 1",
        "GUARDPROXY_STATE: Input should be a valid integer, unable to parse string as an integer",
    }


def test_an_unknown_table_in_the_file_is_listed_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gp.toml"
    path.write_text('[server]\nport = 9000\n\n[upstreams]\nbase_url = "http://x/v1"\n', encoding="utf-8")
    with pytest.raises(InvalidSettings) as err:
        load_settings(path)
    assert err.value.issues == (f"{path}:4: upstreams: unknown field",)


def test_every_problem_through_the_entry_point_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "gp.toml").write_text(INVALID, encoding="utf-8")
    proc = _gp("serve", "--config", "gp.toml", cwd=tmp_path, env={"GUARDPROXY_LIMITS__MAX_MESSAGES": "0"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    prefix = "guardproxy serve: error: "
    assert all(line.startswith(prefix) for line in lines)  # each problem its own prefixed line
    assert sorted(line.removeprefix(prefix) for line in lines) == [
        "GUARDPROXY_LIMITS__MAX_MESSAGES: Input should be greater than or equal to 1",
        "gp.toml:10: upstream.transport: Input should be 'aiohttp' or 'httpx'",
        "gp.toml:3: server.port: Input should be a valid integer, unable to parse string as an integer",
        "gp.toml:6: limits.max_n: Input should be greater than or equal to 1",
    ]


def test_without_a_file_every_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_LIMITS__MAX_N", "abc")
    monkeypatch.setenv("GUARDPROXY_GUARD__THREADS", "0")
    with pytest.raises(InvalidSettings) as err:
        load_settings()
    assert err.value.issues == (
        "GUARDPROXY_LIMITS__MAX_N: Input should be a valid integer, unable to parse string as an integer",
        "GUARDPROXY_GUARD__THREADS: Input should be greater than or equal to 1",
    )


def test_the_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_SERVER__LOG_LEVEL", "WARNING")
    assert load_settings().server.log_level == "warning"


def test_a_misspelled_key_in_a_table_is_an_error_not_a_silent_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("[server]\nport = 9000\nprot = 9001\n", encoding="utf-8")
    with pytest.raises(InvalidSettings) as raised:
        load_settings(config)
    assert raised.value.issues == (f"{config}:3: server.prot: unknown field",)
    monkeypatch.setenv("GUARDPROXY_LIMITS__MAX_TOKEN_CAP", "5")  # the setting is max_tokens_cap
    with pytest.raises(InvalidSettings) as raised:
        load_settings()
    assert raised.value.issues == ("GUARDPROXY_LIMITS__MAX_TOKEN_CAP: unknown field",)


def test_credentials_in_the_upstream_url_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_UPSTREAM__BASE_URL", "http://user:secret@127.0.0.1:8000/v1")
    with pytest.raises(InvalidSettings) as raised:
        load_settings()
    (issue,) = raised.value.issues
    assert issue.startswith("GUARDPROXY_UPSTREAM__BASE_URL: ") and "upstream.api_key" in issue
    assert "secret" not in issue  # the value is never echoed
    monkeypatch.setenv("GUARDPROXY_UPSTREAM__BASE_URL", "http://127.0.0.1:8000/v1?x=a@b")  # an @ past the host is fine
    assert load_settings().upstream.base_url.endswith("x=a@b")


def test_a_bad_drill_store_url_is_named_at_its_line_without_its_password(tmp_path: Path) -> None:
    # An operator walkthrough: a misspelled scheme was reported only once the model had loaded, with no file line.
    path = tmp_path / "gp.toml"
    path.write_text(
        '[server]\nport = 8080\n\n[drills]\nstore = "postgresq://walker:hunter2@db/guard"\n', encoding="utf-8"
    )
    with pytest.raises(InvalidSettings) as err:
        load_settings(path)
    assert list(err.value.issues) == [f"{path}:5: drills.store: expected sqlite:///path or postgresql://user@host/db"]
    assert "hunter2" not in str(err.value)
    for good in ("sqlite:///guardproxy-drills.db", "sqlite:////var/lib/gp/d.db", "postgresql://u@h/db?schema=s"):
        path.write_text(f'[drills]\nstore = "{good}"\n', encoding="utf-8")
        assert load_settings(path).drills.store == good


def test_a_bad_value_in_the_file_is_an_error_even_where_a_flag_overrides_it(tmp_path: Path) -> None:
    # An operator walkthrough: `port = "abc"` with --port started fine, and failed only once the flag was dropped.
    path = tmp_path / "gp.toml"
    path.write_text('[server]\nport = "abc"\n', encoding="utf-8")
    with pytest.raises(InvalidSettings) as err:
        load_settings(path, server={"port": 9000})
    assert [i.split(": ")[0] for i in err.value.issues] == [f"{path}:2"]
    path.write_text("[server]\nport = 8081\n", encoding="utf-8")
    assert load_settings(path, server={"port": 9000}).server.port == 9000  # a good file: the flag wins
