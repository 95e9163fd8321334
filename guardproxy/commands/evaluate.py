"""``guardproxy eval FILE.jsonl...``: metrics for labelled files in the ``../shared/data`` formats.

Prompt rows (``label``): harm AUROC (``harmful`` against ``benign`` + ``borderline_benign``; ``jailbreak`` and
``policy_restricted`` apart), per harmful source against the pooled negatives, and flag/block rates under the
policy per source and label. Response rows (``refusal``, ``prompt_label``): refusal 3-way macro-F1, binary F1
and false-refusal precision/recall per source, beside every keyword baseline of
``baselines/refusal_keyword_lists.json`` scored by its own matching rule. Conversation rows (``label``): flagged
rate, share flagged before the final user turn and median first-flag turn per label.

A source is the file (``prompts/advbench.jsonl`` → ``advbench``; ``responses/phtest/claude-2.1.jsonl`` →
``phtest/claude-2.1``), or file and a row field with ``--group-by FIELD``. ``--group-by unreadable`` (where rows have no
such field) splits prompt rows by what the model could read: ``can read`` or ``cannot read`` (``unreadable`` at or
above ``signals.UNREADABLE``: mostly letters of scripts its vocabulary spells one by one).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from guardproxy.classifier import OnnxClassifier, Thresholds
from guardproxy.commands.score import add_model_options, load_model_and_policy, open_input, row_scorer
from guardproxy.errors import ConfigError
from guardproxy.evaluation import (
    ConversationRecord,
    KeywordBaseline,
    PromptRecord,
    ResponseRecord,
    conversation_report,
    keyword_free,
    load_baselines,
    prompt_report,
    response_report,
)
from guardproxy.policy import Policy
from guardproxy.scoring import ParsedRow, Progress, RowError, parse_row, read_jsonl
from guardproxy.settings import PROJECT_ROOT, load_settings
from guardproxy.signals import readable_side

DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data"
DEFAULT_BASELINES = DEFAULT_DATA / "baselines" / "refusal_keyword_lists.json"
CHUNK_ROWS = 64


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="labelled JSONL files (prompts, responses, conversations)")
    add_model_options(parser)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every metric as JSON")
    parser.add_argument("--png", type=Path, default=None, metavar="OUT", help="plot score distributions per label")
    parser.add_argument("--baselines", type=Path, default=DEFAULT_BASELINES, help="keyword refusal baseline lists")
    parser.add_argument("--sample", type=int, default=None, help="score at most N rows per file (fixed by id hash)")
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="FIELD",
        help="split sources by this row field too; 'unreadable': by whether the model could read the prompt",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--split",
        choices=("dev", "calibration", "train"),
        default=None,
        help="keep only the rows the model's trainer put in this split (recomputed from --data and the seed in "
        "the model's config.json, exactly as training assigned it); rows it never saw are dropped",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data root, for --split")


def source_name(path: Path) -> str:
    # Files one level below a data-kind folder (responses/phtest/<model>.jsonl) keep that folder in their name.
    if path.parent.parent.name in ("prompts", "responses", "conversations"):
        return f"{path.parent.name}/{path.stem}"
    return path.stem


def load_rows(path: Path, sample: int | None) -> list[ParsedRow]:
    """A labeled JSONL file's rows, parsed; a bad line raises ``ConfigError`` naming the file and line. ``sample``
    keeps a fixed subset of that many rows."""
    rows = []
    with open_input(path) as stream:
        for line, obj in read_jsonl(stream):
            if isinstance(obj, RowError):
                raise ConfigError(str(obj), where=f"{path}:{line}")
            try:
                rows.append(parse_row(line, obj))
            except RowError as exc:
                raise ConfigError(str(exc), where=f"{path}:{line}") from exc
    if sample is not None and len(rows) > sample:
        # A fixed, unbiased subset: the rows whose id hashes lowest (files are often sorted by category).
        rows = sorted(rows, key=lambda r: hashlib.sha256(str(r.id).encode()).digest())[:sample]
        rows.sort(key=lambda r: r.line)
    return rows


class Collector:
    """Turns scored rows into metric records."""

    def __init__(self, baselines: list[KeywordBaseline]) -> None:
        self.baselines = baselines
        self.prompts: list[PromptRecord] = []
        self.responses: list[ResponseRecord] = []
        self.conversations: list[ConversationRecord] = []
        self.skipped = 0

    def add(self, source: str, row: ParsedRow, result: dict[str, Any]) -> None:
        raw = row.raw or {}
        if row.kind == "prompt":
            if not isinstance(raw.get("label"), str):
                self.skipped += 1
                return
            self.prompts.append(
                PromptRecord(source, raw["label"], result["harm"], result["jailbreak"], result["action"])
            )
        elif row.kind == "response":
            gold = raw.get("refusal")
            compliance = raw.get("harmful_compliance_human_majority", raw.get("reply_harm"))
            self.responses.append(
                ResponseRecord(
                    source=source,
                    prompt_label=raw.get("prompt_label"),
                    gold_refusal=gold if gold in ("none", "partial", "full") else None,
                    refusal=result["refusal"],
                    harm=result["harm"],
                    reply_harm=result["reply_harm"],
                    harmful_compliance=None if compliance is None else bool(compliance),
                    keyword_refused=tuple(b.refused(row.response) for b in self.baselines),
                    keyword_free=keyword_free(row.response, self.baselines),
                    refusal_score=result["refusal_probs"][1] + result["refusal_probs"][2],
                )
            )
        else:
            if not isinstance(raw.get("label"), str):
                self.skipped += 1
                return
            turns = result["turns"]
            first = next((k for k, t in enumerate(turns, start=1) if t["action"] != "allow"), None)
            marked = raw.get("first_harmful_index")
            self.conversations.append(
                ConversationRecord(
                    source,
                    raw["label"],
                    len(turns),
                    first,
                    first_harmful_index=marked if isinstance(marked, int) and not isinstance(marked, bool) else None,
                    first_flag_index=result["first_flag_index"],
                )
            )


def run(args: argparse.Namespace) -> int:
    baselines = load_baselines(args.baselines)
    files = [(path, load_rows(path, args.sample)) for path in args.files]
    if args.group_by:
        check_group_by(args.group_by, files)
    classifier, policy = load_model_and_policy(args)
    if args.split:
        model_dir = args.model or load_settings().guard.model_dir
        files = _keep_split(files, args.split, args.data, Path(model_dir))
    try:
        collector = score_files(classifier, policy, files, baselines, args)
    finally:
        classifier.close()
    metrics: dict[str, Any] = {
        "model": {"name": classifier.info.name, "version": classifier.info.version},
        "policy": policy.ref,
        "files": [str(p) for p, _rows in files],
        "sample": args.sample,
    }
    if collector.prompts:
        metrics["prompts"] = prompt_report(collector.prompts, policy.harm_threshold)
    if collector.responses:
        metrics["responses"] = response_report(collector.responses, [b.name for b in baselines], policy.harm_threshold)
    if collector.conversations:
        metrics["conversations"] = conversation_report(collector.conversations)
    metrics["unlabelled_rows_skipped"] = collector.skipped
    print(render_tables(metrics))
    if args.json:
        args.json.write_text(json.dumps(_clean(metrics), indent=1) + "\n", encoding="utf-8")
        print(f"metrics written to {args.json}", file=sys.stderr)
    if args.png:
        plot_distributions(collector, args.png, policy.harm_threshold, classifier.thresholds)
        print(f"score distributions written to {args.png}", file=sys.stderr)
    return 0


def check_group_by(name: str, files: list[tuple[Path, list[ParsedRow]]]) -> None:
    """Raise ``ConfigError`` when no row of any file has the field ``--group-by`` names (a typo would group
    nothing, silently); ``unreadable`` is always allowed."""
    fields = {key for _path, rows in files for row in rows for key in (row.raw or {})}
    if name != "unreadable" and name not in fields:
        allowed = ", ".join(sorted(fields - {"id"}) + ["unreadable"])
        raise ConfigError(f"--group-by {name}: no row has this field; fields: {allowed}")


def trainer_split_of_ids(data: Path, seed: int, chat_turns: bool = False) -> dict[str, str]:
    """Row id -> the split training assigned (``dev``, ``calibration``, ``train``); ``?`` for an id that several
    rows share across splits. Uses the trainer's own loader and splitter (pure Python, no torch)."""
    sources = importlib.import_module("guardproxy.training.sources")  # outside mypy's strict scope
    splits = importlib.import_module("guardproxy.training.splits")
    examples = sources.load_all(data, seed=seed, chat_turns=chat_turns)
    splits.assign_splits(examples, seed)
    out: dict[str, str] = {}
    for e in examples:
        rid = (e.meta or {}).get("id")
        if rid is None:
            continue
        key = str(rid)
        out[key] = e.split if out.get(key, e.split) == e.split else "?"
    return out


