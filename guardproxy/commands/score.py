"""``guardproxy score FILE.jsonl``: one JSON line per input row on stdout, the machine contract of issue 3.

Rows stream through in chunks (nothing holds the whole file). A row that cannot be scored still gets its line,
``{"id", "line", "error"}``, so a consumer sees every id; the problem also goes to stderr as ``file:line:
message`` and the command exits 1 at the end. Progress goes to stderr only when it is a terminal or with
``--progress``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from guardproxy.classifier import OnnxClassifier
from guardproxy.errors import ConfigError
from guardproxy.policy import Policy, load_policy
from guardproxy.scoring import ParsedRow, Progress, RowError, RowScorer, error_row, parse_row, read_jsonl
from guardproxy.settings import load_settings

CHUNK_ROWS = 64


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: guard.model_dir)")
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="policy file; a relative path is read from the current directory, or where there is no such file, "
        "from the guardproxy project root, as the default policies/default.toml is (default: policy.active)",
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: guard.threads)")
    parser.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score as a gateway with guard.early_exit does: clearly harmless turns from the model's first layers "
        "(default: on only where guard.early_exit is true; its default, auto, reads as off here)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="JSONL file of prompt, response or conversation rows; - reads stdin")
    add_model_options(parser)
    parser.add_argument("--progress", action="store_true", help="draw progress on stderr even when not a terminal")


def load_model_and_policy(args: argparse.Namespace) -> tuple[OnnxClassifier, Policy]:
    """``load_model`` with ``add_model_options``' flags."""
    return load_model(model=args.model, policy=args.policy, threads=args.threads, early_exit=args.early_exit)


def load_model(
    *,
    model: str | Path | None = None,
    policy: str | Path | None = None,
    threads: int | None = None,
    early_exit: bool | None = None,
) -> tuple[OnnxClassifier, Policy]:
    """The guard model and a policy as the scoring commands load them; None takes the setting. Early exit only
    where ``early_exit`` or ``guard.early_exit`` is true: ``auto``, the gateway's default, reads as off here, so
    scores are the whole model's unless asked."""
    settings = load_settings()
    policy_ = load_policy(policy or settings.policy.active)
    exits = (settings.guard.early_exit is True) if early_exit is None else early_exit
    classifier = OnnxClassifier.load(
        model or settings.guard.model_dir,
        threads=threads or settings.guard.threads,
        cache_size=settings.guard.cache_size,
        early_exit=exits,
        exit_cache=settings.guard.early_exit_cache,
    )
    if classifier.early_exit is not None:
        from guardproxy.guard import below_exit_lines

        if below := below_exit_lines(classifier.early_exit, policy_):
            # as a gateway scores a request under this policy: the whole model
            print(
                f"{policy_.source or policy_.ref}: reads {'; '.join(below)}, the early-exit head's lines: "
                "scoring with the whole model",
                file=sys.stderr,
            )
            classifier.drop_early_exit()
    return classifier, policy_


def row_scorer(classifier: OnnxClassifier, policy: Policy) -> RowScorer:
    """The scorer the CLI commands share: conversation windows read as the gateway's settings say."""
    return RowScorer(classifier, policy, window_max_ids=load_settings().guard.window_max_ids)


def open_input(path: Path) -> BinaryIO:
    """``path`` opened for reading; a file that cannot be opened is a ``ConfigError`` naming it."""
    try:
        return path.open("rb")
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", where=str(path)) from exc


def run(args: argparse.Namespace) -> int:
    if args.file == "-":
        stream, name, size = sys.stdin.buffer, "<stdin>", None
    else:
        path = Path(args.file)
        stream = open_input(path)  # before the model loads: a wrong name fails at once
        name, size = str(path), os.fstat(stream.fileno()).st_size
    try:
        classifier, policy = load_model_and_policy(args)
        try:
            with row_scorer(classifier, policy) as scorer:
                return score_stream(stream, name, size, scorer, sys.stdout, args)
        finally:
            classifier.close()
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def chunks(
    stream: Iterable[bytes], name: str, size: int = CHUNK_ROWS
) -> Iterator[list[tuple[int, ParsedRow | dict[str, Any]]]]:
    """Parsed rows (or their error rows) in chunks of ``size``."""
    chunk: list[tuple[int, ParsedRow | dict[str, Any]]] = []
    for line, obj in read_jsonl(stream):
        if isinstance(obj, RowError):
            chunk.append((line, error_row(name, line, None, str(obj))))
        else:
            try:
                chunk.append((line, parse_row(line, obj)))
            except RowError as exc:
                chunk.append((line, error_row(name, line, obj, str(exc))))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Counting:
    """Wraps a binary stream to count the bytes read, for the progress bar."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self.stream:
            self.count += len(line)
            yield line


def score_stream(
    stream: BinaryIO, name: str, total: int | None, scorer: RowScorer, out: IO[str], args: argparse.Namespace
) -> int:
    progress = Progress("score", total, enabled=bool(getattr(args, "progress", False)) or sys.stderr.isatty())
    counting = _Counting(stream)
    errors = 0
    seen = 0
    for chunk in chunks(counting, name):
        good = [row for _line, row in chunk if isinstance(row, ParsedRow)]
        scored = iter(scorer.score(good))
        for _line, row in chunk:
            if isinstance(row, ParsedRow):
                result = next(scored)
            else:
                result = row
                errors += 1
                print(f"guardproxy score: {row['error']}", file=sys.stderr)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        progress.update(len(chunk), counting.count - seen)
        seen = counting.count
    progress.close()
    if errors:
        print(f"guardproxy score: {errors} row(s) could not be scored", file=sys.stderr)
    return 1 if errors else 0
