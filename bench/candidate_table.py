"""The judging table of guard-model candidates, read from their judged files: ``python -m bench.candidate_table``.

A candidate is judged by three commands whose JSON it keeps under one prefix (``bench/results/candidates/``):
``PREFIX.metrics.json`` (the trainer's), ``PREFIX.pooled.compare.json`` (``bench.candidate_compare`` on the pooled
English and other-language sets), ``PREFIX.conversation_eval.json`` (``bench.conversation_eval --tune``) and, where
run, ``PREFIX.identity_swap.json`` and ``PREFIX.identity_swap2.json`` (``bench.identity_swap``) and
``PREFIX.word_deletion.json`` (``bench.word_deletion``), ``PREFIX.end_punctuation.json``
(``bench.end_punctuation``), ``PREFIX.frames.json`` (``bench.frames``), ``PREFIX.ask_forms.json``
(``bench.ask_forms``) and ``PREFIX.helpful_replies.json`` (``bench.helpful_replies``). This prints the
figures the ship rules in ``bench/results/candidates/README.md`` name, one column per prefix and their mean, so a
verdict can be checked from the repo alone::

    python -m bench.candidate_table bench/results/candidates/2.25.1 bench/results/candidates/2.25.1-r

How each figure is counted (as the rules since 2.24.0 count them):

- harmless conversations: ``flagged x n`` of the ``tracker + last-turn`` row (the default policy) over dev
  ``mtbench:benign``, ``stitched:benign`` and ``authored:benign`` and the challenge sets' ``challenge:benign:ALL`` and
  ``challenge12:benign``; the rules' 379 leave out the authored dev chats whose first flag names the fourteenth batch
  (ids ``gp-long14*``, ``--leave-out``), which were not in the split when the bar was set;
- escalations caught: the same row over dev ``actorattack:escalation`` and ``challenge:escalation:ALL``;
- pooled sets: the candidate's AUROC and flag rates at its own line from ``candidate_compare``, and (where its file
  has them) the rows it decides apart from the baseline, each at its own line: harmful newly allowed / newly flagged
  / harmless newly flagged / newly allowed;
- identity probes: the ``people`` sentences only (template ids with a ``people`` part): harmless ones flagged,
  harmful ones flagged;
- one word deleted: the verdicts that deleting one form word turns (flagged rows cleared plus allowed rows flagged,
  harmful and harmless together), and the same over any word;
- the closing mark: harmful and harmless rows flagged (harm >= 0.5) in each form (no mark, "?", "."), and the
  verdicts that turn on the mark, both labels together;
- frames: of the harmful rows the candidate flags plain, the share still flagged inside a frame (``kept``), and of
  the harmless rows it allows plain, the share flagged inside one (``added``); the mean over the frames and the
  worst frame;
- ask forms: the shares flagged of the probe's three cells (make-asks for a hazard, make-asks for a home-made thing,
  about-asks for a hazard), and the hazards flagged in every make-form.

- helpful replies: the dev harmless chats' replies read as refusals (both sets, and those not in English), the
  challenge sets' harmless chats' replies read as refusals, and per pairs file its helpful replies read as refusals
  and its refusals read as ``none``.
A file that is missing leaves its rows empty ("-"); a file that is there but lacks a field the table needs is an
error naming the file and the field. The output is a Markdown table; ``--json`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.candidate_compare import CHANGES
from bench.conversation_eval import CHALLENGE_SETS  # bench.helpful_replies's blind chats; its other sets are dev

POLICY_ROW = "tracker + last-turn"
HARMLESS_SETS = (
    "dev/mtbench:benign",
    "dev/stitched:benign",
    "dev/authored:benign",
    "challenge/challenge:benign:ALL",
    "challenge/challenge12:benign",
)
ESCALATION_SETS = ("dev/actorattack:escalation", "challenge/challenge:escalation:ALL")
POOLED = (("English pooled", "harm_english_pooled.jsonl"), ("other languages pooled", "harm_multilingual_pooled.jsonl"))
DEFAULT_LEAVE_OUT = "gp-long14"


class TableError(Exception):
    """A judged file that cannot be read as the table needs: the message names the file and what is wrong."""


@dataclass
class Column:
    """One candidate's figures (a row is absent where its file was not there)."""

    prefix: str
    values: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # count | rate | score | line: how the row is printed
    parts: dict[str, str] = field(default_factory=dict)  # how a count breaks down by set, for the table

    def put(self, row: str, value: float, kind: str, parts: str | None = None) -> None:
        self.values[row] = value
        self.kinds[row] = kind
        if parts is not None:
            self.parts[row] = parts


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object")
    return data


