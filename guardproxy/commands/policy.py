"""``guardproxy policy check FILE...`` and ``guardproxy policy compare [--log FILE...] [--json]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from guardproxy.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate policy files; every error with file, line and field")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument(
        "--mapping", action="store_true", help="the files are mapping files: check them and every policy they name"
    )
    cmp = sub.add_parser("compare", help="agreement between the active and each shadow policy, from the decision log")
    cmp.add_argument(
        "--log", type=Path, nargs="+", action="extend", metavar="FILE",
        help="JSONL decision log(s); give several (--log A --log B, or --log A B) to compare over the logs of several "
        "replicas together, each file read once (default: settings.policy.decision_log)",
    )  # fmt: skip
    cmp.add_argument(
        "--store", metavar="URL", help="compare over the drill store instead (sampled exchanges only: biased)"
    )
    cmp.add_argument("--config", type=Path, help="gateway config file (to find the decision log)")
    cmp.add_argument("--examples", type=int, default=5, help="example request ids per disagreement cell")
    cmp.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        return _check(args.files, mapping=args.mapping)
    return _compare(args)


def _check(files: list[Path], *, mapping: bool) -> int:
    from guardproxy.policy import check_policy_file
    from guardproxy.policyset import check_mapping_file

    failed = 0
    for path in files:
        if mapping:  # the mapping and every policy file it names: what serve would refuse to start on
            problems = check_mapping_file(path)
        else:
            problems = [str(issue) for issue in check_policy_file(path)]
        if problems:
            failed += 1
            for line in problems:
                print(line, file=sys.stderr)
        else:
            print(f"{path}: ok")
    if failed:
        print(f"{failed} of {len(files)} file(s) invalid", file=sys.stderr)
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from guardproxy.decisions import compare, read_log

    if args.store:
        report = compare(asyncio.run(_store_records(args.store)), examples=args.examples)
        print("# over sampled drills: blocked and flagged exchanges are over-represented", file=sys.stderr)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
        return 0
    paths: list[Path] = list(dict.fromkeys(args.log or ()))  # a file named twice is read once
    if not paths:
        from guardproxy.settings import load_settings

        log_path = load_settings(args.config).policy.decision_log
        if log_path is None:
            raise ConfigError("no decision log: pass --log FILE or set GUARDPROXY_POLICY__DECISION_LOG")
        paths = [log_path]
    for path in paths:  # every file checked before any is read
        if not path.is_file():
            raise ConfigError("decision log not found", where=str(path))
    # exchange ids are random (uuid4), so the records of several replicas' logs never merge into one exchange
    report = compare((rec for path in paths for rec in read_log(path)), examples=args.examples)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    return 0


async def _store_records(url: str) -> list[dict[str, Any]]:
    """Decision records from the drill store: each drill holds the active and shadow decisions of one exchange."""
    from guardproxy.drills.store import open_store

    store = open_store(url, read_only=True)
    await store.start()
    try:
        drills = await store.all_drills()
    finally:
        await store.aclose()
    out: list[dict[str, Any]] = []
    for drill in drills:
        rec = drill.record
        # one drill, one exchange; a request the active policy blocked at input got no reply, so every decision in
        # it is an input decision (compare counts such a shadow's as input-only)
        ids = {"request_id": rec.request_id, "exchange_id": rec.id}
        stage = "input" if rec.reply_from_policy else "exchange"
        for role, decision in [("active", rec.active), *(("shadow", d) for d in rec.shadows)]:
            out.append({**ids, "role": role, "stage": stage, **decision.as_dict()})
    return out
