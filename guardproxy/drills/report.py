"""The drill report: the "scripted refusal" symptoms that live traffic shows (``guardproxy drills report``).

- Refusal concentration: refusal replies (the upstream's, and the policy's own block texts, reported apart;
  ``all`` is both) clustered by the embedding of their opening sentence (where a script shows; whole replies
  cluster on the generic English they share) with a greedy leader pass (cosine to a cluster's centroid at or
  above a threshold); the share the three largest clusters cover, the number of clusters and of distinct phrasings
  (whole replies, case and punctuation folded). Embeddings come from the guard model when one is given
  (``OnnxClassifier``), else from character 3-gram hashing vectors (no vocabulary to fit, deterministic,
  numpy only), the default. On PHTest's labelled refusals (ngram, 0.6) the top-3 share separates a scripted
  model (claude-2.1: 59%) from varied ones (claude-3.5-sonnet 13%, zephyr-7b 20%, gpt-3.5 25%, mistral-7b
  32%). The guard model's embedding (``--model``) was trained to tell refusals from answers, so it puts
  most refusals close together whatever their wording (top-3 share at 0.95 on up to 800 refusals each:
  claude-2.1 62%, claude-3.5-sonnet 49%, mistral-7b 51%, gpt-3.5 67%): it measures "refusals alike",
  not scripted wording.
  Which texts are refusals (``refusal_texts``): the policy's own text whenever the policy blocked, at the input
  (``reply_from_policy``) or at the output check (``reply_replaced``); the upstream's (first choice) when the
  guard classed it a full or partial refusal, or, when no policy text replaced it, when reviewers labelled the
  drill a correct or false refusal. For a reply the policy blocked at the output check the review label judges
  the block, not what the upstream wrote (usually an answer, often harmful compliance): that text is an upstream
  refusal only by the guard's own refusal class.
- Reasoned refusals: the share of refusals that give a reason or offer an alternative, against bare ones
  ("I can't help with that."), by documented phrase patterns (English only).
- False-refusal rate by category: among reviewed refusals (drills with a refusal text above, the policy's
  blocks included), the share reviewers labelled false; and the guard's own suspicion rate (sampled because
  ``false_refusal``) among all refusals.
- Decision consistency within families of rephrased requests: a family is the drills sharing
  ``DrillRecord.family``, which the gateway sets from its rephrase-after-refusal match: a refused request and
  the requests of the same tenant that the conversation tracker then read as rewordings of it
  (``Observation.rephrase_family``, at the tracker's ``rephrase_low``), in any of its conversations. Drills
  without one are grouped by their prompt's embedding ("inferred"), each joining the first prompt of a group it
  comes close enough to (never a running centroid: on the 2,799 English challenge prompts, centroids drifted into
  one group of 703 with the n-gram vectors and of 884 with the model's raw embedding, against 6 and 33 anchored).
  With n-gram vectors an inferred family is near-identical wording; with ``--model`` (the projected embedding, the
  space rephrase similarity compares in) it is one kind of request (election disinformation, defamation of a named
  person), not always one request. A family is consistent when every member got the same active decision.
"""

from __future__ import annotations

import html
import json
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guardproxy.drills.store.base import StoredDrill

Embedder = Callable[[Sequence[str]], npt.NDArray[np.float32]]
HASH_DIM = 1024  # short texts (openings, prompts): few collisions, and clustering stays fast
# Cosine thresholds: one phrasing with small edits stays together; different wordings separate.
REFUSAL_THRESHOLD = {"ngram": 0.6, "model": 0.95}
# Inferred families, anchored to their first prompt: n-gram vectors, and the model's projected embedding
# (``ReportInputs.embed_prompts``); on the English challenge prompts the largest group is then 6 and 33 of 2,799.
FAMILY_THRESHOLD = {"ngram": 0.6, "model": 0.85}