def _get(data: dict[str, Any], path: Path, *keys: str) -> Any:
    cur: Any = data
    for key in keys:
        if not isinstance(cur, dict) or key not in cur:
            raise TableError(f"{path}: no field {'/'.join(keys)}")
        cur = cur[key]
    return cur


def _count(row: dict[str, Any], path: Path, name: str) -> int:
    try:
        return round(float(row["flagged"]) * int(row["n"]))
    except (KeyError, TypeError, ValueError):
        raise TableError(f"{path}: {name}/{POLICY_ROW} has no numeric 'flagged' and 'n'") from None


def conversation_counts(data: dict[str, Any], path: Path, leave_out: str | None) -> dict[str, Any]:
    """Harmless conversations flagged (total, per set, and the total less ``leave_out`` ids) and escalations caught."""
    results = _get(data, path, "results")
    per_set: dict[str, int] = {}
    left_out = 0
    n_total = 0
    for name in HARMLESS_SETS:
        sets = _get(results, path, name)
        row = _get(sets, path, POLICY_ROW)
        per_set[name] = _count(row, path, name)
        n_total += int(row["n"])
        if leave_out and name == "dev/authored:benign":
            flags = _get(sets, path, "first_flags")
            left_out = sum(1 for f in flags if str(f.get("id", "")).startswith(leave_out))
    caught = {name: _count(_get(_get(results, path, name), path, POLICY_ROW), path, name) for name in ESCALATION_SETS}
    n_escalations = sum(int(results[name][POLICY_ROW]["n"]) for name in ESCALATION_SETS)
    total = sum(per_set.values())
    return {
        "harmless_flagged": total,
        "harmless_n": n_total,
        "harmless_flagged_kept": total - left_out,
        "harmless_left_out_flagged": left_out,
        "harmless_by_set": per_set,
        "escalations_caught": sum(caught.values()),
        "escalations_n": n_escalations,
        "escalations_by_set": caught,
    }


def _about_people(entry: dict[str, Any]) -> bool:
    # template ids name their slot: people-benign-5 in the first set, b2-people-harmful-9 in the blind one
    return "people" in str(entry.get("template", "")).split("-")


def identity_counts(data: dict[str, Any], path: Path) -> dict[str, int]:
    """Harmless ``people`` sentences flagged, and harmful ones flagged, with their totals."""
    groups = [g for g in _get(data, path, "groups") if g.get("slot") == "people"]
    if not groups:
        raise TableError(f"{path}: no 'people' groups")
    benign_n = sum(int(g["benign_n"]) for g in groups)
    harmful_n = sum(int(g["harmful_n"]) for g in groups)
    flagged = [f for f in _get(data, path, "harmless_flagged") if _about_people(f)]
    allowed = [f for f in _get(data, path, "harmful_allowed") if _about_people(f)]
    return {
        "harmless_flagged": len(flagged),
        "harmless_n": benign_n,
        "harmful_flagged": harmful_n - len(allowed),
        "harmful_n": harmful_n,
    }


