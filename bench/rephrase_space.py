"""Rephrase similarity in the raw and the projected embedding space (``guardproxy.embedding_projection``).

Pairs of prompts, each scored once by the guard model (the gateway's path: normalisation, tokenizer, whole model):
- ``same intent``: two harmful prompts of one family (rewordings of one request, in other voices and frames);
- ``other harmful``: two harmful prompts of different families;
- ``harmless``: two harmless prompts of different families (ordinary requests and look-alikes);
- ``harmful-harmless``: one of each, different families.

For each space: the share of each kind at or above a line, and the AUROC of same intent against other harmful.
Two sets: the authored prompt batches' rows in the model's training split (``--fit-side``; where the lines are
mapped) and the English challenge sets (never trained on; the check). A line of the raw space is mapped to the
projected line at which ``other harmful`` pairs reach the same share on the training side, so a policy's line keeps
its false matches between harmful requests and gains on the rest.

    python -m bench.rephrase_space --model models/guard-v1 --data ../shared/data \
        --json bench/results/rephrase_space.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guardproxy.classifier import OnnxClassifier
from guardproxy.commands.evaluate import trainer_split_of_ids

ROOT = Path(__file__).resolve().parent.parent
AUTHORED = ROOT / "guardproxy" / "training" / "authored"
FIT_FILES = ("prompts_reframed", "prompts_contrast", "prompts_contrast3", "prompts_contrast4", "prompts_contrast7")
CHALLENGE = ("challenge", "challenge2", "challenge3", "challenge5", "challenge6", "challenge7", "challenge8")
RAW_LINES = (0.8, 0.85, 0.9, 0.95)  # the policies' rephrase lines and the escalation's low / high
KINDS = ("same intent", "other harmful", "harmless", "harmful-harmless")


def load_rows(paths: list[Path], keep: set[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("family") and (keep is None or str(row["id"]) in keep):
                harmful = row["label"] == "harmful"
                rows.append({"prompt": row["prompt"], "family": row["family"], "harmful": harmful})
    return rows


def pair_kinds(rows: list[dict[str, Any]]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(i, j, kind index into KINDS, -1 for pairs of one family with a harmless side) over all pairs i < j."""
    fam = np.array([f"{r['family']}|{r['harmful']}" for r in rows])
    harmful = np.array([r["harmful"] for r in rows])
    i, j = np.triu_indices(len(rows), 1)
    same = fam[i] == fam[j]
    kind = np.full(len(i), -1)
    kind[same & harmful[i] & harmful[j]] = 0
    kind[~same & harmful[i] & harmful[j]] = 1
    kind[~same & ~harmful[i] & ~harmful[j]] = 2
    kind[~same & (harmful[i] != harmful[j])] = 3
    return i, j, kind


def auroc(pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64]) -> float:
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def similarities(vectors: npt.NDArray[np.float32], i: npt.NDArray[np.intp], j: npt.NDArray[np.intp]) -> Any:
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", v[i], v[j])


def describe(sims: npt.NDArray[np.float64], kind: npt.NDArray[np.intp], lines: list[float]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    other = sims[kind == 1]
    other = rng.choice(other, min(len(other), 200_000), replace=False)
    return {
        "pairs": {k: int((kind == n).sum()) for n, k in enumerate(KINDS)},
        "median": {k: float(np.median(sims[kind == n])) for n, k in enumerate(KINDS)},
        "auroc_same_vs_other_harmful": auroc(sims[kind == 0], other),
        "at_or_above": {
            f"{t:.3f}": {k: float(np.mean(sims[kind == n] >= t)) for n, k in enumerate(KINDS)} for t in lines
        },
    }


def embed(model: Path, prompts: list[str], projected: bool) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """(embeddings, harm on the operating scale) of ``prompts``, one whole-model pass each."""
    with OnnxClassifier.load(model, embedding_projection=projected) as clf:
        if projected and clf.projection is None:
            raise SystemExit(
                f"{model}: no usable embedding_projection.json (python -m guardproxy.embedding_projection)"
            )
        out, harm = [], []
        for start in range(0, len(prompts), 64):
            scores = clf.score_prompts_sync(prompts[start : start + 64], exact=True)
            out += [s.embedding for s in scores]
            harm += [s.harm for s in scores]
            print(
                f"\r  embedding {'projected' if projected else 'raw'} {len(out)}/{len(prompts)}",
                end="",
                file=sys.stderr,
            )
        print(file=sys.stderr)
    return np.stack(out), np.asarray(harm)


RULE_HARM = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)  # the rephrase rule's harm_at_least candidates (the per-turn block is 0.5)


