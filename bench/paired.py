"""What the paired-form probes share (``bench.end_punctuation``, ``bench.frames``): each scores every labelled prompt
in several forms, from the same command line, and writes paths the same way on every machine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.word_deletion import ENGLISH_SETS, labelled_prompts
from guardproxy.classifier import OnnxClassifier
from guardproxy.settings import PROJECT_ROOT

Probe = Callable[[OnnxClassifier, Sequence[dict[str, Any]]], list[dict[str, Any]]]


@dataclass
class Run:
    args: argparse.Namespace
    files: list[Path]
    results: list[dict[str, Any]]


def shown(path: Path) -> str:
    """``path`` relative to the project when it lies inside it (so the JSON reads the same on every machine)."""
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def run(prog: str, description: str, argv: Sequence[str] | None, probe: Probe) -> Run | int:
    """Parse ``[FILE ...] [--model DIR] [--json OUT]``, read the labelled rows (default: the seven English sets) and
    score them with ``probe``; 2 after a one-line error naming the file and line of a bad row."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("files", nargs="*", type=Path, help="labelled prompt files (default: the seven English sets)")
    ap.add_argument("--model", type=Path, default=PROJECT_ROOT / "models" / "guard-v1")
    ap.add_argument("--json", type=Path, help="write the summary and every row's scores here")
    args = ap.parse_args(argv)
    files = list(args.files or ENGLISH_SETS)
    try:
        rows = labelled_prompts(files)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with OnnxClassifier.load(args.model, threads=1) as model:
        return Run(args, files, probe(model, rows))


def write_json(run: Run, summary: dict[str, Any], **extra: Any) -> None:
    """``run.args.json`` (when given): the model and files as ``shown``, ``extra``, the summary, and every row by id
    with its scores in each form (rounded; without its text, which is in the set files)."""
    if run.args.json is None:
        return
    rows = [
        {"id": r["id"], "harmful": r["harmful"], **{k: round(v, 4) for k, v in r["scores"].items()}}
        for r in run.results
    ]
    doc = {"model": shown(run.args.model), "files": [shown(f) for f in run.files], **extra, "summary": summary}
    run.args.json.write_text(json.dumps({**doc, "rows": rows}) + "\n")
