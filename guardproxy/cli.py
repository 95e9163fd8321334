"""Command line: ``guardproxy <command>``.

Each command lives in ``guardproxy.commands.<name>`` with ``configure(parser)`` and ``run(args) -> int``,
imported only when that command runs (``serve`` never imports torch or matplotlib).
"""

from __future__ import annotations

import argparse
import importlib
import logging
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
    except OSError as exc:
        # A file that cannot be opened, outside our own errors: one line naming it; anything else is a bug and keeps
        # its traceback. (Settings that do not parse are already a ConfigError: guardproxy.settings.load_settings.)
        message = file_problem(exc)
        if message is None:
            raise
        print(f"guardproxy {name}: error: {message}", file=sys.stderr)
        return 2


def file_problem(exc: BaseException) -> str | None:
    """``FILE: reason`` for an operating-system error on a named file (missing, a directory, not permitted)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())
