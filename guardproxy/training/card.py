"""MODEL_CARD.md from a run's metrics.json, plus leave-one-out runs, latency and comparison runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from guardproxy.training.augment import DISTILL_HEADS
from guardproxy.training.loop import SOURCE_CAPS, SOURCE_REPEATS
from guardproxy.training.model import student_layer_map
from guardproxy.training.run import soup_runs
from guardproxy.training.sources import CHALLENGE_DIRS

TARGETS = {
    "loso": 0.90,
    "challenge_auroc": 0.95,
    "recall": 0.95,
    "lookalike": 0.05,
    "phtest": 0.05,
    "benign": 0.02,
    "macro_f1": 0.90,
    "binary_f1": 0.95,
    "fr": 0.90,
}


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _minutes(seconds: Any) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def write_card(out: Path, *, loso: list[Path], latency: Path | None, compare: list[Path], notes: str = "") -> None:
    m = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    t = config["thresholds"]
    lines: list[str] = []
    add = lines.append
    size_mb = (out / "model.onnx").stat().st_size / 1e6 if (out / "model.onnx").exists() else 0.0

    add(f"# {config['name']} {config['version']}: the guardproxy guard model")
    add("")
    seeds = ", ".join(str(run["seed"]) for run in _runs(m))
    add(
        f"A {config['layers']}-layer MiniLM student (hidden {config['hidden']}, initialised from layers "
        f"{', '.join(str(i + 1) for i in student_layer_map(6, config['layers']))} of all-MiniLM-L6-v2) with five "
        "heads on one encoder pass, exported to ONNX and quantized to int8 (per-channel "
        f"dynamic), {size_mb:.1f} MB. Trained {config['trained_at']} with `guardproxy train` (training seed "
        f"{seeds}, split seed {config['data']['seed']}). The runtime contract (inputs, outputs, thresholds) is in "
        "`models/README.md`."
    )
    add("")
    add(
        "**English-first.** Training data is almost entirely English. The authored set holds a few refusals and asks in"
    )
    add("French, Spanish, German, Italian, Portuguese and Hindi. Expect weaker scores in other languages.")
    add("")
    if notes:
        add("## Notes on this run")
        add("")
        add(notes)
        add("")
    add("## Outputs")
    add("")
    add("| output | meaning | threshold (calibrated) |")
    add("|---|---|---|")
    set_by_hand = _harm_set_by_hand(m)
    add(
        f"| `harm` | the user turn (or a window of ≤ 4 turns) asks for harmful assistance | flag {t['harm']}"
        f"{' (set, not calibrated)' if set_by_hand else ''}, block-level `harm_high` {t['harm_high']} |"
    )
    add(f"| `category` | MLCommons AILuminate hazard id ({len(config['categories'])} ids, `none` first) | argmax |")
    add(f"| `jailbreak` | jailbreak wrapper / instruction override, whatever the ask inside | {t['jailbreak']} |")
    add(f"| `reply_harm` | the assistant reply carries harmful assistance | {t['reply_harm']} |")
    add(
        f"| `refusal` | none / partial / full refusal of a (prompt, reply) pair | refused when p(partial)+p(full) ≥ "
        f"{t['refusal_partial']} |"
    )
    add("| `embedding` | mean-pooled, L2-normalised sentence embedding (384) | – |")
    add("")
    add("False refusal is derived: prompt `harm` below the `harm` threshold and a partial or full refusal.")
    add("")

    _data_section(add, m, config)
    _splits_section(add)
    _calibration_section(add, m)
    _harm_section(add, m)
    _loso_section(add, loso)
    _challenge_section(add, m)
    _refusal_section(add, m)
    _speed_steps_section(add, m, compare)
    _latency_section(add, latency)
    _limits_section(add, config)
    add("## Reproduce")
    add("")
    add("```sh")
    add(".venv/bin/pip install torch==2.13.0   # CPU wheel; see README for the CPU-only index URL")
    add(".venv/bin/pip install -e '.[train]'")
    runs = _runs(m)
    split_seed = config["data"]["seed"]

    def command(out: str, run: dict[str, Any]) -> str:
        split = f" --split-seed {split_seed}" if run["seed"] != split_seed else ""
        init = f" --init-seed {run['init_seed']}" if run.get("init_seed", run["seed"]) != run["seed"] else ""
        device = f" --device {run['device']} --train-only" if run.get("device", "cpu") != "cpu" else ""
        return (
            f"guardproxy train --data ../shared/data --out {out} --layers {config['layers']} --max-steps "
            f"{int(run['steps'])} --seed {run['seed']}{split}{init}{device}{_data_flags(run)} "
            f"--model-version {config['version']}"
        )

    for line in _teacher_lines(runs[0]):
        add(line)
    if "soup" in m["train"]:
        for run in runs:
            add(command(f"/tmp/run-{run['seed']}", run))
        dirs = " ".join(f"/tmp/run-{run['seed']}" for run in runs)
        strip = " --strip-end-punctuation" if config.get("data", {}).get("end_punctuation_stripped") else ""
        add(
            f"guardproxy train --data ../shared/data --out models/{config['name']} --layers {config['layers']} "
            f"--soup {dirs} --split-seed {split_seed}{strip} --model-version {config['version']}"
        )
    else:
        add(command(f"models/{config['name']}", runs[0]))
    for path in loso:
        lm = json.loads(path.read_text())
        left = lm["options"]["leave_out"]
        add(
            f"guardproxy train --cheap --layers {lm['options']['layers']} --leave-out {' '.join(left)} "
            f"--max-steps {int(lm['train']['steps'])}{_data_flags(lm['train'])} "
            f"--out /tmp/loso-{'-'.join(left)}"
        )
    add("python -m bench.classifier_latency --model models/guard-v1 --json bench/results/classifier_latency.json")
    add("# the card: leave-one-out metrics and comparison runs as kept in bench/results/")
    add("guardproxy train --card --out models/guard-v1 --loso bench/results/loso/*.metrics.json \\")
    add("    --latency bench/results/classifier_latency.json --compare bench/results/students/*.metrics.json")
    add(f'#   plus --note "$(cat F)" for each F in bench/results/card_notes/{config["version"]}-*.md, in order')
    add("```")
    add("")
    add("![score distributions](scores.png)")
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def _harm_set_by_hand(m: dict[str, Any]) -> bool:
    """Whether the run's harm threshold was set with --harm-threshold rather than calibrated."""
    return m.get("train", {}).get("harm_threshold") is not None


