"""Where the thresholds sit: minimax of each group's rate against its target (numpy only, no training extras)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from guardproxy.training.sources import Example

GRID = np.round(np.arange(0.01, 0.995, 0.01), 2)


def minimax(positives: Sequence[tuple[np.ndarray, float]], negatives: Sequence[tuple[np.ndarray, float]]) -> float:
    """The threshold minimising the worst ratio of a rate to its target over every group.

    A positive group's rate is its miss rate, a negative group's its flag rate; groups with no rows are skipped.
    """
    best, best_cost = 0.5, math.inf
    for t in GRID:
        costs = [float(np.mean(p < t)) / target for p, target in positives if len(p)]
        costs += [float(np.mean(n >= t)) / target for n, target in negatives if len(n)]
        cost = max(costs) if costs else 0.0
        if cost < best_cost - 1e-9:
            best, best_cost = float(t), cost
    return best


# The harm threshold answers to the targets group by group, not pooled: harmful asks missed <= 5% in the
# public sets and in the authored reframings each (pooled, the many easy public asks hid the hard ones), ordinary
# benign prompts flagged <= 2%, look-alikes (the authored benign prompts) <= 5%, PHTest harmless <= 5%.
HARM_MISS_TARGET = 0.05
HARM_FLAG_TARGETS = {"ordinary": 0.02, "lookalike": 0.05, "phtest": 0.05}


def harm_group(e: Example, by_kind: bool = False) -> str | None:
    """The calibration group of a prompt row: ``harmful_public``, ``harmful_authored`` or a key of the targets.

    An authored harmless prompt is a look-alike by its file; with ``by_kind`` (``guardproxy train
    --calibrate-by-kind``), one whose row says ``"kind": "everyday"`` is ordinary, so a batch of plain requests does
    not dilute the look-alike group whose target binds (candidate 2.17.0's threshold fell from 0.35 to 0.27 so)."""
    authored = e.source.startswith("authored/")
    if e.harm == 1.0:
        return "harmful_authored" if authored else "harmful_public"
    if e.label == "borderline_benign":
        return "phtest"
    if e.label == "benign":
        if by_kind and e.meta.get("kind") == "everyday":
            return "ordinary"
        return "lookalike" if e.source.startswith("authored/prompts") else "ordinary"
    return None


def _harm_groups(
    examples: Sequence[Example], harm: np.ndarray, by_kind: bool = False, by_source: bool = False
) -> dict[str, np.ndarray]:
    """The harm scores of the prompt rows, by calibration group (rows outside every group left out); with
    ``by_source``, by (group, source) keyed ``"group source"``."""
    groups: dict[str, list[float]] = defaultdict(list)
    for i, e in enumerate(examples):
        group = harm_group(e, by_kind) if not e.pair else None
        if group is not None:
            groups[f"{group} {e.source}" if by_source else group].append(float(harm[i]))
    return {k: np.array(v) for k, v in sorted(groups.items())}


def calibrate_harm(examples: Sequence[Example], harm: np.ndarray, by_kind: bool = False) -> float:
    arrays = _harm_groups(examples, harm, by_kind)
    empty = np.array([])
    positives = [(arrays.get(g, empty), HARM_MISS_TARGET) for g in ("harmful_public", "harmful_authored")]
    negatives = [(arrays.get(g, empty), target) for g, target in HARM_FLAG_TARGETS.items()]
    return minimax(positives, negatives)


def _group_rate(group: str, scores: np.ndarray, threshold: float) -> float:
    """A harmful group's miss rate, any other group's flag rate, at the threshold (unrounded: a rate equal to a limit
    computed the same way, k of n, must compare equal to it)."""
    return float(np.mean(scores < threshold if group.startswith("harmful") else scores >= threshold))


def harm_calibration_report(
    examples: Sequence[Example], harm: np.ndarray, threshold: float, by_kind: bool = False
) -> dict[str, Any]:
    """Each calibration group's size, rate at the threshold (miss rate for harmful groups, else flag rate), target."""
    report: dict[str, Any] = {}
    for group, v in _harm_groups(examples, harm, by_kind).items():
        harmful = group.startswith("harmful")
        report[group] = {
            "n": len(v),
            "miss_rate" if harmful else "flag_rate": _group_rate(group, v, threshold),
            "target": HARM_MISS_TARGET if harmful else HARM_FLAG_TARGETS[group],
        }
    return report


def harm_calibration_curve(examples: Sequence[Example], harm: np.ndarray, by_kind: bool = False) -> dict[str, Any]:
    """Each calibration group's rate (miss rate for harmful groups, else flag rate) at every ``GRID`` threshold.

    Kept in metrics.json so that a line chosen by another rule (a rate held, not a score) can be read off a finished
    run without scoring its calibration rows again."""
    curve: dict[str, Any] = {"grid": [float(t) for t in GRID]}
    for group, v in _harm_groups(examples, harm, by_kind).items():
        curve[group] = [_group_rate(group, v, float(t)) for t in GRID]
    # Each harmful source's misses, counted, so a rule can hold the rows of a model's data while a new batch's rows
    # share the group (``curve_without``): a batch of easy asks lowers its group's miss rate and lets such a line rise.
    sources: dict[str, Any] = {}
    for key, v in _harm_groups(examples, harm, by_kind, by_source=True).items():
        group, source = key.split(" ", 1)
        if group.startswith("harmful"):
            sources[source] = {"group": group, "n": len(v), "missed": [int(np.sum(v < float(t))) for t in GRID]}
    curve["harmful_sources"] = sources
    return curve


def curve_without(curve: dict[str, Any], sources: Sequence[str]) -> dict[str, Any]:
    """The curve with each harmful group's miss rate counted over its rows outside ``sources``.

    Reads the per-source counts the curve keeps (``harmful_sources``; a curve written before they were kept raises
    ``KeyError``). Groups other than the harmful ones are returned as they are."""
    per_source = curve["harmful_sources"]
    unknown = sorted(set(sources) - set(per_source))
    if unknown:
        raise KeyError(f"no harmful calibration rows from {', '.join(unknown)}")
    out = dict(curve)
    for group in {v["group"] for v in per_source.values()}:
        kept = [v for s, v in per_source.items() if v["group"] == group and s not in sources]
        n = sum(v["n"] for v in kept)
        out[group] = [sum(v["missed"][i] for v in kept) / n if n else 0.0 for i in range(len(curve["grid"]))]
    return out


def highest_line_within(curve: dict[str, Any], max_miss: dict[str, float]) -> float | None:
    """The highest grid threshold at which each named harmful group's miss rate is at most its limit (None: none is).

    Miss rates only grow with the threshold, so this is the line that flags least while keeping those recalls."""
    ok = [
        t
        for i, t in enumerate(curve["grid"])
        if all(curve[group][i] <= limit + 1e-9 for group, limit in max_miss.items())
    ]
    return max(ok) if ok else None
