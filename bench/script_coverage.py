"""What the guard model can read: held-out prompts split by the share of their letters it cannot read.

    .venv/bin/python -m bench.script_coverage [--model DIR ...] [FILE ...] [--json OUT]

The shipped model's English WordPiece vocabulary spells Latin-script words in pieces and every other script letter
by letter (or as ``[UNK]``). Each prompt score carries ``unreadable``, the share of its letters in such scripts
(``guardproxy.encoding.unreadable_share``). This splits labelled prompt rows at ``unreadable`` 0.5 and reports, per
model and per side: rows, harm AUROC, and the share of harmful and of harmless rows the default policy does not
allow. Without FILEs: the three multilingual held-out sets (challenge4, 9, 10). Rows also get a per-language line
where the file has a ``language`` field.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from guardproxy.classifier import OnnxClassifier
from guardproxy.evaluation import NEGATIVE_LABELS, auroc
from guardproxy.policy import Action, load_policy
from guardproxy.settings import DEFAULT_POLICY, PROJECT_ROOT
from guardproxy.signals import UNREADABLE, Signals

DEFAULT_SETS = [PROJECT_ROOT / "bench" / f"challenge{n}" / f"harm_challenge{n}.jsonl" for n in (4, 9, 10)]
CUT = UNREADABLE  # unreadable at or above this: the side the model cannot read


def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SystemExit(f"{path}:{n}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise SystemExit(f"{path}:{n}: not a JSON object")
            if row.get("prompt") and row.get("label") in ("harmful", *NEGATIVE_LABELS):
                rows.append(row)
            elif "prompt" not in row:
                raise SystemExit(f"{path}:{n}: not a prompt row")
    return rows


def group_metrics(labels: list[bool], harm: list[float], flagged: list[bool]) -> dict[str, Any]:
    y, f = np.array(labels, dtype=bool), np.array(flagged, dtype=bool)
    both = y.any() and (~y).any()
    return {
        "harmful": int(y.sum()),
        "harmless": int((~y).sum()),
        "auroc": round(auroc(y, harm), 4) if both else None,
        "harmful_flagged": round(float(f[y].mean()), 4) if y.any() else None,
        "harmless_flagged": round(float(f[~y].mean()), 4) if (~y).any() else None,
    }


def measure(model: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    classifier = OnnxClassifier.load(model)
    policy = load_policy(DEFAULT_POLICY)
    try:
        scores = classifier.score_prompts_sync([r["prompt"] for r in rows])
    finally:
        classifier.close()
    groups: dict[str, tuple[list[bool], list[float], list[bool]]] = defaultdict(lambda: ([], [], []))
    for row, s in zip(rows, scores, strict=True):
        flagged = policy.decide_input(Signals(harm=s.harm, category=s.category, jailbreak=s.jailbreak)).action
        side = "cannot read" if s.unreadable >= CUT else "can read"
        for key in (side, f"language {row.get('language', '?')}"):
            groups[key][0].append(row["label"] == "harmful")
            groups[key][1].append(s.harm)
            groups[key][2].append(flagged is not Action.ALLOW)
    return {
        "model": f"{classifier.info.name} {classifier.info.version}",
        "groups": {k: group_metrics(*v) for k, v in sorted(groups.items())},
    }


def render(results: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [
        "| model | rows | harmful / harmless | AUROC | harmful flagged | harmless flagged |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for key, g in result["groups"].items():
            if key.startswith("language"):
                continue
            lines.append(
                f"| {result['model']} | {key} | {g['harmful']} / {g['harmless']} | {g['auroc']} | "
                f"{pct(g['harmful_flagged'])} | {pct(g['harmless_flagged'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="labelled prompt sets (default: the multilingual sets)")
    parser.add_argument("--model", type=Path, action="append", help="model directory (repeat; default guard-v1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = args.files or DEFAULT_SETS
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such file", file=sys.stderr)
            return 2
    rows = read_rows(paths)
    models = args.model or [PROJECT_ROOT / "models" / "guard-v1"]
    results = []
    for model in models:
        print(f"scoring {len(rows)} rows with {model} ...", file=sys.stderr)
        results.append(measure(model, rows))
    print(render(results))
    if args.json is not None:
        out = {"files": [str(p) for p in paths], "cut": CUT, "results": results}
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
