"""Identity swap: the same sentence with only the group or the place changed, scored as ``guardproxy score`` does.

    .venv/bin/python -m bench.identity_swap [--model DIR] [--json OUT] [--png OUT] [--scan FILE ...]

Every template of ``bench/identity_swap/templates.jsonl`` is filled with every group (``people`` templates) or
every country (``place`` templates) of ``groups.json`` and scored as ``guardproxy score`` does, under the
configured active policy (``policies/default.toml`` unless set). For each group it
reports the share of its harmless sentences the policy does not allow ("flagged") with their mean harm, and the
share of its harmful sentences flagged. The groups should not differ: a sentence's verdict should not turn on who
it is about. The summary gives each measure's range over the groups and the groups at its ends. Set and how it was
written: ``bench/identity_swap/README.md``. ``--scan`` also scores the rows of labelled prompt sets written by
others that name a group (``GROUP_WORDS``), to see whether the probe's pattern holds there. Prints, never passes or
fails.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from guardproxy.commands.score import load_model, row_scorer
from guardproxy.errors import ConfigError
from guardproxy.scoring import ParsedRow
from guardproxy.settings import PROJECT_ROOT

SET_DIR = PROJECT_ROOT / "bench" / "identity_swap"
SLOTS = {"people": "{g}", "place": "{c}"}  # a template's kind -> the placeholder the group or country fills
# ``--scan``: words that name a group of people, for finding such rows in labelled sets written by others.
GROUP_WORDS = re.compile(
    r"\b(muslims?|islam\w*|jews?|jewish|christians?|hindus?|sikhs?|buddhists?|atheists?|"
    r"black (?:people|men|women|person)|white people|asians?|latin[oa]s?|arabs?|roma|gypsies|native americans?|"
    r"indigenous|mexicans?|immigrants?|refugees?|migrants?|gay|lesbians?|trans(?:gender)?|bisexual|lgbt\w*|queer|"
    r"disabled|disabilit\w+|autis\w+|women|feminis\w+|race|racial|racis\w+|ethnic\w*|religio\w+)\b",
    re.IGNORECASE,
)


def load_set(directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The templates and the groups; a template without exactly one slot for its kind is a one-line error."""
    templates = []
    path = directory / "templates.jsonl"
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            slot = SLOTS[row["slot"]]
            ok = row["template"].count(slot) == 1 and row["label"] in ("benign", "harmful")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{n}: not a template row (slot people or place, template, label): {exc}") from exc
        if not ok:
            raise ValueError(f"{path}:{n}: a {row['slot']} template needs one {slot} and label benign or harmful")
        templates.append(row)
    groups = json.loads((directory / "groups.json").read_text(encoding="utf-8"))
    return templates, groups


def expand(templates: list[dict[str, Any]], groups: dict[str, Any]) -> list[dict[str, Any]]:
    """One item per template and group: its text, label, slot, group and the group's kind."""
    people = [(kind, g) for kind, names in groups["people"].items() for g in names]
    places = [("country", c) for c in groups["place"]]
    items = []
    for t in templates:
        for kind, name in people if t["slot"] == "people" else places:
            text = t["template"].replace(SLOTS[t["slot"]], name)
            items.append(
                {"template": t["id"], "slot": t["slot"], "label": t["label"], "kind": kind, "group": name, "text": text}
            )
    return items


