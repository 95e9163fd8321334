"""Command line: ``guardproxy <command>``.

Each command lives in ``guardproxy.commands.<name>`` with ``configure(parser)`` and ``run(args) -> int``,
imported only when that command runs (``serve`` never imports torch or matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from guardproxy import __version__
from guardproxy.errors import GuardProxyError

# name -> (module under guardproxy.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "run the gateway in front of an OpenAI-compatible upstream"),
    "demo": ("demo", "run the gateway against a built-in fake upstream and send it a few requests"),
    "classify": ("classify", "score one prompt (or a prompt and a reply) and print a verdict"),
    "score": ("score", "score a JSONL file: one JSON line per row to stdout"),
    "eval": ("evaluate", "metrics for labelled JSONL files, beside the keyword baselines"),
    "train": ("train", "train the guard model (needs the 'train' extra)"),
    "policy": ("policy", "check policy files, compare active and shadow decisions"),
    "drills": ("drills", "export reviewed drills, write the drill report"),
    "bench": ("bench", "benchmark the gateway's added latency and throughput"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardproxy", description="A refusal guard for OpenAI-compatible chat APIs.")
    parser.add_argument("--version", action="version", version=f"guardproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage, or the error for an unknown command
        return 2
    name = argv[0]
    module = importlib.import_module(f"guardproxy.commands.{COMMANDS[name][0]}")
    cmd_parser = argparse.ArgumentParser(prog=f"guardproxy {name}", description=COMMANDS[name][1])
    module.configure(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from guardproxy.logs import install_redaction

    install_redaction()
    try:
        return int(module.run(args))
    except GuardProxyError as exc:
        # one line per problem, each with the prefix (invalid settings list several)
        for line in str(exc).splitlines() or [""]:
            print(f"guardproxy {name}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Bad input that surfaced outside our own errors: settings from the environment that do not parse, a file
        # that cannot be opened. One line naming what to fix; anything else is a bug and keeps its traceback.
        message = settings_problem(exc) or file_problem(exc)
        if message is None:
            raise
        print(f"guardproxy {name}: error: {message}", file=sys.stderr)
        return 2


ENV_PREFIX = "GUARDPROXY_"


def settings_problem(exc: BaseException) -> str | None:
    """One line for a settings failure that ``load_settings`` lets through: ``VARIABLE: problem`` (values are not
    echoed: some settings are secrets); None when ``exc`` is no such failure. A config file's own mistakes are
    already a ``ConfigError`` naming the file."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, SettingsError):
        return _unparsable_env(exc)
    if isinstance(exc, ValidationError) and exc.title in ("Settings", "FileSettings"):
        err = exc.errors(include_url=False)[0]
        loc = [str(p) for p in err["loc"]]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{_env_name(loc) or 'setting ' + '.'.join(loc)}: {err['msg']}{more}"
    return None


def _env_name(loc: Sequence[str]) -> str | None:
    """The environment variable that set the field at ``loc`` (the longest prefix that is set), as spelled."""
    names = {key.upper(): key for key in os.environ if key.upper().startswith(ENV_PREFIX)}
    for end in range(len(loc), 0, -1):
        name = names.get(ENV_PREFIX + "__".join(loc[:end]).upper())
        if name is not None:
            return name
    return None


def _unparsable_env(exc: Exception) -> str:
    """Which ``GUARDPROXY_*`` variable pydantic_settings could not parse (it names only the top-level field): each
    candidate is parsed alone, as the environment source does."""
    import json
    import re

    from pydantic_settings import EnvSettingsSource

    from guardproxy.settings import Settings

    m = re.search(r'field "([^"]+)"', str(exc))
    field = f"{ENV_PREFIX}{m.group(1).upper() if m else ''}"
    culprits = []
    for key in os.environ:
        if m is None or (key.upper() != field and not key.upper().startswith(field + "__")):
            continue
        source = EnvSettingsSource(Settings)
        source.env_vars = {k: v for k, v in source.env_vars.items() if k.upper() == key.upper()}
        try:
            source()
        except Exception:
            culprits.append(key)
    where = culprits[0] if len(culprits) == 1 else f"{field}*"
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        return (
            f"{where}: not valid JSON ({cause.msg} at column {cause.colno}); list and table settings are written as "
            """JSON, e.g. '["a.toml", "b.toml"]' or '{"key": "value"}'"""
        )
    return f"{where}: cannot parse the value" + (f": {cause}" if cause is not None else "")


def file_problem(exc: BaseException) -> str | None:
    """``FILE: reason`` for an operating-system error on a named file (missing, a directory, not permitted)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
