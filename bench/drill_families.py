"""How the drill report's inferred families group prompts (``guardproxy.drills.report``).

The report groups drills without a family the guard knows by their prompt's embedding. This runs both groupings,
the running-centroid leader pass (``leader_clusters``, what inferred families used before 2026-12-07) and the
anchored pass (``anchored_clusters``, each prompt joins the group whose first prompt is closest), over the English
challenge prompts (2,799; never trained on) in three spaces: character 3-gram vectors (the report's default), the
guard model's raw pooled embedding, and its projected embedding (``--model``). Per space and line: groups of two or
more, the prompts in them, and the largest group. A grouping that puts hundreds of unrelated requests in one
"family" makes the report's decision consistency meaningless.

    python -m bench.drill_families --json bench/results/drill_families.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.rephrase_space import CHALLENGE, ROOT, embed, load_rows
from guardproxy.drills.report import FAMILY_THRESHOLD, anchored_clusters, leader_clusters, ngram_embed

LINES = {
    "ngram": (0.55, FAMILY_THRESHOLD["ngram"]),
    "raw": (0.85, 0.95),
    "projected": (0.59, FAMILY_THRESHOLD["model"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    paths = [p for c in CHALLENGE for p in sorted((ROOT / "bench" / c).glob("harm_*.jsonl"))]
    prompts = [r["prompt"] for r in load_rows(paths)]
    spaces = {"ngram": ngram_embed(prompts)}
    with contextlib.redirect_stderr(io.StringIO()):
        spaces["raw"] = embed(args.model, prompts, False)[0]
        spaces["projected"] = embed(args.model, prompts, True)[0]
    out: dict[str, Any] = {"prompts": len(prompts), "spaces": {}}
    print(f"{len(prompts)} English challenge prompts")
    print(f"{'space':10} {'line':>5} {'pass':9} {'groups':>7} {'in groups':>10} {'largest':>8}")
    for name, v in spaces.items():
        v = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        for line in LINES[name]:
            for kind, cluster in (("centroid", leader_clusters), ("anchored", anchored_clusters)):
                groups = [g for g in cluster(v, line) if len(g) > 1]
                row = {
                    "groups": len(groups),
                    "in_groups": sum(map(len, groups)),
                    "largest": max(map(len, groups), default=1),
                }
                out["spaces"].setdefault(name, {}).setdefault(f"{line:.2f}", {})[kind] = row
                print(f"{name:10} {line:5.2f} {kind:9} {row['groups']:7} {row['in_groups']:10} {row['largest']:8}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