def per_group(items: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per slot and group: harmless rows flagged and their mean harm, harmful rows flagged and their mean harm."""
    acc: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for item, res in zip(items, results, strict=True):
        cell = acc[(item["slot"], item["kind"], item["group"])]
        cell[f"{item['label']}_flagged"].append(float(res["action"] != "allow"))
        cell[f"{item['label']}_harm"].append(float(res["harm"]))
    out = []
    for (slot, kind, group), cell in acc.items():
        row: dict[str, Any] = {"slot": slot, "kind": kind, "group": group}
        for key in ("benign_flagged", "benign_harm", "harmful_flagged", "harmful_harm"):
            row[key] = round(statistics.mean(cell[key]), 4) if cell.get(key) else None
        row["benign_n"] = len(cell.get("benign_flagged", []))
        row["harmful_n"] = len(cell.get("harmful_flagged", []))
        out.append(row)
    return out


def spread(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The range of ``key`` over ``rows`` and the groups at its two ends."""
    have = [r for r in rows if r[key] is not None]
    if not have:
        return None
    lo, hi = min(have, key=lambda r: r[key]), max(have, key=lambda r: r[key])
    return {
        "min": lo[key],
        "min_group": lo["group"],
        "max": hi[key],
        "max_group": hi["group"],
        "range": round(hi[key] - lo[key], 4),
    }


def summary(groups: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for slot in ("people", "place"):
        rows = [g for g in groups if g["slot"] == slot]
        out[slot] = {k: spread(rows, k) for k in ("benign_flagged", "benign_harm", "harmful_flagged", "harmful_harm")}
    return out


def flagged_examples(
    items: list[dict[str, Any]], results: list[dict[str, Any]], label: str, flagged: bool
) -> list[dict[str, Any]]:
    """Harmless sentences the policy flagged (``flagged``) or harmful ones it let through, highest harm first."""
    hits = [
        {"group": i["group"], "template": i["template"], "harm": round(float(r["harm"]), 4), "text": i["text"]}
        for i, r in zip(items, results, strict=True)
        if i["label"] == label and (r["action"] != "allow") == flagged
    ]
    return sorted(hits, key=lambda h: -h["harm"])


def scan_rows(paths: list[Path]) -> list[ParsedRow]:
    """The labelled prompt rows (harmful, benign, borderline_benign) of ``paths`` that name a group of people."""
    from bench.script_coverage import prompt_rows

    return [r for r in prompt_rows(paths) if GROUP_WORDS.search(r.prompt)]


def scan_report(rows: list[ParsedRow], results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of the scanned rows each side has and flags, and the flagged harmless ones, highest harm first."""
    harmful = [res for row, res in zip(rows, results, strict=True) if (row.raw or {})["label"] == "harmful"]
    harmless = [(row, res) for row, res in zip(rows, results, strict=True) if (row.raw or {})["label"] != "harmful"]
    flagged = sorted(((res["harm"], row) for row, res in harmless if res["action"] != "allow"), key=lambda x: -x[0])
    return {
        "harmful": len(harmful),
        "harmful_flagged": sum(1 for res in harmful if res["action"] != "allow"),
        "harmless": len(harmless),
        "harmless_flagged": len(flagged),
        "flagged_harmless_rows": [{"id": row.id, "harm": round(h, 4), "prompt": row.prompt} for h, row in flagged],
    }


def render(model: str, groups: list[dict[str, Any]], summ: dict[str, Any]) -> str:
    lines = [f"model {model}, active policy; flagged = any action but allow", ""]
    lines.append(f"{'group':22s} {'kind':22s} {'harmless flagged':>17s} {'mean harm':>10s} {'harmful flagged':>16s}")
    for g in sorted(groups, key=lambda g: (g["slot"], g["kind"], g["group"])):
        hf = "-" if g["harmful_flagged"] is None else f"{g['harmful_flagged']:.0%} of {g['harmful_n']}"
        benign = "-" if g["benign_flagged"] is None else f"{g['benign_flagged']:.0%} of {g['benign_n']}"
        harm = "-" if g["benign_harm"] is None else f"{g['benign_harm']:.3f}"
        lines.append(f"{g['group']:22s} {g['kind']:22s} {benign:>17s} {harm:>10s} {hf:>16s}")
    lines.append("")
    for slot, measures in summ.items():
        for key, s in measures.items():
            if s is not None and s["range"] == 0:
                lines.append(f"{slot:6s} {key:16s} {s['min']:.3f} for every group")
            elif s is not None:
                lines.append(
                    f"{slot:6s} {key:16s} {s['min']:.3f} ({s['min_group']}) .. {s['max']:.3f} ({s['max_group']})"
                )
    return "\n".join(lines)


def plot(path: Path, model: str, groups: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def v(g: dict[str, Any], key: str) -> float:  # a measure the set gives no sentence for draws no bar
        return float("nan") if g[key] is None else float(g[key])

    def order(g: dict[str, Any]) -> tuple[float, float]:
        return (g["benign_flagged"] or 0.0, g["benign_harm"] or 0.0)

    people = sorted((g for g in groups if g["slot"] == "people"), key=order)
    places = sorted((g for g in groups if g["slot"] == "place"), key=order)
    fig, axes = plt.subplots(1, 3, figsize=(15, 9))
    y = list(range(len(people)))
    axes[0].barh(y, [v(g, "benign_flagged") for g in people], color="tab:green", label="share flagged")
    axes[0].plot([v(g, "benign_harm") for g in people], y, "k.", label="mean harm")
    axes[0].set_yticks(y, [f"{g['group']} ({g['kind']})" for g in people], fontsize=8)
    axes[0].set_title("people, harmless sentences")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].barh(y, [v(g, "harmful_flagged") for g in people], color="tab:red")
    axes[1].set_yticks(y, ["" for _ in people])
    axes[1].set_xlim(0, 1)
    axes[1].set_title("people, harmful sentences: share flagged")
    yp = list(range(len(places)))
    axes[2].barh(yp, [v(g, "benign_harm") for g in places], color="tab:blue")
    axes[2].set_yticks(yp, [g["group"] for g in places], fontsize=8)
    axes[2].set_title("places, harmless sentences: mean harm")
    axes[0].set_xlim(0, 1)
    axes[2].axvline(0.5, color="black", lw=0.8, ls="--")
    axes[2].set_xlim(0, 1)
    fig.suptitle(f"identity swap, {model} (harm on the operating scale; 0.5 is the line)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=PROJECT_ROOT / "models" / "guard-v1")
    parser.add_argument("--set", type=Path, default=SET_DIR, help="directory with templates.jsonl and groups.json")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument(
        "--scan", type=Path, nargs="*", default=[], help="labelled prompt sets: also score their rows that name a group"
    )
    args = parser.parse_args(argv)
    try:
        templates, groups = load_set(args.set)
    except (OSError, ValueError, KeyError) as exc:
        print(f"identity_swap: {exc}", file=sys.stderr)
        return 2
    try:
        scanned = scan_rows(args.scan)
    except (OSError, ConfigError) as exc:
        print(f"identity_swap: {exc}", file=sys.stderr)
        return 2
    items = expand(templates, groups)
    rows = [ParsedRow(line=i + 1, id=i, kind="prompt", prompt=item["text"]) for i, item in enumerate(items)]
    print(f"scoring {len(rows)} sentences with {args.model} ...", file=sys.stderr)
    classifier, policy = load_model(model=args.model, early_exit=False)
    try:
        model = f"{classifier.info.name} {classifier.info.version}"
        with row_scorer(classifier, policy) as scorer:
            results = scorer.score(rows)
            scan = scan_report(scanned, scorer.score(scanned)) if args.scan else None
    finally:
        classifier.close()
    by_group = per_group(items, results)
    summ = summary(by_group)
    print(render(model, by_group, summ))
    if scan is not None:
        print(
            f"\nscanned sets, rows naming a group: harmful {scan['harmful_flagged']} of {scan['harmful']} flagged, "
            f"harmless {scan['harmless_flagged']} of {scan['harmless']} flagged"
        )
    if args.json is not None:
        out = {
            "model": model,
            "sentences": len(items),
            "summary": summ,
            "groups": by_group,
            "harmless_flagged": flagged_examples(items, results, "benign", True),
            "harmful_allowed": flagged_examples(items, results, "harmful", False),
        }
        if scan is not None:
            out["scan"] = {"files": [str(p) for p in args.scan], **scan}
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    if args.png is not None:
        plot(args.png, model, by_group)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
