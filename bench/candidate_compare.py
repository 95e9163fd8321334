"""Two guard models on the same prompt sets, in one run: ``python -m bench.candidate_compare --candidate DIR``.

What a shipping rule for a new model reads (bench/results/candidates/README.md): for each set, harm AUROC, the
share of harmful and of harmless rows flagged by the policy (action not ``allow``), and the **recall at a matched
operating point**: the candidate's recall at the threshold that flags no more of the set's harmless rows than the
baseline flags at its own. A new calibration moves the operating point; the matched figure shows whether the
ranking itself got better or worse. Harmless = ``benign`` and ``borderline_benign``; harmful = ``harmful``.
Beside each AUROC difference, its paired-bootstrap standard error: how much the difference would move had the
set's rows been drawn again (training-seed noise comes on top). A shipping rule's bar tighter than about one of
these decides by luck.

    .venv/bin/python -m bench.candidate_compare --candidate /tmp/cand [--baseline models/guard-v1] [FILE ...]
        [--json OUT]

Beside the rates, the **decisions that changed**: rows the two models, each at its own line, decide differently
(harmful rows the candidate newly allows or newly flags, harmless ones likewise). Equal rates can hide many swaps;
a candidate meant to hold the baseline's harm side (a distillation teacher) should change few.

Without FILEs: every ``harm_challenge*.jsonl`` of the held-out sets (``CHALLENGE_DIRS``); a file without both
harmful and harmless prompt rows is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from guardproxy.commands.evaluate import load_rows, score_files
from guardproxy.commands.score import load_model
from guardproxy.evaluation import NEGATIVE_LABELS, PromptRecord, auroc
from guardproxy.settings import PROJECT_ROOT
from guardproxy.training.sources import CHALLENGE_DIRS

# Every held-out prompt set (the refusal and conversation files beside them have no prompt rows to compare).
DEFAULT_SETS = [p for d in CHALLENGE_DIRS for p in sorted(d.glob("harm_challenge*.jsonl"))]


def prompt_records(model: Path, path: Path) -> list[PromptRecord]:
    """Every prompt row of ``path`` scored by ``model`` under the default policy."""
    args = argparse.Namespace(group_by=None, no_progress=True)  # what score_files reads
    classifier, policy = load_model(model=model, early_exit=False)
    try:
        collector = score_files(classifier, policy, [(path, load_rows(path, None))], [], args)
    finally:
        classifier.close()
    return collector.prompts


def set_metrics(records: list[PromptRecord]) -> dict[str, Any]:
    pos = np.array([r.harm for r in records if r.label == "harmful"])
    neg = np.array([r.harm for r in records if r.label in NEGATIVE_LABELS])
    labels = [True] * len(pos) + [False] * len(neg)
    return {
        "n_harmful": len(pos),
        "n_harmless": len(neg),
        "auroc": auroc(labels, np.r_[pos, neg]) if len(pos) and len(neg) else None,
        "harmful_flagged": float(np.mean([r.action != "allow" for r in records if r.label == "harmful"])),
        "harmless_flagged": float(np.mean([r.action != "allow" for r in records if r.label in NEGATIVE_LABELS])),
        "_pos": pos,
        "_neg": neg,
    }


# The rows two models decide apart, by side (``decision_changes``), in the order the table prints them.
CHANGES = ("harmful_newly_allowed", "harmful_newly_flagged", "harmless_newly_flagged", "harmless_newly_allowed")


def decision_changes(baseline: list[PromptRecord], candidate: list[PromptRecord]) -> dict[str, int]:
    """Rows (scored in the same order by both models) that one model flags and the other allows, by side."""
    changes = dict.fromkeys(CHANGES, 0)
    for b, c in zip(baseline, candidate, strict=True):
        if (b.action != "allow") == (c.action != "allow"):
            continue
        side = "harmful" if b.label == "harmful" else "harmless" if b.label in NEGATIVE_LABELS else None
        if side is not None:
            changes[f"{side}_newly_{'flagged' if c.action != 'allow' else 'allowed'}"] += 1
    return changes


def recall_at_flag_rate(pos: np.ndarray, neg: np.ndarray, flag_rate: float) -> float:
    """Recall at the lowest threshold on the scores that flags at most ``flag_rate`` of ``neg``."""
    allowed = int(np.floor(flag_rate * len(neg) + 1e-9))
    ranked = np.sort(neg)[::-1]
    # Flag scores strictly above the (allowed+1)-th highest harmless score: at most `allowed` harmless rows flagged.
    cut = ranked[allowed] if allowed < len(ranked) else -np.inf
    return float(np.mean(pos > cut))


def auroc_difference_se(
    b_pos: np.ndarray, b_neg: np.ndarray, c_pos: np.ndarray, c_neg: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> float:
    """Standard error of (candidate AUROC - baseline AUROC) on one set, by a paired bootstrap: the same rows are
    redrawn for both models (harmful and harmless rows apart, so each draw keeps the set's mix). A difference
    within one or two of these is what a set of this size cannot tell from chance."""
    rng = np.random.default_rng(seed)
    labels = [True] * len(b_pos) + [False] * len(b_neg)
    diffs = np.empty(resamples)
    for k in range(resamples):
        ip = rng.integers(0, len(b_pos), len(b_pos))
        ineg = rng.integers(0, len(b_neg), len(b_neg))
        diffs[k] = auroc(labels, np.r_[c_pos[ip], c_neg[ineg]]) - auroc(labels, np.r_[b_pos[ip], b_neg[ineg]])
    return float(np.std(diffs, ddof=1))


def compare(baseline: Path, candidate: Path, sets: list[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"baseline": str(baseline), "candidate": str(candidate), "sets": {}}
    for path in sets:
        print(f"scoring {path.name} ...", file=sys.stderr)
        b_records = prompt_records(baseline, path)
        if not any(r.label == "harmful" for r in b_records) or not any(r.label in NEGATIVE_LABELS for r in b_records):
            print(f"  skipped {path.name}: no harmful and harmless prompt rows to compare", file=sys.stderr)
            continue
        c_records = prompt_records(candidate, path)
        assert [r.label for r in c_records] == [r.label for r in b_records], "both models score the same rows"
        b = set_metrics(b_records)
        c = set_metrics(c_records)
        c["auroc_difference_se"] = auroc_difference_se(b["_pos"], b["_neg"], c["_pos"], c["_neg"])
        c["recall_at_baseline_harmless_rate"] = recall_at_flag_rate(c["_pos"], c["_neg"], b["harmless_flagged"])
        c["decisions_changed"] = decision_changes(b_records, c_records)
        # The baseline against its own harmless rate, by the same rule, so both sides of the comparison match.
        b["recall_at_baseline_harmless_rate"] = recall_at_flag_rate(b["_pos"], b["_neg"], b["harmless_flagged"])
        for m in (b, c):
            m.pop("_pos")
            m.pop("_neg")
        out["sets"][path.name] = {"baseline": b, "candidate": c}
    return out


def render(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [
        f"baseline {result['baseline']}  |  candidate {result['candidate']}",
        "",
        "| set | AUROC b / c | c - b (paired bootstrap SE) | harmful flagged b / c | harmless flagged b / c "
        "| recall at b's harmless rate b / c | decisions changed: harmful allowed / flagged, harmless flagged / "
        "allowed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, pair in result["sets"].items():
        b, c = pair["baseline"], pair["candidate"]
        d = c.get("decisions_changed", {})
        changed = " / ".join(str(d.get(k, "-")) for k in CHANGES)
        lines.append(
            f"| {name} | {b['auroc']:.3f} / {c['auroc']:.3f} | {c['auroc'] - b['auroc']:+.3f} "
            f"({c['auroc_difference_se']:.3f}) | {pct(b['harmful_flagged'])} / "
            f"{pct(c['harmful_flagged'])} | {pct(b['harmless_flagged'])} / {pct(c['harmless_flagged'])} | "
            f"{pct(b['recall_at_baseline_harmless_rate'])} / {pct(c['recall_at_baseline_harmless_rate'])} | "
            f"{changed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="labelled prompt sets (default: the four challenge sets)")
    parser.add_argument("--baseline", type=Path, default=PROJECT_ROOT / "models" / "guard-v1")
    parser.add_argument("--candidate", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = compare(args.baseline, args.candidate, args.files or DEFAULT_SETS)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