def _keep_split(
    files: list[tuple[Path, list[ParsedRow]]], split: str, data: Path, model_dir: Path
) -> list[tuple[Path, list[ParsedRow]]]:
    if not data.is_dir():
        raise ConfigError(f"--split needs the training data: no directory {data} (set --data)")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    seed = int(config.get("data", {}).get("seed", 0))
    by_id = trainer_split_of_ids(data, seed, bool(config.get("data", {}).get("chat_turns", False)))
    kept_files, kept, total, unknown = [], 0, 0, 0
    for path, rows in files:
        keep = [r for r in rows if by_id.get(str(r.id)) == split]
        unknown += sum(1 for r in rows if str(r.id) not in by_id)
        kept_files.append((path, keep))
        kept, total = kept + len(keep), total + len(rows)
    print(
        f"--split {split}: kept {kept} of {total} rows (seed {seed}; {unknown} rows training never saw, dropped)",
        file=sys.stderr,
    )
    return kept_files


def score_files(
    classifier: OnnxClassifier,
    policy: Policy,
    files: list[tuple[Path, list[ParsedRow]]],
    baselines: list[KeywordBaseline],
    args: argparse.Namespace,
) -> Collector:
    collector = Collector(baselines)
    total = sum(len(rows) for _p, rows in files)
    progress = Progress("eval", total, enabled=not args.no_progress)
    with row_scorer(classifier, policy) as scorer:
        for path, rows in files:
            base = source_name(path)
            for start in range(0, len(rows), CHUNK_ROWS):
                chunk = rows[start : start + CHUNK_ROWS]
                for row, result in zip(chunk, scorer.score(chunk), strict=True):
                    source = base
                    if args.group_by and row.raw and args.group_by in row.raw:
                        source = f"{base}:{row.raw[args.group_by]}"
                    elif args.group_by == "unreadable" and "unreadable" in result:
                        source = f"{base}:{readable_side(result['unreadable'])}"
                    collector.add(source, row, result)
                progress.update(len(chunk), len(chunk))  # "bytes" are rows here: the total is known
    progress.close()
    return collector