def _teacher_dir(run: dict[str, Any]) -> str:
    """Where the reproduce command reads the teacher from: a directory named by the teacher's version where the run
    recorded it (the path it was read from, often ``models/guard-v1``, holds the student once the student ships),
    else that path."""
    version = (run.get("teacher_model") or {}).get("version")
    return f"/tmp/teacher-{version}/models/guard-v1" if version else str(run["teacher"])


def _teacher_lines(run: dict[str, Any]) -> list[str]:
    """The lines before a reproduce command for a recorded teacher: a comment naming it by version and md5, and the
    command that checks it out: ``models/guard-v1`` in the parent of the last commit that changed the count of its
    version in config.json, i.e. the commit that replaced it. That holds for a teacher that shipped and was replaced
    (every distilled model shipped so far); a teacher that never shipped is not in git and needs its own run."""
    model = run.get("teacher_model") or {}
    if not run.get("teacher") or not model.get("version"):
        return []
    version = model["version"]
    replaced = f"git log -1 --format=%H -S '\"{version}\"' -- models/guard-v1/config.json"
    return [
        f"# --teacher: guard-v1 {version} (model.onnx md5 {model['md5']}), models/guard-v1 before it was replaced:",
        f'git worktree add /tmp/teacher-{version} "$({replaced})^"',
    ]


