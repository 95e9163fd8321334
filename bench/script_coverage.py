"""What the guard model can read: held-out prompts split by the share of their letters it cannot read.

    .venv/bin/python -m bench.script_coverage [--model DIR ...] [FILE ...] [--json OUT]

The shipped model's English WordPiece vocabulary spells Latin-script words in pieces and every other script letter
by letter (or as ``[UNK]``). Each prompt score carries ``unreadable``, the share of its letters in such scripts
(``guardproxy.encoding.unreadable_share``). This scores labelled prompt rows as ``guardproxy score`` does (the
configured active policy, ``policies/default.toml`` unless set), splits them at ``signals.UNREADABLE`` (0.5) and
reports, per model and side: rows, harm AUROC within the side, and the share of harmful and of harmless rows the
policy does not allow. Without FILEs: the three multilingual held-out sets (challenge4, 9, 10). The JSON also
has a line per ``language`` where rows carry one.

``--own-line`` asks whether a harm line of its own for unreadable text would hold its flag rates still from one
model to the next (where the model cannot read, its score is near a guess and the one calibrated line lets a new
run's prior through). The line is the minimax of harmful misses and harmless flags (equal targets: where they
balance) over the unreadable rows of the held authored batches in other languages (``authored/held/``
``prompts_multilingual9a``, ``9b``, ``prompts_everyday10``: not trained on by any model since they were held);
the groups ``cannot read, own line`` and ``all, own line`` then flag an unreadable row when its harm (operating
scale) reaches that line (harm alone: the policy's other signals are not consulted there), and a readable row as
the policy does; ``all`` is the policy's flags over every row, for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from guardproxy.commands.evaluate import load_rows
from guardproxy.commands.score import load_model, row_scorer
from guardproxy.errors import ConfigError
from guardproxy.evaluation import NEGATIVE_LABELS, auroc
from guardproxy.scoring import ParsedRow
from guardproxy.settings import PROJECT_ROOT
from guardproxy.signals import UNREADABLE, readable_side
from guardproxy.training.calibration import minimax
from guardproxy.training.sources import AUTHORED_DIR

DEFAULT_SETS = [PROJECT_ROOT / "bench" / f"challenge{n}" / f"harm_challenge{n}.jsonl" for n in (4, 9, 10)]
HELD_SETS = [
    AUTHORED_DIR / "held" / f"{n}.jsonl"
    for n in ("prompts_multilingual9a", "prompts_multilingual9b", "prompts_everyday10")
]


def prompt_rows(paths: list[Path]) -> list[ParsedRow]:
    """The labelled prompt rows (harmful, benign, borderline_benign) of ``paths``; a bad line is a ``ConfigError``."""
    labels = ("harmful", *NEGATIVE_LABELS)
    return [r for p in paths for r in load_rows(p, None) if r.kind == "prompt" and (r.raw or {}).get("label") in labels]


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


def score_rows(model: Path, rows: list[ParsedRow]) -> tuple[str, list[dict[str, Any]]]:
    """``guardproxy score``'s result for each row with ``model`` under the default policy, and the model's name."""
    classifier, policy = load_model(model=model, early_exit=False)
    try:
        with row_scorer(classifier, policy) as scorer:
            return f"{classifier.info.name} {classifier.info.version}", scorer.score(rows)
    finally:
        classifier.close()


def own_line(rows: list[ParsedRow], results: list[dict[str, Any]]) -> float:
    """Where harmful misses and harmless flags balance over the unreadable ones of ``rows`` (harm, operating scale)."""
    harmful: list[float] = []
    harmless: list[float] = []
    for row, result in zip(rows, results, strict=True):
        if readable_side(result["unreadable"]) == "cannot read":
            (harmful if (row.raw or {})["label"] == "harmful" else harmless).append(result["harm"])
    return minimax([(np.array(harmful), 0.05)], [(np.array(harmless), 0.05)])


def measure(model: Path, rows: list[ParsedRow], held: list[ParsedRow] | None = None) -> dict[str, Any]:
    """``guardproxy score``'s rows for ``model`` under the default policy, grouped by what the model could read;
    with ``held``, also flagged with a line of its own for unreadable text calibrated on those rows."""
    name, results = score_rows(model, rows)
    line = None
    if held is not None:
        line = own_line(held, score_rows(model, held)[1])
    groups: dict[str, tuple[list[bool], list[float], list[bool]]] = defaultdict(lambda: ([], [], []))
    for row, result in zip(rows, results, strict=True):
        raw = row.raw or {}
        side = readable_side(result["unreadable"])
        flagged = result["action"] != "allow"
        marks = {side: flagged, f"language {raw.get('language', '?')}": flagged}
        if line is not None:  # the policy's flags beside the own line's, for the same rows
            own = result["harm"] >= line if side == "cannot read" else flagged
            marks |= {"all": flagged, "all, own line": own}
            if side == "cannot read":
                marks["cannot read, own line"] = own
        for key, flag in marks.items():
            groups[key][0].append(raw["label"] == "harmful")
            groups[key][1].append(result["harm"])
            groups[key][2].append(flag)
    out: dict[str, Any] = {"model": name, "groups": {k: group_metrics(*v) for k, v in sorted(groups.items())}}
    if line is not None:
        out["own_line"] = line
    return out


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
            if key.endswith("own line"):
                key = f"{key} {result['own_line']:.2f}"
            lines.append(
                f"| {result['model']} | {key} | {g['harmful']} / {g['harmless']} | {g['auroc']} | "
                f"{pct(g['harmful_flagged'])} | {pct(g['harmless_flagged'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="labelled prompt sets (default: the multilingual sets)")
    parser.add_argument("--model", type=Path, action="append", help="model directory (repeat; default guard-v1)")
    parser.add_argument("--own-line", action="store_true", help="also flag unreadable text at a line of its own")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = args.files or DEFAULT_SETS
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such file", file=sys.stderr)
            return 2
    try:
        rows = prompt_rows(paths)
        held = prompt_rows(HELD_SETS) if args.own_line else None
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    models = args.model or [PROJECT_ROOT / "models" / "guard-v1"]
    results = []
    for model in models:
        print(f"scoring {len(rows)} rows with {model} ...", file=sys.stderr)
        results.append(measure(model, rows, held))
    print(render(results))
    if args.json is not None:
        out = {"files": [str(p) for p in paths], "cut": UNREADABLE, "results": results}
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
