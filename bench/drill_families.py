"""How the drill report's inferred families group prompts (``guardproxy.drills.report``).

The report groups drills without a family the guard knows by their prompt's embedding. This runs both groupings,
the running-centroid leader pass (``leader_clusters``, what inferred families used before 2026-12-07) and the
anchored pass (``anchored_clusters``, each prompt joins the group whose first prompt is closest), over the English
challenge prompts (2,799; never trained on) in three spaces: character 3-gram vectors (the report's default), the
guard model's raw pooled embedding, and its projected embedding (``--model``). Per space and line: groups of two or
more, the prompts in them, and the largest group. A grouping that puts hundreds of unrelated requests in one
"family" makes the report's decision consistency meaningless.

The gateway's own families (``Observation.family``, what drills carry) come from the conversation tracker: a
refused request joins the family whose anchor (first refused request) it is close to, at the tracker's
``rephrase_low``. ``tracker`` replays that on the challenge prompts' labelled families (rewordings of one request):
per trial 8 families, their harmful prompts in random order, each refused in turn, through a real
``ConversationTracker`` (the projected embeddings, int8 refusal memory of 32); beside it, the tracker with its line
raised to 0.7 and 0.8, and the rule before 2026-12-07 (join the family of the closest refused request, any member).
Pair precision: of the prompt pairs put in one family, the share that are rewordings of one request; recall: of
the rewording pairs, the share put in one family.

    python -m bench.drill_families --json bench/results/drill_families.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.rephrase_space import CHALLENGE, ROOT, embed, load_rows
from guardproxy.conversation import ConversationTracker, MemoryBackend
from guardproxy.conversation.escalation import EscalationParams
from guardproxy.drills.report import FAMILY_THRESHOLD, anchored_clusters, leader_clusters, ngram_embed
from guardproxy.signals import PromptScore, ReplyScore

LINES = {
    "ngram": (0.55, FAMILY_THRESHOLD["ngram"]),
    "raw": (0.85, 0.95),
    "projected": (0.59, FAMILY_THRESHOLD["model"]),
}


class _Embedded:
    """A classifier that answers with the embeddings already computed: every prompt harmful, every reply a refusal."""

    embedding_space = b"proj"

    def __init__(self, vectors: dict[str, npt.NDArray[np.float32]]) -> None:
        self.vectors = vectors

    async def score_prompts(self, texts: Sequence[str], **_: Any) -> list[PromptScore]:
        return [PromptScore(0.9, "none", 0.0, self.vectors[t]) for t in texts]

    async def score_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        return [ReplyScore("full", (0.0, 0.0, 1.0), 0.0) for _ in pairs]

    async def aclose(self) -> None:
        return None


async def _tracker_families(texts: list[str], vectors: npt.NDArray[np.float32], line: float) -> list[str]:
    """The family each of ``texts``, refused in turn by one tenant, is filed under by the conversation tracker with
    ``rephrase_low`` at ``line``."""
    tracker = ConversationTracker(
        MemoryBackend(),
        _Embedded(dict(zip(texts, vectors, strict=True))),
        hmac_secret=b"bench" * 8,
        params=dataclasses.replace(EscalationParams(), rephrase_low=line),
    )
    out = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text}]
        obs = await tracker.observe("tenant", str(i), messages)
        await tracker.record_reply("tenant", str(i), messages, "I can't help.", refused=True, observation=obs)
        assert obs.family is not None
        out.append(obs.family)
    return out


def _closest_member_families(vectors: npt.NDArray[np.float32], line: float, keep: int = 32) -> list[int]:
    """The rule before 2026-12-07: the family of the closest of the last ``keep`` refusals at ``line``, else new."""
    out: list[int] = []
    for i in range(len(vectors)):
        start = max(0, i - keep)
        sims = vectors[start:i] @ vectors[i]
        out.append(out[start + int(np.argmax(sims))] if i and sims.max() >= line else i)
    return out


def tracker_families(
    vectors: npt.NDArray[np.float32], texts: list[str], families: list[str], *, trials: int = 200, per_trial: int = 8
) -> dict[str, dict[str, float]]:
    """Pair precision and recall of the tracker's families (at its ``rephrase_low``, and at higher lines a family
    could be held to), and of the closest-member rule, against ``families``."""
    rng = np.random.default_rng(0)
    vectors = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    labels = np.array(families)
    names = sorted(set(families))
    line = EscalationParams().rephrase_low
    lines = {f"anchor at {x:.2f}": x for x in (line, 0.7, 0.8)}
    counts = {k: np.zeros(4) for k in (*lines, "closest member (before)")}
    largest: dict[str, list[int]] = {k: [] for k in counts}
    for _ in range(trials):
        chosen = set(rng.choice(names, per_trial, replace=False))
        order = [i for i in range(len(texts)) if labels[i] in chosen]
        rng.shuffle(order)
        given = {
            k: asyncio.run(_tracker_families([texts[i] for i in order], vectors[order], x)) for k, x in lines.items()
        }
        given["closest member (before)"] = [str(f) for f in _closest_member_families(vectors[order], line)]
        a, b = np.triu_indices(len(order), 1)
        same_label = labels[order][a] == labels[order][b]
        for k, fam in given.items():
            f = np.array(fam)
            same = f[a] == f[b]
            counts[k] += ((same & same_label).sum(), same.sum(), same_label.sum(), len(set(fam)))
            largest[k].append(int(np.unique(f, return_counts=True)[1].max()))
    return {
        k: {
            "pair_precision": c[0] / c[1],
            "pair_recall": c[0] / c[2],
            "families_per_trial": c[3] / trials,
            "largest_mean": float(np.mean(largest[k])),
            "largest_max": max(largest[k]),
        }
        for k, c in counts.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    paths = [p for c in CHALLENGE for p in sorted((ROOT / "bench" / c).glob("harm_*.jsonl"))]
    rows = load_rows(paths)
    prompts = [r["prompt"] for r in rows]
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
    harmful = [i for i, r in enumerate(rows) if r["harmful"]]
    unique = {prompts[i]: i for i in harmful}  # one embedding per text: a repeated prompt is one request
    kept = sorted(unique.values())
    out["tracker"] = tracker_families(
        spaces["projected"][kept], [prompts[i] for i in kept], [str(rows[i]["family"]) for i in kept]
    )
    print(f"tracker families, {len(kept)} harmful prompts, 8 labelled families a trial, 200 trials")
    for k, row in out["tracker"].items():
        print(f"  {k:24} " + "  ".join(f"{name} {value:.3f}" for name, value in row.items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