def deletion_counts(data: dict[str, Any], path: Path) -> dict[str, int]:
    """Verdicts one deletion turns, over form words and over any word, both labels together, and the rows probed."""
    out = {"form_word": 0, "any_word": 0, "n": 0}
    for label in ("harmful", "harmless"):
        side = _get(data, path, "summary", label)
        out["n"] += int(_get(side, path, "n"))
        out["form_word"] += int(side["flagged_one_form_deletion_unflags"]) + int(
            side["allowed_one_form_deletion_flags"]
        )
        out["any_word"] += int(side["flagged_one_deletion_unflags"]) + int(side["allowed_one_deletion_flags"])
    return out


def read_column(prefix: str, leave_out: str | None) -> tuple[Column, dict[str, Any]]:
    col = Column(prefix)
    raw: dict[str, Any] = {"prefix": prefix}
    base = Path(prefix)

    def path(suffix: str) -> Path:
        return base.with_name(base.name + suffix)

    conv_path = path(".conversation_eval.json")
    conv = _load(conv_path)
    if conv is not None:
        c = conversation_counts(conv, conv_path, leave_out)
        raw["conversations"] = c
        by_set = "+".join(str(v) for v in c["harmless_by_set"].values())
        col.put(f"harmless conversations flagged (of {c['harmless_n']})", c["harmless_flagged"], "count", by_set)
        if leave_out:
            col.put(f"the same without {leave_out}* chats", c["harmless_flagged_kept"], "count")
        by_set = "+".join(str(v) for v in c["escalations_by_set"].values())
        col.put(f"escalations caught (of {c['escalations_n']})", c["escalations_caught"], "count", by_set)
    cmp_path = path(".pooled.compare.json")
    cmp = _load(cmp_path)
    if cmp is not None:
        _put_pooled(col, raw, cmp, cmp_path)
    met_path = path(".metrics.json")
    met = _load(met_path)
    if met is not None:
        col.put("harm line", float(_get(met, met_path, "options", "harm_threshold")), "line")
        phtest = float(_get(met, met_path, "dev", "harm", "flag_rate_borderline_benign"))
        col.put("dev: PHTest harmless flagged", phtest, "rate")
        refusal = _get(met, met_path, "dev", "refusal", "all", "model")
        col.put("dev: refusal binary F1", float(refusal["binary_f1"]), "score")
        col.put("dev: refusal macro-F1", float(refusal["macro_f1"]), "score")
    for suffix, label in ((".identity_swap.json", "identity"), (".identity_swap2.json", "identity, blind set")):
        id_path = path(suffix)
        data = _load(id_path)
        if data is None:
            continue
        counts = identity_counts(data, id_path)
        raw[label] = counts
        n = counts["harmless_n"]
        col.put(f"{label}: harmless about people flagged (of {n})", counts["harmless_flagged"], "count")
        n = counts["harmful_n"]
        col.put(f"{label}: harmful about people flagged (of {n})", counts["harmful_flagged"], "count")
    wd_path = path(".word_deletion.json")
    wd = _load(wd_path)
    if wd is not None:
        try:
            counts = deletion_counts(wd, wd_path)
        except (KeyError, TypeError, ValueError):
            raise TableError(f"{wd_path}: summary lacks a numeric deletion count") from None
        raw["word deletion"] = counts
        col.put(f"verdicts one form word turns (of {counts['n']})", counts["form_word"], "count")
        col.put(f"verdicts any one word turns (of {counts['n']})", counts["any_word"], "count")
    ep_path = path(".end_punctuation.json")
    ep = _load(ep_path)
    if ep is not None:
        _put_end_punctuation(col, raw, ep, ep_path)
    fr_path = path(".frames.json")
    fr = _load(fr_path)
    if fr is not None:
        _put_frames(col, raw, fr, fr_path)
    af_path = path(".ask_forms.json")
    af = _load(af_path)
    if af is not None:
        _put_ask_forms(col, raw, af, af_path)
    hr_path = path(".helpful_replies.json")
    hr = _load(hr_path)
    if hr is not None:
        raw["helpful replies"] = helpful_counts(hr, hr_path)
        for row, (value, parts) in raw["helpful replies"].items():
            col.put(row, value, "count", parts)
    return col, raw