def _data_flags(run: dict[str, Any]) -> str:
    """The data options of a training run's summary, as the flags that reproduce them (off ones left out)."""
    flags = " --balanced-rewords" if run.get("balanced_rewords") else ""
    flags += " --balanced-languages" if run.get("balanced_languages") else ""
    flags += f" --context-asks {run['context_asks']}" if run.get("context_asks") else ""
    flags += f" --terse-asks {run['terse_asks']}" if run.get("terse_asks") else ""
    flags += f" --word-deletions {run['word_deletions']}" if run.get("word_deletions") else ""
    flags += f" --cue-balance {run['cue_balance']}" if run.get("cue_balance") else ""
    flags += f" --form-consistency {run['form_consistency']}" if run.get("form_consistency") else ""
    flags += " --language-weights" if run.get("language_weights") else ""
    flags += " --window-pool newest" if run.get("window_pool") == "newest" else ""
    flags += f" --refusal-targets {run['refusal_targets']}" if run.get("refusal_targets") else ""
    flags += " --chat-turns" if run.get("chat_turns") else ""
    flags += " --chat-replies" if run.get("chat_replies") else ""
    flags += " --strip-end-punctuation" if run.get("strip_end_punctuation") else ""
    flags += " --calibrate-by-kind" if run.get("calibrate_by_kind") else ""
    if run.get("teacher"):
        flags += f" --teacher {_teacher_dir(run)} --distill {run['distill']}"
        heads = run.get("distill_heads") or DISTILL_HEADS
        flags += f" --distill-heads {','.join(heads)}" if tuple(heads) != DISTILL_HEADS else ""
        flags += f" --teacher-defers {','.join(run['teacher_defers'])}" if run.get("teacher_defers") else ""
    return flags + (f" --harm-threshold {run['harm_threshold']}" if run.get("harm_threshold") is not None else "")


def _data_section(add: Any, m: dict[str, Any], config: dict[str, Any]) -> None:
    add("## Data")
    add("")
    add("All from `../shared/data` (read by path, never copied) plus `guardproxy/training/authored/` (written for")
    add(
        "this project: reframings of one intent in many voices, benign look-alikes, refusals without keywords, labelled"
    )
    add("escalations). Rows by split (PHTest response pairs: dev and calibration are capped samples when scored):")
    add("")
    add("| source | train | calibration | dev |")
    add("|---|---:|---:|---:|")
    for source, counts in m["splits"].items():
        add(f"| {source} | {counts.get('train', 0)} | {counts.get('calibration', 0)} | {counts.get('dev', 0)} |")
    add("")
    add("Labels: `harmful` → harm 1; `benign`, `borderline_benign` → 0; `borderline_controversial` → 0 at weight 0.5;")
    add("`policy_restricted` → 0 (category kept: specialized advice / elections), reported separately; `jailbreak` →")
    add(
        "jailbreak 1 with the harm loss masked. HarmBench copyright rows are harmful at weight 0.5 (not a safety harm)."
    )
    add("PHTest responses train the 3-way refusal head; HarmBench classifier rows train reply harm (`none` = the model")
    add("carried out the behaviour → reply harm 1, refusal none; `null` → reply harm 0, refusal masked).")
    add("Conversations are windows of ≤ 4 turns in `role: text` lines: ActorAttack windows ending at the last two user")
    add("turns → harm 1 (earlier turns unlabelled, unused); authored escalations use `first_harmful_index` (earlier")
    add("windows → 0); MT-Bench-101 windows → 0, half of them with the assistant turns dropped so that a user-only")
    add('window is no shortcut to "escalation". Category labels map each source\'s categories onto the taxonomy')
    add("(`guardproxy/training/categories.py`); rows without one get keyword rules at half weight.")
    add("")
    trained = config["data"]["sources"]  # the caps of sources this run loaded (mtbench101_turns: --chat-turns only)
    caps = ", ".join(f"{k} {v}" for k, v in SOURCE_CAPS.items() if k in trained)
    cfg = m.get("train_config", {})
    add(f"Balance: rows sampled per epoch from the large or narrow-style sources ({caps}); other sources are used in")
    add("full. Augmentation, drawn from train rows only:")
    add(f"- {cfg.get('frames_per_epoch')} reframings per epoch (14 frames: fiction, roleplay, academic, hypothetical,")
    add("  authority, casual...) applied to harmful and harmless asks alike, so no frame predicts the label;")
    add(f"- {cfg.get('wraps_per_epoch')} real jailbreak wrappers carrying a harmful or a harmless ask (in the")
    add("  placeholder, or appended), jailbreak 1 either way and harm following the ask;")
    add(f"- {cfg.get('rewords_per_epoch')} asks turned into the other sentence form (imperatives into questions,")
    add("  questions into instructions), half harmful and half harmless. The public harmful sets are nearly all")
    add("  imperatives and the question-shaped rows nearly all harmless: a shortcut the first leave-one-out runs")
    add("  exposed (leaving out the forbidden-questions set, the only harmful questions, gave AUROC 0.66 on it; 0.85")
    add("  with this augmentation at 3 layers, 0.88 at 4).")
    repeats = ", ".join(f"{k} ×{v}" for k, v in SOURCE_REPEATS.items())
    add(f"Repeated per epoch: {repeats} (the only sets with one intent in many voices beside look-alikes).")
    runs = _runs(m)
    add(f"Training: {int(runs[0]['steps'])} AdamW steps (lr {cfg.get('lr')}, linear warm-up and decay), batches of")
    add(f"≤ {cfg.get('max_batch')} rows and ≤ {cfg.get('batch_tokens')} padded ids, word embeddings frozen, max length")
    add(f"{cfg.get('max_length')}; wall time of the training loop {_minutes(runs[0].get('seconds'))}, whole run")
    if m.get("options", {}).get("eval_only"):
        # metrics.json's seconds are then the re-scoring's, not the run's
        add(f"not recorded; these metrics come from a re-scoring (`--eval-only`), {_minutes(m.get('seconds'))}.")
    else:
        add(f"(incl. export, calibration, scoring) {_minutes(m.get('seconds'))}.")
    if "soup" in m["train"]:
        seeds = ", ".join(str(run["seed"]) for run in runs)
        add(f"The shipped weights are the average of {len(runs)} such runs (training seeds {seeds}; the same data,")
        add("dev and calibration rows): a uniform model soup (Wortsman et al., 2022), one model's cost at run time;")
        add("thresholds were calibrated on the averaged model.")
    add("")


