"""What normalize's spelled-letter, braille and upside-down readings cost: harmless prompts changed, and time.

``python -m bench.normalize_variants --data ../shared/data [--before FILE]`` compares ``normalize`` with the one
in FILE (default: ``git show HEAD:guardproxy/normalize.py``) on every ``benign`` and ``borderline_benign`` prompt,
prints how many change and a few of them, and times both on a 1 MB text.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

from guardproxy.normalize import normalize

HARMLESS = {"benign", "borderline_benign"}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("normalize_before", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--before", type=Path)
    parser.add_argument("--no-time", action="store_true")
    args = parser.parse_args()
    before_path = args.before
    if before_path is None:
        source = subprocess.run(
            ["git", "show", "HEAD:guardproxy/normalize.py"], check=True, capture_output=True, text=True
        ).stdout
        before_path = Path(tempfile.mkdtemp()) / "normalize_before.py"
        before_path.write_text(source)
    before = _load(before_path).normalize

    total, per_source, changed = 0, Counter(), []
    for path in sorted((args.data / "prompts").glob("*.jsonl")):
        for line in path.read_text().split("\n"):
            if not line:
                continue
            row = json.loads(line)
            if row.get("label") not in HARMLESS or not isinstance(row.get("prompt"), str):
                continue
            total += 1
            per_source[path.stem] += 1
            old, new = before(row["prompt"]), normalize(row["prompt"])
            if old != new:
                changed.append((path.stem, old, new))
    print(f"harmless prompts: {total} ({dict(per_source)})")
    print(f"changed by the new normalize: {len(changed)}")
    for source, old, new in changed:
        at = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        print(f"  [{source}] {old[max(0, at - 30) : at + 40]!r} -> {new[max(0, at - 30) : at + 40]!r}")

    text = " ".join(
        json.loads(line)["prompt"] for line in (args.data / "prompts" / "phtest.jsonl").read_text().split("\n") if line
    )
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    if args.no_time:
        return
    for name, fn in (("before", before), ("after", normalize)):
        best = min(_timed(fn, text) for _ in range(3))
        print(f"normalize 1 MB ({name}): {best:.2f} s")


def _timed(fn: object, text: str) -> float:
    start = time.perf_counter()
    fn(text)  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