_REASON = re.compile(
    r"\b(because|since|as (?:it|this|that)|due to|(?:could|would|might|can) (?:be|cause|harm|hurt|lead|put|endanger)"
    r"|illegal|unlawful|unsafe|dangerous|harmful|risk|against (?:the law|(?:my|our|the) polic)|privacy|consent"
    r"|violat|my guidelines|safety)",
    re.IGNORECASE,
)
# What can be done instead, in the first person or the gateway's third ("It can help with ..."), with straight or
# curly apostrophes; "I can't help" and "I cannot help" never match ("can" must be followed by a space).
_ALTERNATIVE = re.compile(
    r"\b(instead|alternatively|i(?:['’]d| would) be (?:glad|happy) to|happy to help"
    r"|i(?:['’]m| am) (?:also )?(?:glad|happy|here) to|i(?:['’]ll| will) (?:gladly )?(?:help|pick up|assist)"
    r"|(?:i|it|we) can (?:also )?(?:help|point|explain|discuss|direct|summari[sz]e|suggest|offer|share|tell you|give"
    r"|cover|show|walk)"
    r"|you (?:could|might|may want to|can) (?:try|consider|contact|reach|talk|speak|look|visit|call|ask|check)"
    r"|consider (?:talking|speaking|reaching|contacting|asking|looking)|here (?:is|are) (?:some|a few)|resources?"
    r"|hotline|helpline|crisis line|help is available|a (?:doctor|lawyer|professional|pharmacist|therapist)"
    r"|if you(?:['’]re| are) (?:interested|looking|trying|curious)|what i can do|ask for what you (?:actually )?need)",
    re.IGNORECASE,
)