def _put_pooled(col: Column, raw: dict[str, Any], cmp: dict[str, Any], cmp_path: Path) -> None:
    for label, name in POOLED:
        cand = _get(cmp, cmp_path, "sets", name, "candidate")
        raw[label] = cand
        col.put(f"{label}: AUROC", float(cand["auroc"]), "score")
        col.put(f"{label}: harmful flagged", float(cand["harmful_flagged"]), "rate")
        col.put(f"{label}: harmless flagged", float(cand["harmless_flagged"]), "rate")
        changed = cand.get("decisions_changed")  # candidate_compare since 2026-12-07
        if changed is not None:
            parts = "/".join(str(int(changed.get(k, 0))) for k in CHANGES)
            col.put(f"{label}: decisions changed against the baseline", sum(map(int, changed.values())), "count", parts)


def _put_end_punctuation(col: Column, raw: dict[str, Any], ep: dict[str, Any], ep_path: Path) -> None:
    turned = 0
    for label in ("harmful", "harmless"):
        for form, name in (("none", "no mark"), ("?", '"?"'), (".", '"."')):
            share = _get(ep, ep_path, "summary", label, "flagged_share", form)
            col.put(f"closing mark: {label} flagged, {name}", float(share), "rate")
        turned += int(_get(ep, ep_path, "summary", label, "turned"))
    raw["end punctuation"] = {"turned": turned}
    col.put("verdicts the closing mark turns", turned, "count")


def _put_ask_forms(col: Column, raw: dict[str, Any], af: dict[str, Any], af_path: Path) -> None:
    cells = {
        "make_hazard": "ask forms: make-asks for a hazard flagged",
        "make_lookalike": "ask forms: make-asks for a home-made thing flagged",
        "about_hazard": "ask forms: about-asks for a hazard flagged",
    }
    raw["ask forms"] = {}
    for cell, row in cells.items():
        share = float(_get(af, af_path, "summary", "cells", cell, "share"))
        raw["ask forms"][cell] = share
        col.put(row, share, "rate")
    every = int(_get(af, af_path, "summary", "hazards_flagged_in_every_make_form"))
    n = len(_get(af, af_path, "summary", "things", "make_hazard"))
    col.put(f"ask forms: hazards flagged in every make-form (of {n})", every, "count")


def _put_frames(col: Column, raw: dict[str, Any], fr: dict[str, Any], fr_path: Path) -> None:
    names = [name for name in _get(fr, fr_path, "frames") if name != "plain"]
    kept = [float(_get(fr, fr_path, "summary", "frames", n, "kept_share")) for n in names]
    added = [float(_get(fr, fr_path, "summary", "frames", n, "added_share")) for n in names]
    raw["frames"] = {"kept": dict(zip(names, kept, strict=True)), "added": dict(zip(names, added, strict=True))}
    col.put(f"frames: harmful flags kept, mean of {len(names)}", sum(kept) / len(kept), "rate")
    col.put("frames: harmful flags kept, worst frame", min(kept), "rate")
    col.put(f"frames: harmless asks flagged framed, mean of {len(names)}", sum(added) / len(added), "rate")
    col.put("frames: harmless asks flagged framed, worst frame", max(added), "rate")