def _clean(value: Any) -> Any:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _f(x: Any) -> str:
    if isinstance(x, float):
        return "  -  " if math.isnan(x) else f"{x:.3f}"
    return str(x)


def _numeric(x: Any) -> bool:
    return isinstance(x, int | float) or x == ""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_f(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    # Text columns (the first, and any whose values are not numbers) read best left-aligned.
    text = [i == 0 or not all(_numeric(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if text[i] else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_tables(m: dict[str, Any]) -> str:
    out = [f"model {m['model']['name']} {m['model']['version']}, policy {m['policy']}"]
    if "prompts" in m:
        p = m["prompts"]
        out += [
            "",
            "PROMPTS  harm AUROC (harmful vs benign + borderline_benign): " + _f(p["harm_auroc"]),
            f"  jailbreak label: harm AUROC {_f(p['jailbreak_label_harm_auroc'])}, "
            f"jailbreak-head AUROC {_f(p['jailbreak_label_jailbreak_auroc'])}; "
            f"policy_restricted: harm AUROC {_f(p['policy_restricted_harm_auroc'])}",
        ]
        if p["harmful_source_auroc"]:
            out += [
                "",
                _table(
                    ["harmful source", "AUROC vs all negatives"], list(map(list, p["harmful_source_auroc"].items()))
                ),
            ]
        rows = [
            [v["source"], v["label"], v["n"], v["mean_harm"], v["flag_rate"], v["block_rate"], v["over_threshold_rate"]]
            for v in p["by_source"].values()
        ]
        rows += [
            ["(all)", lab, v["n"], v["mean_harm"], v["flag_rate"], v["block_rate"], v["over_threshold_rate"]]
            for lab, v in p["by_label"].items()
        ]
        out += ["", _table(["source", "label", "n", "mean harm", "flagged", "blocked", "harm>=thr"], rows)]
        out.append("  flagged = action not allow under the policy: recall for harmful rows, over-flag rate otherwise")
    if "responses" in m:
        out += ["", "RESPONSES  refusal detection: model vs keyword baselines"]
        rows = []
        for source, s in m["responses"].items():
            mm = s["model"]
            rows.append(
                [
                    source,
                    "guard model",
                    s["n_refusal_labelled"],
                    mm["macro_f1"],
                    mm["binary_f1"],
                    mm["false_refusal_precision"],
                    mm["false_refusal_recall"],
                    s["reply_harm_auroc"],
                ]
            )
            for name, b in s["baselines"].items():
                rows.append(
                    [
                        "",
                        name,
                        "",
                        b["macro_f1"],
                        b["binary_f1"],
                        b["false_refusal_precision"],
                        b["false_refusal_recall"],
                        "",
                    ]
                )
        out.append(
            _table(
                ["source", "detector", "n", "macro-F1", "binary F1", "FR prec", "FR recall", "reply-harm AUROC"], rows
            )
        )
        rows = [
            [
                src,
                s["keyword_free"]["n"],
                s["keyword_free"]["n_refusals"],
                s["keyword_free"]["refusal_recall"],
                s["keyword_free"]["binary_f1"],
                s["keyword_free"]["macro_f1"],
            ]
            for src, s in m["responses"].items()
        ]
        out += [
            "",
            "  replies no keyword baseline matches:",
            _table(["source", "n", "refusals", "recall", "binary F1", "macro-F1"], rows),
        ]
    if "conversations" in m:
        rows = [
            [
                lab,
                v["n"],
                v["flagged_rate"],
                v["flagged_before_final_rate"],
                v["median_first_flag_turn"],
                v["median_user_turns"],
            ]
            for lab, v in m["conversations"].items()
        ]
        out += [
            "",
            "CONVERSATIONS",
            _table(["label", "n", "flagged", "before final turn", "median first flag", "median turns"], rows),
        ]
        marked = [
            [lab, v["n_marked"], v["flagged_by_first_harmful_rate"], v["flagged_before_first_harmful_rate"]]
            for lab, v in m["conversations"].items()
            if "n_marked" in v
        ]
        if marked:
            out += [
                "  where rows mark the first clearly harmful turn:",
                _table(["label", "n", "flagged by that turn", "flagged before it"], marked),
            ]
    if m.get("unlabelled_rows_skipped"):
        out.append(f"\n{m['unlabelled_rows_skipped']} unlabelled rows skipped")
    return "\n".join(out)


Panel = tuple[str, dict[str, list[float]], float | None]  # title, values per group, threshold line


def _panels(c: Collector, harm_threshold: float, model: Thresholds) -> list[Panel]:
    panels: list[tuple[str, dict[str, list[float]], float | None]] = []
    if c.prompts:
        by: dict[str, list[float]] = {}
        for r in c.prompts:
            by.setdefault(r.label, []).append(r.harm)
        panels.append(("prompt harm by label", by, harm_threshold))
    if c.responses:
        by = {}
        for rr in c.responses:
            if rr.gold_refusal is not None:
                by.setdefault(f"gold {rr.gold_refusal}", []).append(rr.refusal_score)
        if by:
            panels.append(("refusal score p(partial) + p(full) by gold class", by, model.refusal_partial))
        by_h: dict[str, list[float]] = {}
        for rr in c.responses:
            if rr.harmful_compliance is not None:
                by_h.setdefault("complied" if rr.harmful_compliance else "did not comply", []).append(rr.reply_harm)
        if by_h:
            panels.append(("reply harm by human label", by_h, model.reply_harm))
    if c.conversations:
        by = {}
        for cr in c.conversations:
            by.setdefault(cr.label, []).append(float(cr.first_flag_turn or 0))
        panels.append(("first flagged user turn (0 = never)", by, None))
    return panels


def plot_distributions(c: Collector, path: Path, harm_threshold: float, model: Thresholds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(c, harm_threshold, model)
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(8, 3.2 * max(1, len(panels))), squeeze=False)
    for ax, (title, groups, threshold) in zip(axes[:, 0], panels, strict=False):
        discrete = title.startswith("first flagged")
        top = max(max(v) for v in groups.values())
        for label, values in sorted(groups.items()):
            if discrete:  # whole turns: one bar per turn number
                bins: Any = [b - 0.5 for b in range(int(top) + 2)]
            else:
                bins = [i / 40 for i in range(41)]
            # each group's bars sum to 1: groups of different sizes compare on one axis, read as shares of rows
            weights = [1.0 / len(values)] * len(values)
            ax.hist(values, bins=bins, weights=weights, alpha=0.5, label=f"{label} (n={len(values)})")
        if threshold is not None:
            ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
        ax.set_title(title)
        ax.set_xlabel("first flagged turn" if discrete else "score")
        ax.set_ylabel("share of the group's rows")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
