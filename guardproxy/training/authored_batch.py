"""What the scripts that write authored batches share (``guardproxy/training/authored/make_*.py``): one row in the
prompts format of ``authored/README.md``, and the JSONL file the trainer reads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def prompt_row(
    batch: str, n: int, text: str, label: str, category: str | None, family: str, style: str, kind: str | None
) -> dict[str, object]:
    """Row ``n`` (1-based) of batch ``batch`` (its id is ``gp-<batch>-<n>``); ``kind`` is left out when None."""
    row: dict[str, object] = {
        "id": f"gp-{batch}-{n}",
        "prompt": text,
        "label": label,
        "category": category,
        "family": family,
        "style": style,
        "source": "guardproxy-authored",
        "license": "Apache-2.0",
    }
    if kind is not None:
        row["kind"] = kind
    return row


def write_rows(path: Path, rows: Iterable[dict[str, object]]) -> None:
    """``rows`` as JSONL at ``path`` (UTF-8, non-ASCII kept as written), then a line saying so."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