def helpful_counts(data: dict[str, Any], path: Path) -> dict[str, tuple[int, str | None]]:
    """``bench.helpful_replies``'s counts by row name: the dev chats' helpful replies read as refusals (all, and those
    not in English), the challenge sets' chats' the same, and of each pairs file its helpful replies read as refusals
    and its refusals read as none."""
    out: dict[str, tuple[int, str | None]] = {}
    chats = _get(data, path, "conversations")
    read, n, other_read, other_n = 0, 0, 0, 0
    dev = sorted(k for k in chats if k not in CHALLENGE_SETS)
    for name in dev:
        read += int(_get(chats, path, name, "read_as_refusal"))
        n += int(_get(chats, path, name, "n"))
        for language, v in _get(chats, path, name, "by_language").items():
            if language != "en":
                other_read, other_n = other_read + int(v["read_as_refusal"]), other_n + int(v["n"])
    out[f"dev chats: helpful replies read as refusals (of {n})"] = (
        read,
        "+".join(str(chats[k]["read_as_refusal"]) for k in dev),
    )
    out[f"dev chats: the same, replies not in English (of {other_n})"] = (other_read, None)
    blind = sorted(k for k in chats if k in CHALLENGE_SETS)  # in the files written since 2026-12-07 04:00 UTC
    if blind:
        n = sum(int(_get(chats, path, k, "n")) for k in blind)
        read = sum(int(_get(chats, path, k, "read_as_refusal")) for k in blind)
        out[f"challenge chats: helpful replies read as refusals (of {n})"] = (
            read,
            "+".join(str(chats[k]["read_as_refusal"]) for k in blind),
        )
    for file, rep in _get(data, path, "pairs").items():
        name = Path(file).stem
        try:
            helpful, misread = int(rep["helpful"]), int(rep["helpful_read_as_refusal"])
            refusals = int(rep["n"]) - helpful
            missed = sum(int(v.get("refusal_read_as_none", 0)) for v in rep["by_voice"].values())
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TableError(f"{path}: pairs/{file} lacks its counts (n, helpful, by_voice)") from None
        out[f"{name}: helpful read as refusals (of {helpful})"] = (misread, None)
        out[f"{name}: refusals read as none (of {refusals})"] = (missed, None)
    return out


def _fmt(kind: str, value: float, mean: bool = False) -> str:
    if kind == "rate":
        return f"{100 * value:.1f}%"
    if kind == "count":
        return f"{value:.1f}" if mean else f"{value:.0f}"
    if kind == "line":
        return f"{value:.3f}" if mean else f"{value:.2f}"
    return f"{value:.4f}" if mean else f"{value:.3f}"


def render(columns: Sequence[Column]) -> str:
    """One row per figure, one column per candidate, and their mean where every candidate has the figure."""
    kinds: dict[str, str] = {}
    for col in columns:
        for row, kind in col.kinds.items():
            kinds.setdefault(row, kind)
    many = len(columns) > 1
    head = "| figure | " + " | ".join(Path(c.prefix).name for c in columns) + (" | mean |" if many else " |")
    lines = [head, "|---|" + "---:|" * (len(columns) + many)]
    for row, kind in kinds.items():
        cells = []
        for col in columns:
            v = col.values.get(row)
            cells.append("-" if v is None else _fmt(kind, v) + (f" ({col.parts[row]})" if row in col.parts else ""))
        if many:
            vals = [col.values[row] for col in columns if row in col.values]
            cells.append(_fmt(kind, statistics.fmean(vals), mean=True) if len(vals) == len(columns) else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.candidate_table", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    ap.add_argument(
        "prefix", nargs="+", help="a candidate's judged files without their suffix (PREFIX.metrics.json...)"
    )
    ap.add_argument(
        "--leave-out",
        default=DEFAULT_LEAVE_OUT,
        help=f"id prefix of dev authored chats counted apart (default {DEFAULT_LEAVE_OUT!r}; '' counts all)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        pairs = [read_column(p, args.leave_out or None) for p in args.prefix]
    except TableError as exc:
        print(f"candidate_table: {exc}", file=sys.stderr)
        return 2
    columns = [c for c, _ in pairs]
    if not any(c.values for c in columns):
        print("candidate_table: none of the prefixes has a judged file", file=sys.stderr)
        return 2
    print(render(columns))
    if args.json:
        args.json.write_text(
            json.dumps({"columns": [c.values for c in columns], "raw": [r for _, r in pairs]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
