"""``guardproxy drills export|report|purge``: turn reviewed drills into a drill set, report refusal symptoms.

    guardproxy drills export [--store URL] [--config FILE] --out DIR [--reviewed]
    guardproxy drills report [--store URL] [--config FILE] --out DIR [--model DIR]
    guardproxy drills purge  [--store URL] [--config FILE]

``--store`` defaults to ``settings.drills.store`` (``GUARDPROXY_DRILLS__STORE``, or the ``--config`` file's), and purge
removes what is older than its ``drills.retention_days``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from guardproxy.drills.report import Embedder
from guardproxy.drills.store import DrillStore, StoredDrill, open_store, redact_url
from guardproxy.drills.store.sqlite import SqliteStore
from guardproxy.errors import ConfigError
from guardproxy.settings import load_settings


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = sub.add_parser("export", help="write prompts/responses/conversations.jsonl in the shared data formats")
    report = sub.add_parser("report", help="refusal concentration, reasons, false refusals, consistency (HTML+JSON)")
    purge = sub.add_parser("purge", help="delete drills older than drills.retention_days")
    for p in (export, report, purge):
        p.add_argument("--store", default=None, metavar="URL", help="sqlite:///path or postgresql://...")
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            metavar="FILE",
            help="the gateway's TOML config file (or GUARDPROXY_CONFIG_FILE): its drills.store, unless --store is "
            "given, and its drills.retention_days",
        )
    for p in (export, report):
        p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    export.add_argument("--reviewed", action="store_true", help="only drills with a review label")
    group = report.add_mutually_exclusive_group()
    group.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="embed with the guard model in DIR (default: character 3-gram hashing vectors)",
    )
    group.add_argument("--ngram", action="store_true", help="embed with character 3-gram hashing vectors (the default)")


def _open(url: str | None, config: Path | None = None, *, read_only: bool = False) -> DrillStore:
    """The store, open. It must exist: no file, schema or table is created on a typo. ``read_only`` (export,
    report): no writer, no migration; otherwise (purge) an older schema is migrated. ``config``: the settings file
    (else the environment's)."""
    settings = load_settings(config)
    url = url or settings.drills.store
    d = settings.drills
    store = open_store(url, queue_size=d.queue_size, retention_days=d.retention_days, read_only=read_only)
    if isinstance(store, SqliteStore) and not store.path.is_file():
        raise ConfigError(f"drill store {redact_url(url)}: no such database file")
    if not read_only:
        store.check_exists()
    store.open()
    return store


def _read(store: DrillStore, *, reviewed_only: bool = False) -> list[StoredDrill]:
    try:
        return asyncio.run(store.all_drills(reviewed_only=reviewed_only))
    finally:
        store.close()


def run(args: argparse.Namespace) -> int:
    if args.action == "export":
        return _export(args)
    if args.action == "report":
        return _report(args)
    store = _open(args.store, args.config)
    try:
        asyncio.run(store.purge())
    finally:
        store.close()
    # the store purges when it opens its connection too: count what both removed
    print(f"removed {store.retention_removed} drills older than {store.retention_days} days")
    return 0


def _export(args: argparse.Namespace) -> int:
    from guardproxy.drills.export import build_rows, write_rows

    drills = _read(_open(args.store, args.config, read_only=True), reviewed_only=args.reviewed)
    rows = build_rows(drills, reviewed_only=args.reviewed)
    counts = write_rows(rows, args.out)
    for name, n in counts.items():
        print(f"{args.out / name}: {n} rows")
    if rows.skipped:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(rows.skipped.items()))
        print(f"skipped: {skipped}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from guardproxy.drills.report import ReportInputs, build_report, ngram_embed, write_report

    drills = _read(_open(args.store, args.config, read_only=True))
    embed: Embedder = ngram_embed
    embed_prompts: Embedder | None = None
    kind = "ngram"
    if args.model is not None:
        (embed, embed_prompts), kind = _model_embedders(args.model), "model"
    report = build_report(ReportInputs(drills, embed, kind, embed_prompts))
    json_path, html_path = write_report(report, args.out)
    c = report["refusal_concentration"]["all"]
    print(f"{report['drills']} drills, {c['refusals']} refusals; written {json_path} and {html_path}")
    if c["refusals"]:
        print(f"top-3 refusal clusters cover {c['top3_share']:.0%}; {c['distinct_phrasings']} distinct phrasings")
    return 0


def _model_embedders(model_dir: Path) -> tuple[Embedder, Embedder]:
    """(raw, projected): refusal openings are compared in the raw pooled embedding, on which the report's refusal
    threshold was set (drills.report.REFUSAL_THRESHOLD); prompts, for inferred families, in the projected space
    rephrase similarity uses (guardproxy.embedding_projection), where unrelated requests no longer sit together.
    A model without a fitting projection gives the raw embedding for both."""
    from guardproxy import embedding_projection
    from guardproxy.classifier import MODEL_FILE, OnnxClassifier

    classifier = OnnxClassifier.load(model_dir, embedding_projection=False)
    projection = embedding_projection.load(model_dir, model_dir / MODEL_FILE, classifier.embedding_dim)

    def raw(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        vectors = []
        for start in range(0, len(texts), 64):
            vectors += [s.embedding for s in classifier.score_prompts_sync(texts[start : start + 64], exact=True)]
        if not vectors:
            return np.zeros((0, classifier.embedding_dim), dtype=np.float32)
        return np.stack(vectors).astype(np.float32)

    def projected(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        vectors = raw(texts)
        return vectors if projection is None or not len(vectors) else projection.apply(vectors)

    return raw, projected