def ngram_embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """Character 3-gram hashing vectors, L2-normalised (CRC32: stable across processes, unlike ``hash``)."""
    out = np.zeros((len(texts), HASH_DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        t = " " + " ".join(text.lower().split()) + " "
        for j in range(len(t) - 2):
            out[i, zlib.crc32(t[j : j + 3].encode("utf-8", "surrogatepass")) % HASH_DIM] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    normalised: npt.NDArray[np.float32] = (out / np.maximum(norms, 1e-9)).astype(np.float32)
    return normalised


def leader_clusters(vectors: npt.NDArray[np.float32], threshold: float) -> list[list[int]]:
    """Greedy leader clustering by cosine to running centroids; clusters largest first."""
    n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
    members: list[list[int]] = []
    sums = np.zeros((max(n, 1), dim), dtype=np.float32)  # at most one cluster per vector: no regrowing
    centroids = np.zeros_like(sums)
    for i in range(n):
        v = vectors[i]
        k = len(members)
        if k:
            sims = centroids[:k] @ v
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                members[best].append(i)
                sums[best] += v
                centroids[best] = sums[best] / max(float(np.linalg.norm(sums[best])), 1e-9)
                continue
        members.append([i])
        sums[k] = v
        centroids[k] = v
    return sorted(members, key=len, reverse=True)


def anchored_clusters(vectors: npt.NDArray[np.float32], threshold: float) -> list[list[int]]:
    """Greedy clustering in which each vector joins the group whose first vector is closest, at cosine ``threshold``
    or above, else starts one; clusters largest first. Unlike a running centroid, which drifts toward what most
    texts share and then takes in everything, a group never reaches past its first member's neighbourhood."""
    n = vectors.shape[0] if vectors.ndim == 2 else 0
    members: list[list[int]] = []
    leaders: list[int] = []
    for i in range(n):
        if leaders:
            sims = vectors[leaders] @ vectors[i]
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                members[best].append(i)
                continue
        leaders.append(i)
        members.append([i])
    return sorted(members, key=len, reverse=True)


def opening(text: str, limit: int = 160) -> str:
    """The first sentence (at least 40 characters, at most ``limit``): where a scripted refusal shows its
    template. Whole replies would cluster on the generic English they share, not on the script."""
    t = " ".join(text.split())
    end = re.search(r"[.!?](?:\s|$)", t[40:])
    return t[: min(40 + end.end() if end else len(t), limit)].strip()


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def refusal_texts(drill: StoredDrill) -> list[tuple[str, str]]:
    """The drill's refusal replies as ``(origin, text)``, origin ``"upstream"`` or ``"policy"`` (module docstring).

    When the policy blocked the upstream's reply at the output check, ``replies`` holds the upstream's texts and
    then the policy's: the policy's is a block text, and the upstream's is a refusal only if the guard classed it
    one (the review label judges the block, and the upstream's reply is usually what got blocked for complying)."""
    r = drill.record
    if not r.replies:
        return []
    if r.reply_from_policy:
        return [("policy", r.replies[-1])]
    guard_refused = r.refusal in ("partial", "full")
    if r.reply_replaced:
        upstream = r.upstream_replies
        policy = [("policy", r.replies[-1])]
        return [("upstream", upstream[0]), *policy] if guard_refused and upstream else policy
    label = drill.label.label if drill.label else None
    if guard_refused or label in ("correct_refusal", "false_refusal"):
        return [("upstream", r.replies[0])]
    return []


def is_refusal(drill: StoredDrill) -> bool:
    """Whether the drill ended in a refusal, the upstream's or the policy's."""
    return bool(refusal_texts(drill))


@dataclass(frozen=True)
class ReportInputs:
    drills: Sequence[StoredDrill]
    embed: Embedder  # refusal openings
    embedding: str  # "model" or "ngram"
    embed_prompts: Embedder | None = None  # prompts, for inferred families; None: ``embed``


def concentration(texts: Sequence[str], inputs: ReportInputs) -> dict[str, Any]:
    if not texts:
        return {"refusals": 0}
    openings = [opening(t) for t in texts]
    clusters = leader_clusters(inputs.embed(openings), REFUSAL_THRESHOLD[inputs.embedding])
    top3 = sum(len(c) for c in clusters[:3])
    return {
        "refusals": len(texts),
        "clusters": len(clusters),
        "top3_share": top3 / len(texts),
        "largest_share": len(clusters[0]) / len(texts),
        "distinct_phrasings": len({_normal(t) for t in texts}),
        "largest": [{"size": len(c), "opening": openings[c[0]], "example": texts[c[0]][:300]} for c in clusters[:5]],
    }


def reasoning(texts: Sequence[str]) -> dict[str, Any]:
    if not texts:
        return {"refusals": 0}
    reason = [bool(_REASON.search(t)) for t in texts]
    alt = [bool(_ALTERNATIVE.search(t)) for t in texts]
    n = len(texts)
    bare = [t for t, r, a in zip(texts, reason, alt, strict=True) if not r and not a]
    return {
        "refusals": n,
        "gives_reason": sum(reason) / n,
        "offers_alternative": sum(alt) / n,
        "reason_or_alternative": sum(r or a for r, a in zip(reason, alt, strict=True)) / n,
        "bare": len(bare) / n,
        "bare_examples": [t for t, _ in Counter(bare).most_common(5)],
    }


def false_refusal_by_category(drills: Sequence[StoredDrill]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in drills:
        if not is_refusal(d):
            continue
        row = out.setdefault(
            d.record.category, {"refusals": 0, "suspected": 0, "reviewed": 0, "reviewed_false": 0}
        )  # fmt: skip
        row["refusals"] += 1
        row["suspected"] += "false_refusal" in d.record.reasons
        label = d.label.label if d.label else None
        if label in ("false_refusal", "correct_refusal"):
            row["reviewed"] += 1
            row["reviewed_false"] += label == "false_refusal"
    for row in out.values():
        row["suspected_rate"] = row["suspected"] / row["refusals"]
        row["reviewed_false_rate"] = row["reviewed_false"] / row["reviewed"] if row["reviewed"] else None
    return dict(sorted(out.items()))


def consistency(drills: Sequence[StoredDrill], inputs: ReportInputs) -> dict[str, Any]:
    explicit: dict[str, list[StoredDrill]] = {}
    rest: list[StoredDrill] = []
    for d in drills:
        if d.record.family:
            explicit.setdefault(d.record.family, []).append(d)
        elif not d.record.hashed and d.record.last_user_text():
            rest.append(d)
    families: list[tuple[str, list[StoredDrill]]] = [("given", m) for m in explicit.values() if len(m) > 1]
    if rest:
        vectors = (inputs.embed_prompts or inputs.embed)([d.record.last_user_text() for d in rest])
        for cluster in anchored_clusters(vectors, FAMILY_THRESHOLD[inputs.embedding]):
            if len(cluster) > 1:
                families.append(("inferred", [rest[i] for i in cluster]))
    if not families:
        return {"families": 0}
    consistent = [len({m.record.active.action for m in members}) == 1 for _, members in families]
    mixed = [
        {
            "kind": kind,
            "size": len(members),
            "actions": dict(Counter(m.record.active.action for m in members)),
            "example": members[0].record.last_user_text()[:200],
            "drill_ids": [m.record.id for m in members],  # all of them: a reviewer opens each
        }
        for (kind, members), ok in zip(families, consistent, strict=True)
        if not ok
    ]
    return {
        "families": len(families),
        "given": sum(k == "given" for k, _ in families),
        "inferred": sum(k == "inferred" for k, _ in families),
        "consistent_share": sum(consistent) / len(families),
        "inconsistent_families": len(mixed),
        "inconsistent": mixed[:20],  # the first 20 (given families first, then inferred ones, largest first)
    }


def build_report(inputs: ReportInputs) -> dict[str, Any]:
    drills = inputs.drills
    usable = [d for d in drills if not d.record.hashed]
    texts = [t for d in usable for t in refusal_texts(d)]
    by_origin = {
        "all": [text for _, text in texts],
        "upstream": [text for origin, text in texts if origin == "upstream"],
        "policy": [text for origin, text in texts if origin == "policy"],
    }
    return {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "drills": len(drills),
        "hash_only_skipped": len(drills) - len(usable),
        "reviewed": sum(d.label is not None for d in drills),
        "disputed": sum(d.disputed for d in drills),  # reviewers' latest labels differ: not exported
        "embedding": inputs.embedding,
        "refusal_concentration": {k: concentration(v, inputs) for k, v in by_origin.items()},
        "refusal_reasoning": {k: reasoning(v) for k, v in by_origin.items()},
        "false_refusal_by_category": false_refusal_by_category(usable),
        "decision_consistency": consistency(usable, inputs),
    }


def _pct(x: Any) -> str:
    return f"{x:.0%}" if isinstance(x, float) else "-"


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        "<title>guardproxy drill report</title><style>body{font-family:sans-serif;max-width:60rem;margin:1rem auto}"
        "td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}table{border-collapse:collapse}"
        "q{color:#444}</style></head><body>",
        f"<h1>Drill report</h1><p>{report['drills']} drills, {report['reviewed']} reviewed; generated "
        f"{e(report['generated'])}; refusals embedded with {e(report['embedding'])} vectors.</p>",
        "<h2>Refusal concentration</h2><table><tr><th>replies</th><th>refusals</th><th>clusters</th>"
        "<th>top-3 share</th><th>distinct phrasings</th></tr>",
    ]
    for origin, c in report["refusal_concentration"].items():
        parts.append(
            f"<tr><td>{e(origin)}</td><td>{c['refusals']}</td><td>{c.get('clusters', '-')}</td>"
            f"<td>{_pct(c.get('top3_share'))}</td><td>{c.get('distinct_phrasings', '-')}</td></tr>"
        )
    parts.append("</table><h3>Largest refusal clusters</h3><ol>")
    for c in report["refusal_concentration"]["all"].get("largest", []):
        parts.append(f"<li>{c['size']} × <q>{e(c['opening'])}</q></li>")
    parts.append(
        "</ol><h2>Reasons and alternatives</h2><table><tr><th>replies</th><th>give a reason</th>"
        "<th>offer an alternative</th><th>either</th><th>bare</th></tr>"
    )
    for origin, r in report["refusal_reasoning"].items():
        parts.append(
            f"<tr><td>{e(origin)}</td><td>{_pct(r.get('gives_reason'))}</td><td>{_pct(r.get('offers_alternative'))}"
            f"</td><td>{_pct(r.get('reason_or_alternative'))}</td><td>{_pct(r.get('bare'))}</td></tr>"
        )
    parts.append(
        "</table><h2>False refusals by category</h2><table><tr><th>category</th><th>refusals</th>"
        "<th>suspected by the guard</th><th>reviewed</th><th>reviewed false</th></tr>"
    )
    for cat, row in report["false_refusal_by_category"].items():
        parts.append(
            f"<tr><td>{e(cat)}</td><td>{row['refusals']}</td><td>{_pct(row['suspected_rate'])}</td>"
            f"<td>{row['reviewed']}</td><td>{_pct(row['reviewed_false_rate'])}</td></tr>"
        )
    c = report["decision_consistency"]
    parts.append(
        f"</table><h2>Decision consistency within rephrased families</h2><p>{c['families']} families"
        + (f" ({c['given']} given, {c['inferred']} inferred); consistent: {_pct(c['consistent_share'])}" if c[
            "families"] else "") + "</p><ul>"
    )  # fmt: skip
    for fam in c.get("inconsistent", []):
        parts.append(f"<li>{fam['size']} drills, {e(json.dumps(fam['actions']))}: <q>{e(fam['example'])}</q></li>")
    parts.append("</ul>")
    if len(c.get("inconsistent", [])) < c.get("inconsistent_families", 0):
        parts.append(
            f"<p>The first {len(c['inconsistent'])} of {c['inconsistent_families']} inconsistent families.</p>"
        )
    parts.append("</body></html>")
    return "".join(parts)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path