def _runs(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The training runs behind a model: one, or each run of a soup (with its training seed)."""
    if "soup" in m["train"]:
        return soup_runs(m["train"])
    return [{**m["train"], "seed": m.get("train_config", {}).get("seed")}]


def _splits_section(add: Any) -> None:
    add("## How the splits were kept clean")
    add("")
    add("- Split by group, never by row: an ActorAttack goal (all 3 paths), a PHTest prompt with all 11 model")
    add("  responses, a HarmBench behaviour with its classifier-validation rows, a jailbreak community, an authored")
    add(
        "  `family` (the five voices of one intent). Identical normalized texts across sources are merged into one"
        " group"
    )
    add("  (union-find), so the same request never sits on both sides.")
    add(
        "- Seeded hash of the group: 15% dev (never trained on, never used for thresholds), 10% calibration (thresholds"
    )
    add("  only), 75% train. Augmentation draws from train rows only.")
    add(f"- {_challenge_dirs()} are scored for this report only: never trained on, never used for thresholds or early")
    add("  stopping; no training run reads them before the final scoring.")
    add("- Leave-one-source-out runs drop the source from train *and* calibration.")
    add("")


def _calibration_section(add: Any, m: dict[str, Any]) -> None:
    add("## Thresholds")
    add("")
    groups = m.get("harm_calibration")
    if groups:
        add("On the calibration split only. `harm`: the threshold minimising the worst ratio of a rate to its target")
        add("over five groups, each on its own: harmful asks of the public sets missed / 5%, the authored harmful asks")
        add("(reframings, look-alike pairs) missed / 5%, ordinary benign prompts flagged / 2%, authored look-alikes")
        add("flagged / 5%, PHTest harmless flagged / 5% (the issue's targets; until 2.3.0 harmful asks were pooled and")
        add("look-alikes held to 2%, so the many easy public asks hid the hard ones). `harm_high`: at least `harm` and")
    else:  # a model calibrated before the per-group rule (metrics.json without "harm_calibration")
        add("On the calibration split only. `harm`: the threshold minimising the worst of (miss rate / 5%, benign")
        add("flag rate / 2%, PHTest-harmless flag rate / 5%), i.e. the targets' own ratios. `harm_high`: at least")
        add("`harm` and")
    add("above 99.5% of calibration negatives. `jailbreak`: worst of (miss / 5%, false flags / 2%). `reply_harm`:")
    add("worst of (miss / 10%, false flags / 5%). `refusal_partial`: the value maximising binary refusal F1.")
    add("")
    if _harm_set_by_hand(m):
        add(
            f"**The `harm` threshold was set to {m['thresholds']['harm']} by hand (`--harm-threshold`), not"
            f" calibrated**: the rule above chose {m['harm_threshold_calibrated']} on this run. This run's dev and"
        )
        add("challenge figures below are at the threshold set.")
        add("")
    if groups:
        add(f"The harm threshold's groups on the calibration split, at {m['thresholds']['harm']}:")
        add("")
        add("| group | n | missed / flagged | target |")
        add("|---|---:|---:|---:|")
        for group, g in groups.items():
            add(f"| {group} | {g['n']} | {_pct(g.get('miss_rate', g.get('flag_rate')))} | {_pct(g['target'])} |")
        add("")


def _harm_section(add: Any, m: dict[str, Any]) -> None:
    h = m["dev"]["harm"]
    add("## Harm on the dev split (in distribution: the easy numbers)")
    add("")
    add(
        f"Pooled AUROC {_f(h['pooled_auroc'])}, recall at threshold {_pct(h['recall'])}, benign flagged "
        f"{_pct(h['flag_rate_benign'])}, PHTest harmless flagged {_pct(h['flag_rate_borderline_benign'])}; "
        f"jailbreak AUROC {_f(h['jailbreak_auroc'])} (non-jailbreak prompts flagged "
        f"{_pct(h['jailbreak_flag_rate_non_jailbreak'])}); category accuracy on harmful rows "
        f"{_pct(h['category_accuracy_harmful'])}."
    )
    add("")
    add("| source | n | AUROC in source | AUROC vs dev negatives | recall | flag rate (harmless) | other |")
    add("|---|---:|---:|---:|---:|---:|---|")
    for source, e in h["per_source"].items():
        other = []
        for key in ("flag_rate_borderline_controversial", "flag_rate_policy_restricted"):
            if key in e:
                other.append(f"{key.removeprefix('flag_rate_')} flagged {_pct(e[key])}")
        if "jailbreak_recall" in e:
            other.append(f"jailbreak recall {_pct(e['jailbreak_recall'])}")
        add(
            f"| {source} | {e['n']} | {_f(e.get('auroc_in_source'))} | {_f(e.get('auroc_vs_dev_negatives'))} | "
            f"{_pct(e.get('recall'))} | {_pct(e.get('flag_rate'))} | {'; '.join(other)} |"
        )
    add("")
    add('"AUROC vs dev negatives": the source\'s harmful rows against every harmless dev prompt (benign and PHTest')
    add("harmless, all sources). `policy_restricted` and `borderline_controversial` are reported, not counted.")
    add("")


def _loso_section(add: Any, loso: list[Path]) -> None:
    add("## Leave one source out (the hard numbers)")
    add("")
    if not loso:
        add("Not run for this model.")
        add("")
        return
    first = json.loads(loso[0].read_text())
    cfg = first["train_config"]
    add(f"Cheaper configuration (`--cheap`): same student ({first['options']['layers']} layers), prompt-mode rows only")
    add(f"(no response pairs, no jailbreak wrappers), max length {cfg['max_length']}, {int(first['train']['steps'])}")
    add("steps; the left-out source is dropped from train and calibration. Target ≥ 0.90 for every harmful source.")
    add("")
    add("| left out | harmful rows | AUROC vs dev negatives | AUROC in source | recall at its threshold |")
    add("|---|---:|---:|---:|---:|")
    for path in loso:
        lm = json.loads(path.read_text())
        for source, e in lm.get("leave_out", {}).items():
            add(
                f"| {source} | {e['harmful_n']} | {_f(e['auroc_vs_dev_negatives'])} | {_f(e.get('auroc_in_source'))} | "
                f"{_pct(e['recall_at_threshold'])} |"
            )
    add("")


def _challenge_dirs() -> str:
    return ", ".join(f"`bench/{d.name}/`" for d in CHALLENGE_DIRS)


def _challenge_section(add: Any, m: dict[str, Any]) -> None:
    add(f"## Challenge sets ({_challenge_dirs()}: written apart from training, never trained on)")
    add("")
    ch = m.get("challenge", {})
    for name, c in ch.items():
        if name.endswith(":pairs"):
            _challenge_pairs(add, name.removesuffix(":pairs"), c)
            continue
        if name.endswith(":windows"):
            add(f"**{name.removesuffix(':windows')}** as windows of ≤ 4 turns (a window is harmful from the")
            add(
                "escalation's first harmful user turn on): "
                f"{c['windows']} windows, AUROC {_f(c['auroc'])}, harmful windows flagged "
                f"{_pct(c['harmful_window_recall'])}, benign-conversation windows flagged "
                f"{_pct(c['benign_window_flag_rate'])}; escalations caught (any harmful window flagged) "
                f"{_pct(c['escalations_caught'])}, flagged before the harmful turn "
                f"{_pct(c['escalations_flagged_before_harmful_turn'])}, benign conversations flagged anywhere "
                f"{_pct(c['benign_conversations_flagged'])}. (The window score alone; the conversation tracker adds "
                "its own signals.)"
            )
            add("")
            continue
        phtest = m["dev"]["harm"]["flag_rate_borderline_benign"]
        add(
            f"**{name}** (n={c['n']}): AUROC {_f(c['auroc'])} (target ≥ {TARGETS['challenge_auroc']}); at the "
            f"default threshold {m['thresholds']['harm']}: harmful recall {_pct(c['recall'])} (target ≥ 95%), "
            f"look-alikes flagged {_pct(c['flag_rate_lookalike'])} (≤ 5%), ordinary benign flagged "
            f"{_pct(c['flag_rate_everyday'])} (≤ 2%), PHTest harmless (dev split) flagged {_pct(phtest)} (≤ 5%)."
        )
        add("")
        add("| style | harmful n | recall | benign n | flagged |")
        add("|---|---:|---:|---:|---:|")
        for style, e in c["by_style"].items():
            add(
                f"| {style or '–'} | {e['harmful_n']} | {_pct(e['recall'])} | {e['benign_n']} | "
                f"{_pct(e['flag_rate'])} |"
            )
        add("")


def _challenge_pairs(add: Any, name: str, c: dict[str, Any]) -> None:
    a, k = c.get("all", {}), c.get("keyword_free", {})
    add(f"**{name}** refusal: macro-F1 {_f(a.get('macro_f1'))}, binary F1 {_f(a.get('binary_f1'))} (n={a.get('n')});")
    add(
        f"on keyword-free replies macro-F1 {_f(k.get('macro_f1'))}, binary F1 {_f(k.get('binary_f1'))} "
        f"(n={k.get('n')}; target ≥ 0.90)."
    )
    base = c.get("refusal_baselines_keyword_free") or {}
    if base:
        best = max(base.items(), key=lambda kv: kv[1]["binary_f1"])
        add(f"Best keyword baseline on those rows: `{best[0]}` binary F1 {_f(best[1]['binary_f1'])}.")
    fr = c.get("false_refusal")
    if fr:
        add(
            f"False refusal on this set ({fr['true_false_refusals']} false refusals among {fr['n']} pairs): precision "
            f"{_f(fr['model']['precision'])}, recall {_f(fr['model']['recall'])} (target ≥ 0.90 each)."
        )
    rh = c.get("reply_harm")
    if rh:
        add(
            f"Reply harm: AUROC {_f(rh['auroc'])}, F1 {_f(rh['f1'])}, harmless replies flagged "
            f"{_pct(rh['flag_rate_negatives'])}."
        )
    add("")


def _refusal_section(add: Any, m: dict[str, Any]) -> None:
    r = m["dev"]["refusal"]
    names = sorted(next(iter(r.values()))["baselines"]) if r else []
    short = {n: f"B{i + 1}" for i, n in enumerate(names)}
    add("## Refusal on the dev split, against the keyword baselines")
    add("")
    add("Binary F1 (any refusal vs none) and 3-way macro-F1 per source. Baselines (`../shared/data/baselines`), each")
    add(
        "with its own matching rule; a match counts as a full refusal (they cannot say partial): "
        + ", ".join(f"{short[n]} = `{n}`" for n in names)
        + "."
    )
    add("")
    add("| source | n | macro-F1 | binary F1 | " + " | ".join(f"{short[n]} bin / macro" for n in names) + " |")
    add("|---|---:|---:|---:|" + "---:|" * len(names))
    for key, e in r.items():
        cells = [f"{_f(e['baselines'][n]['binary_f1'], 2)} / {_f(e['baselines'][n]['macro_f1'], 2)}" for n in names]
        add(
            f"| {key} | {e['model']['n']} | {_f(e['model']['macro_f1'])} | {_f(e['model']['binary_f1'])} | "
            + " | ".join(cells)
            + " |"
        )
    add("")
    add("PHTest labels are the PHTest authors' (likely automated) judgements; several models' sets hold very few")
    add("full or partial refusals, so their macro-F1 moves a lot with a handful of rows. A blind second labelling")
    add("of 360 of these dev pairs (`bench/refusal_audit/`) agrees with PHTest's labels at macro-F1 0.785 and")
    add("binary F1 0.910, and disagrees most on `partial`: a model's three-class agreement with PHTest cannot be")
    add("read above that.")
    add("")
    fr = m["dev"]["false_refusal"]
    add("### False refusal")
    add("")
    add(f"{fr['n']} dev pairs with a known prompt label: {fr['true_false_refusals']} false refusals (harmless prompt")
    add(f"refused), {fr['harmful_prompt_pairs']} pairs whose prompt is harmful (a refusal there is correct). The model")
    add(f"calls a false refusal when the prompt's own harm score is below {m['thresholds']['harm']} and the reply is a")
    add("partial or full refusal. Keyword baselines cannot see the prompt: every matched refusal counts as false.")
    add("")
    add("| | precision | recall |")
    add("|---|---:|---:|")
    add(f"| model | {_f(fr['model']['precision'])} | {_f(fr['model']['recall'])} |")
    for name, e in fr["baselines"].items():
        add(f"| {short.get(name, name)} | {_f(e['precision'])} | {_f(e['recall'])} |")
    add("")
    rh = m["dev"]["reply_harm"]
    add("### Reply harm")
    add("")
    add("| source | n | AUROC | F1 at threshold | harmless replies flagged |")
    add("|---|---:|---:|---:|---:|")
    for source, e in rh.items():
        add(f"| {source} | {e['n']} | {_f(e['auroc'])} | {_f(e['f1'])} | {_pct(e['flag_rate_negatives'])} |")
    add("")


def _speed_steps_section(add: Any, m: dict[str, Any], compare: list[Path]) -> None:
    add("## Quality cost of each speed step")
    add("")
    layers = m["options"]["layers"]
    add(
        f"The shipped model keeps {layers} MiniLM layers and is int8. The int8 step is measured on the same dev rows"
        " with the shipped thresholds (fp32 vs int8 rows). Smaller students (comparison runs, if listed) were trained"
        " with the recipe named in their row, full configuration unless marked cheap, and are scored with their own"
        " calibrated thresholds on their own run's dev split and on the challenge set."
    )
    add("")
    cmp = m.get("compare_int8_vs_fp32")
    add(
        "| configuration | harm pooled AUROC | harm recall | benign flagged | refusal macro-F1 (all) | "
        "refusal binary F1 (all) | challenge AUROC | challenge look-alikes flagged |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    _speed_row(add, f"shipped, {layers} layers, int8", m["dev"], m)
    for path in compare:
        cm = json.loads(path.read_text())
        opts = cm["options"]
        recipe = f"distilled from {Path(opts['teacher']).name}" if opts.get("teacher") else "labels only"
        heads = cm.get("train", {}).get("distill_heads")
        recipe += (
            f" ({', '.join(heads)} only)" if opts.get("teacher") and heads and tuple(heads) != DISTILL_HEADS else ""
        )
        if opts.get("init_from"):
            recipe += f", started from {Path(opts['init_from']).parent.name}'s weights"
        cheap = ", cheap config" if opts.get("prompts_only") else ""
        label = f"{opts['layers']} layers, {recipe}, {cm['train_config'].get('max_steps')} steps{cheap}, int8"
        _speed_row(add, f"{label} ({path.name})", cm["dev"], cm)
    if cmp:
        _speed_row(add, "shipped, fp32 (same dev rows)", cmp["fp32"], None)
        _speed_row(add, "shipped, int8 (same dev rows)", cmp["int8"], None)
    add("")


def _speed_row(add: Any, label: str, dev: dict[str, Any], full: dict[str, Any] | None) -> None:
    h = dev["harm"]
    r = dev["refusal"].get("all", {}).get("model", {})
    ch: dict[str, Any] = {}
    if full:
        ch = next((c for k, c in full.get("challenge", {}).items() if ":" not in k), {})
    add(
        f"| {label} | {_f(h['pooled_auroc'])} | {_pct(h['recall'])} | {_pct(h['flag_rate_benign'])} | "
        f"{_f(r.get('macro_f1'))} | {_f(r.get('binary_f1'))} | {_f(ch.get('auroc'))} | "
        f"{_pct(ch.get('flag_rate_lookalike'))} |"
    )


def _latency_section(add: Any, latency: Path | None) -> None:
    add("## Latency")
    add("")
    if latency is None or not latency.exists():
        add("Run `python -m bench.classifier_latency` (one onnxruntime thread, tokenization included).")
        add("")
        return
    lat = json.loads(latency.read_text())
    add(
        f"`python -m bench.classifier_latency` ({lat['threads']} thread, onnxruntime {lat['onnxruntime']}, "
        "normalization + tokenization + one pass; targets p50 ≤ 6 ms at 64 tokens, ≤ 20 ms at 256, RSS ≤ 250 MiB):"
    )
    add("")
    add("| input | p50 ms | p90 ms |")
    add("|---|---:|---:|")
    for key in (
        "prompt_64",
        "prompt_256",
        "pair_256",
        "model_only_64",
        "model_only_256",
        "tokenize_only_64",
        "tokenize_only_256",
    ):
        if key in lat:
            add(f"| {key} | {lat[key]['p50_ms']} | {lat[key]['p90_ms']} |")
    add("")
    rss = lat["rss_mib"]
    if "load_average" in lat:
        add(f"Load average during the run: {' / '.join(lat['load_average'])} (1 / 5 / 15 min).")
        add("")
    add(
        f"RSS: {rss['model_loaded']} MiB with the model loaded, {rss['after_runs']} MiB after the runs (peak "
        f"{rss['peak']} MiB)."
    )
    add("")
    if "note" in lat:
        add(lat["note"])
        add("")


def _limits_section(add: Any, config: dict[str, Any]) -> None:
    add("## Known limits")
    add("")
    add("- English-first; other languages are scored, but with far less support in training.")
    add("- The harmful sources are narrow in style (AdvBench imperatives, HarmBench behaviours, short forbidden")
    add("  questions); the leave-one-source-out and challenge numbers above are the honest estimate of")
    add("  generalization, the in-distribution dev numbers are not.")
    add("- Conversation windows: one public multi-turn attack family (ActorAttack) plus 111 authored escalations")
    add("  in 9 patterns; no per-turn labels in the public set. The conversation tracker's own signals matter more")
    add("  than the window score.")
    add("- OpenAI moderation rows label content, not request intent; hateful or sexual *text* scores as harmful.")
    add("- Refusal labels for PHTest responses are the PHTest authors' judgements (likely automated).")
    add("- Normalization folds homoglyphs, leetspeak and base64 before scoring (`guardproxy/normalize.py`): text that")
    add("  legitimately mixes scripts or digits inside words (`log4j` → `logaj`) is seen folded.")
    if config.get("data", {}).get("end_punctuation_stripped"):
        add("- The tokenizer drops the `.`, `?`, `!` and `。` that end each line (`--strip-end-punctuation`), so no")
        add("  verdict turns on them; the Arabic `؟`, the Devanagari `।`, the Greek `;` and a mark before a closing")
        add("  quote or bracket are kept.")
    add("- Long inputs keep the first quarter and the last three quarters of the 256-id budget; a harmful ask buried")
    add("  in the middle of a long paste can be cut. The gateway's per-turn check reads that middle in 64-id")
    add("  windows as well (`OnnxClassifier.prompt_windows`, up to ~3,100 ids; `python -m bench.prompt_windows`).")
    add("- Reply harm learnt from replies to harmful asks (HarmBench, PHTest, authored batches) and from few ordinary")
    add("  chat replies: measure how often it reads those as harmful assistance before shipping an output line")
    add("  (`python -m bench.chat_replies`), and expect short technical text to be misread both ways.")
    add("")