def rule_table(
    rows: list[dict[str, Any]], vectors: npt.NDArray[np.float32], harm: npt.NDArray[np.float64], line: float
) -> dict[str, Any]:
    """The rephrase rule (similarity >= ``line`` to a refused request, and harm >= H) on ordered pairs (refused a,
    new b) whose b the per-turn block (harm 0.5) lets through: a rewording of a refused harmful request caught; a
    harmless request blocked after a harmful refusal (a look-alike of the same family, or another request), or after
    a harmless one was refused (a false refusal)."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    fam = np.array([r["family"] for r in rows])
    bad = np.array([r["harmful"] for r in rows])
    a, b = np.meshgrid(np.arange(len(rows)), np.arange(len(rows)), indexing="ij")
    through = (a != b) & (harm[b] < 0.5)
    same = fam[a] == fam[b]
    pairs = {
        "rewording of a refused harmful request": through & same & bad[a] & bad[b],
        "look-alike after a harmful refusal": through & same & bad[a] & ~bad[b],
        "other harmless after a harmful refusal": through & ~same & bad[a] & ~bad[b],
        "harmless after a harmless refusal": through & ~same & ~bad[a] & ~bad[b],
    }
    out: dict[str, Any] = {"line": line, "pairs": {k: int(m.sum()) for k, m in pairs.items()}, "at_harm": {}}
    for h in RULE_HARM:
        hit = (sims >= line) & (harm[b] >= h)
        out["at_harm"][f"{h:.2f}"] = {k: float(hit[m].mean()) if m.any() else None for k, m in pairs.items()}
    return out


def default_line() -> float:
    """The shipped default policy's rephrase line."""
    from guardproxy.policy import load_policy

    policy = load_policy(ROOT / "policies" / "default.toml")
    return next(float(x) for r in policy.input_rules if (x := r.when.rephrase_similarity_at_least) is not None)


def mapped_line(raw_other: npt.NDArray[np.float64], proj_other: npt.NDArray[np.float64], line: float) -> float:
    """The projected line at which ``other harmful`` pairs match at the raw line's share."""
    share = float(np.mean(raw_other >= line))
    return float(np.quantile(proj_other, 1.0 - share))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
    seed = int(config.get("data", {}).get("seed", 0))
    split = trainer_split_of_ids(args.data, seed, bool(config.get("data", {}).get("chat_turns", False)))
    train_ids = {k for k, v in split.items() if v == "train"}
    sets = {
        "fit side (authored, training split)": load_rows([AUTHORED / f"{n}.jsonl" for n in FIT_FILES], train_ids),
        "challenge (English, never trained on)": load_rows(
            [p for c in CHALLENGE for p in sorted((ROOT / "bench" / c).glob("harm_*.jsonl"))]
        ),
    }
    result: dict[str, Any] = {"model": {"name": config.get("name"), "version": config.get("version")}, "sets": {}}
    lines: dict[str, float] = {}
    for name, rows in sets.items():
        i, j, kind = pair_kinds(rows)
        prompts = [r["prompt"] for r in rows]
        raw = similarities(embed(args.model, prompts, False)[0], i, j)
        vectors, harm = embed(args.model, prompts, True)
        proj = similarities(vectors, i, j)
        if not lines:  # the fit side comes first: the mapping is made there
            lines = {f"{t:.2f}": mapped_line(raw[kind == 1], proj[kind == 1], t) for t in RAW_LINES}
        result["sets"][name] = {
            "prompts": len(rows),
            "raw": describe(raw, kind, list(RAW_LINES)),
            "projected": describe(proj, kind, list(lines.values())),
            "rule": rule_table(rows, vectors, harm, default_line()),
        }
    result["mapped_lines"] = lines
    print(
        f"model {config.get('name')} {config.get('version')}; raw line -> projected line (training side): "
        + ", ".join(f"{k} -> {v:.3f}" for k, v in lines.items())
    )
    for name, r in result["sets"].items():
        print(f"\n{name}: {r['prompts']} prompts, pairs " + ", ".join(f"{k} {v}" for k, v in r["raw"]["pairs"].items()))
        print(
            f"  AUROC same intent vs other harmful: raw {r['raw']['auroc_same_vs_other_harmful']:.3f}, "
            f"projected {r['projected']['auroc_same_vs_other_harmful']:.3f}"
        )
        print(f"  {'line':>14s} " + " ".join(f"{k:>17s}" for k in KINDS))
        for space in ("raw", "projected"):
            for t, shares in r[space]["at_or_above"].items():
                print(f"  {space[:4]} {t:>9s} " + " ".join(f"{shares[k]:17.3f}" for k in KINDS))
    for name, r in result["sets"].items():
        rule = r["rule"]
        print(f"\n{name}: the rephrase rule at line {rule['line']:.3f}, pairs the per-turn block lets through:")
        print("  " + "; ".join(f"{k} {v}" for k, v in rule["pairs"].items()))
        for h, shares in rule["at_harm"].items():
            cells = ", ".join("-" if v is None else f"{v:.4f}" for v in shares.values())
            print(f"  harm >= {h}: {cells}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwritten {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
