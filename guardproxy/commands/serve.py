"""``guardproxy serve``: run the gateway in front of an OpenAI-compatible upstream.

Flags override the environment (``GUARDPROXY_*``), which overrides the config file (``--config``).
"""

from __future__ import annotations

import argparse
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="URL", help="upstream base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8080)")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (or GUARDPROXY_CONFIG_FILE)")
    parser.add_argument("--policy", metavar="FILE", help="the active policy file (default policies/default.toml)")
    parser.add_argument("--store", metavar="URL", help="drill store: sqlite:///path or postgresql://...")
    parser.add_argument("--no-guard", action="store_true", help="no checks: a pure passthrough (for comparison)")
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the guardproxy and uvicorn loggers' level (default info, or GUARDPROXY_SERVER__LOG_LEVEL)",
    )


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Nested settings overrides from the flags that were given."""
    out: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            out.setdefault(section, {})[key] = value

    put("upstream", "base_url", args.upstream)
    put("server", "host", args.host)
    put("server", "port", args.port)
    put("server", "log_level", args.log_level)
    put("policy", "active", args.policy)
    put("drills", "store", args.store)
    if args.no_guard:
        put("guard", "enabled", False)
    return out


def run(args: argparse.Namespace) -> int:
    from guardproxy.server import run as run_server
    from guardproxy.settings import load_settings

    settings = load_settings(args.config, **overrides_from(args))
    return run_server(settings)
