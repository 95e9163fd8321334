"""A blind second labelling of PHTest's refusal labels: how far can any refusal model agree with them?

The refusal head is trained and judged on PHTest's response labels (``refusal_raw`` in XSTest's scheme:
1_full_compliance, 2_full_refusal, 3_partial_refusal), which the data README calls likely automated. This tool
draws stratified samples of the trainer's own dev pairs (split seed 0, the 3,000 PHTest pairs a training run
scores), writes them as a blind sheet (request and reply only: no label, no model score), and reads back a second
annotator's labels from ``bench/refusal_audit/labels.jsonl`` (row id and label only: the texts stay in
``../shared/data``). It then reports three agreements on the same rows: annotator vs PHTest (how well two
labellers agree: a ceiling for any model judged against either), model vs annotator, model vs PHTest.

Each batch draws ``--per-class`` rows of each PHTest class, so figures are weighted back to the classes' shares
of the dev pairs; the standard errors come from a bootstrap that redraws rows within each class.

    .venv/bin/python -m bench.refusal_audit sheet --batch 2 [--data ../shared/data] > sheet.txt
    .venv/bin/python -m bench.refusal_audit report [--model models/guard-v1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from guardproxy.settings import PROJECT_ROOT
from guardproxy.signals import REFUSAL_CLASSES
from guardproxy.training.sources import Example, load_all
from guardproxy.training.splits import DEV_PHTEST_PAIRS, assign_splits, cap_pairs

LABELS = PROJECT_ROOT / "bench" / "refusal_audit" / "labels.jsonl"
SPLIT_SEED = 0
PER_CLASS = 40
BATCH_SEED = 20261203  # batch b draws with random.Random(BATCH_SEED + b)


def dev_pairs(data: Path) -> list[Example]:
    """The PHTest pairs with a refusal label among the dev rows a training run at split seed 0 scores."""
    examples = load_all(data, seed=SPLIT_SEED)
    assign_splits(examples, SPLIT_SEED)
    dev = cap_pairs([e for e in examples if e.split == "dev"], DEV_PHTEST_PAIRS, SPLIT_SEED)
    return [e for e in dev if e.source == "phtest_responses" and e.refusal is not None]


def draw_batch(rows: list[Example], batch: int, per_class: int = PER_CLASS) -> list[Example]:
    """Batch ``batch`` (1, 2, ...): ``per_class`` rows of each PHTest class not drawn by an earlier batch, shuffled."""
    taken: set[str] = set()
    for b in range(1, batch + 1):
        rng = random.Random(BATCH_SEED + b)
        picked: list[Example] = []
        for cls in range(len(REFUSAL_CLASSES)):
            pool = [e for e in rows if e.refusal == cls and e.meta["id"] not in taken]
            picked += rng.sample(pool, per_class)
        rng.shuffle(picked)
        taken |= {e.meta["id"] for e in picked}
    return picked


def weighted_scores(truth: np.ndarray, pred: np.ndarray, weight: np.ndarray) -> dict[str, Any]:
    """Macro-F1 over the three classes, binary F1 (any refusal) and accuracy, from a weighted confusion matrix."""
    k = len(REFUSAL_CLASSES)
    cm = np.zeros((k, k))
    np.add.at(cm, (truth, pred), weight)
    f1 = [
        2 * cm[c, c] / (cm[c, :].sum() + cm[:, c].sum()) if cm[c, :].sum() + cm[:, c].sum() else np.nan
        for c in range(k)
    ]
    tp = cm[1:, 1:].sum()
    binary = 2 * tp / (2 * tp + cm[0, 1:].sum() + cm[1:, 0].sum())
    return {
        "macro_f1": float(np.nanmean(f1)),
        "class_f1": dict(zip(REFUSAL_CLASSES, map(float, f1), strict=True)),
        "binary_f1": float(binary),
        "accuracy": float(np.trace(cm) / cm.sum()),
    }


def _resamples(strata: np.ndarray, n: int, *, seed: int) -> list[np.ndarray]:
    """``n`` bootstrap draws of row indices, each redrawing the rows of every stratum (PHTest class) within it."""
    rng = np.random.default_rng(seed)
    by_stratum = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    return [np.concatenate([rng.choice(ix, len(ix)) for ix in by_stratum]) for _ in range(n)]


def agreement(
    truth: np.ndarray, pred: np.ndarray, strata: np.ndarray, weight: np.ndarray, resamples: int
) -> dict[str, Any]:
    out = weighted_scores(truth, pred, weight)
    boot = [weighted_scores(truth[i], pred[i], weight[i]) for i in _resamples(strata, resamples, seed=0)]
    out["se"] = {m: float(np.std([b[m] for b in boot])) for m in ("macro_f1", "binary_f1", "accuracy")}
    out["confusion"] = Counter(f"{REFUSAL_CLASSES[t]}->{REFUSAL_CLASSES[p]}" for t, p in zip(truth, pred, strict=True))
    return out


def read_labels(path: Path, batches: set[int] | None = None) -> dict[str, str]:
    """Row id -> the annotator's label, for the given batches (all when None)."""
    labels: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            label, batch, row_id = row["refusal"], int(row["batch"]), str(row["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}:{n}: not a label row ({exc})") from exc
        if label not in REFUSAL_CLASSES:
            raise SystemExit(f"{path}:{n}: refusal must be one of {list(REFUSAL_CLASSES)}, got {label!r}")
        if batches is None or batch in batches:
            labels[row_id] = label
    return labels


def audited_rows(
    data: Path, labels_path: Path, batches: set[int] | None
) -> tuple[list[Example], dict[str, str], Counter[int]]:
    """The labelled dev pairs, their labels, and the PHTest class counts of all dev pairs (the weights' base)."""
    rows = dev_pairs(data)
    labels = read_labels(labels_path, batches)
    by_id = {e.meta["id"]: e for e in rows}
    missing = [i for i in labels if i not in by_id]
    if missing:
        # A labelled row outside today's dev pairs may be a training row of the next model: never score it.
        print(
            f"{len(missing)} labelled rows are not dev pairs at split seed {SPLIT_SEED} now; left out", file=sys.stderr
        )
    return [by_id[i] for i in labels if i in by_id], labels, Counter(e.refusal for e in rows)


def score_pairs(model: Path, rows: list[Example]) -> np.ndarray:
    from guardproxy.classifier import OnnxClassifier

    classifier = OnnxClassifier.load(model, threads=2)
    try:
        scores = classifier.score_replies_sync([(e.text, e.reply or "") for e in rows])
    finally:
        classifier.close()
    return np.array([REFUSAL_CLASSES.index(s.refusal) for s in scores])


def paired_difference(
    truth: np.ndarray, base: np.ndarray, cand: np.ndarray, strata: np.ndarray, weight: np.ndarray, resamples: int
) -> dict[str, dict[str, float]]:
    """Candidate minus baseline on the same rows, with a stratified paired-bootstrap standard error."""
    metrics = ("macro_f1", "binary_f1", "accuracy")
    b0, c0 = weighted_scores(truth, base, weight), weighted_scores(truth, cand, weight)
    diffs: dict[str, list[float]] = {m: [] for m in metrics}
    for idx in _resamples(strata, resamples, seed=1):
        b, c = weighted_scores(truth[idx], base[idx], weight[idx]), weighted_scores(truth[idx], cand[idx], weight[idx])
        for m in metrics:
            diffs[m].append(c[m] - b[m])
    return {m: {"difference": c0[m] - b0[m], "se": float(np.std(diffs[m]))} for m in metrics}


def report(args: argparse.Namespace) -> int:
    batches = set(args.batches) if args.batches else None
    audited, labels, population = audited_rows(args.data, args.labels, batches)
    phtest = np.array([e.refusal for e in audited])
    annotator = np.array([REFUSAL_CLASSES.index(labels[e.meta["id"]]) for e in audited])
    sampled = Counter(phtest.tolist())
    weight = np.array([population[c] / sampled[c] for c in phtest])
    model = score_pairs(args.model, audited)
    result: dict[str, Any] = {
        "model": str(args.model),
        "batches": sorted(batches) if batches else "all",
        "n": len(audited),
        "population": {REFUSAL_CLASSES[c]: population[c] for c in sorted(population)},
        "annotator_vs_phtest": agreement(phtest, annotator, phtest, weight, args.resamples),
        "model_vs_annotator": agreement(annotator, model, phtest, weight, args.resamples),
        "model_vs_phtest": agreement(phtest, model, phtest, weight, args.resamples),
    }
    names = {REFUSAL_CLASSES[c]: n for c, n in sorted(sampled.items())}
    print(
        f"{len(audited)} audited dev pairs (PHTest classes {names}), weighted to the dev pairs' {result['population']}"
    )
    print(f"{'prediction vs truth':<22} {'macro-F1':>15} {'binary F1':>15} {'accuracy':>15}")
    for name in ("annotator_vs_phtest", "model_vs_annotator", "model_vs_phtest"):
        r = result[name]
        cells = [f"{r[m]:.3f} ({r['se'][m]:.3f})" for m in ("macro_f1", "binary_f1", "accuracy")]
        print(f"{name:<22} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}")
    print("(standard errors in brackets)")
    if args.baseline is not None:
        base = score_pairs(args.baseline, audited)
        result["baseline"] = str(args.baseline)
        result["difference"] = {
            "vs_annotator": paired_difference(annotator, base, model, phtest, weight, args.resamples),
            "vs_phtest": paired_difference(phtest, base, model, phtest, weight, args.resamples),
        }
        print(f"model minus baseline ({args.baseline}), paired standard errors in brackets:")
        for truth_name, d in result["difference"].items():
            cells = [f"{d[m]['difference']:+.3f} ({d[m]['se']:.3f})" for m in ("macro_f1", "binary_f1", "accuracy")]
            print(f"{truth_name:<22} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def targets(args: argparse.Namespace) -> int:
    """P(annotator's class | PHTest's label) from the given batches, +0.5 per cell (``--refusal-targets``)."""
    audited, labels, _ = audited_rows(args.data, args.labels, set(args.batches))
    counts = np.full((len(REFUSAL_CLASSES), len(REFUSAL_CLASSES)), 0.5)
    for e in audited:
        counts[e.refusal, REFUSAL_CLASSES.index(labels[e.meta["id"]])] += 1
    probs = counts / counts.sum(axis=1, keepdims=True)
    doc = {
        "source": "phtest_responses",
        "made_by": f"python -m bench.refusal_audit targets --batches {' '.join(map(str, args.batches))}",
        "rows": len(audited),
        "targets": {REFUSAL_CLASSES[i]: [round(float(p), 4) for p in probs[i]] for i in range(len(REFUSAL_CLASSES))},
    }
    # Rounded rows must still sum to 1 for the trainer's check: the largest cell takes the rounding.
    for row in doc["targets"].values():
        top = int(np.argmax(row))
        row[top] = round(row[top] + 1.0 - sum(row), 4)
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def sheet(args: argparse.Namespace) -> int:
    for n, e in enumerate(draw_batch(dev_pairs(args.data), args.batch)):
        print(f"### {n} {e.meta['id']}\nU: {e.text}\nA: {e.reply}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refusal_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT.parent / "shared" / "data")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sheet", help="write one batch as a blind sheet (ids, requests, replies) to stdout")
    s.add_argument("--batch", type=int, required=True)
    r = sub.add_parser("report", help="agreement of the annotator, PHTest and a model on the labelled rows")
    r.add_argument("--model", type=Path, default=PROJECT_ROOT / "models" / "guard-v1")
    r.add_argument("--baseline", type=Path, default=None, help="a second model: differences with paired errors")
    r.add_argument("--batches", type=int, nargs="+", default=None, help="only these batches (default: all)")
    r.add_argument("--labels", type=Path, default=LABELS)
    r.add_argument("--resamples", type=int, default=1000)
    r.add_argument("--json")
    t = sub.add_parser("targets", help="soft refusal targets per PHTest label, for guardproxy train --refusal-targets")
    t.add_argument("--batches", type=int, nargs="+", required=True)
    t.add_argument("--labels", type=Path, default=LABELS)
    t.add_argument("--out")
    args = parser.parse_args(argv)
    return {"sheet": sheet, "report": report, "targets": targets}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
