"""``guardproxy train``: train the guard model from the shared data sets (needs the ``train`` extra)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from guardproxy.errors import ConfigError
from guardproxy.training.augment import CONSISTENCY_ROWS, DISTILL_HEADS

HARMFUL_SOURCES = ("advbench", "harmbench", "itw_forbidden_questions", "openai_moderation")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="shared data root (read by path)")
    parser.add_argument("--out", type=Path, default=Path("models/guard-v1"), help="model directory to write")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers kept from MiniLM-L6 (default 6: all)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--max-length", type=int, default=256, help="ids per input, special tokens included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-seed",
        type=int,
        default=None,
        help="seed of the heads' random initialisation (default: --seed); keep it fixed across runs to average",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device of the training steps, e.g. cuda (export and scoring: CPU)"
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="write student.pt and train_summary.json and stop (no export, calibration or metrics)",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the data splits and augmentation draws (default: --seed); keep it fixed across runs to average",
    )
    parser.add_argument(
        "--soup",
        type=Path,
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="average the weights of these trained runs (same --layers and split seed) instead of training",
    )
    parser.add_argument(
        "--refusal-targets",
        type=Path,
        default=None,
        metavar="FILE",
        help="train one source's refusal labels on soft targets, a label-noise correction (bench/refusal_audit/)",
    )
    parser.add_argument(
        "--balanced-rewords",
        action="store_true",
        help="draw every reworded sentence form equally from harmful and harmless asks (2.12.0's recipe)",
    )
    parser.add_argument(
        "--balanced-languages",
        action="store_true",
        help="draw the reframed, wrapped and after-chat asks in other languages equally often from harmful and "
        "harmless asks (off: most augmented asks in other languages are harmful)",
    )
    parser.add_argument(
        "--context-asks",
        type=int,
        default=0,
        metavar="N",
        help="N asks an epoch (half harmful) put as the next user turn of a harmless chat, in the window format, "
        "with the ask's label (e.g. 400; default 0: off)",
    )
    parser.add_argument(
        "--terse-asks",
        type=int,
        default=0,
        metavar="N",
        help="N asks an epoch (half harmful) as terse search-box queries: lower case, no closing mark, no lead-in, "
        "a how-to ask cut to its core (e.g. 2400, as candidate 2.19.0; default 0: off)",
    )
    parser.add_argument(
        "--word-deletions",
        type=int,
        default=0,
        metavar="N",
        help="N asks an epoch (half harmful) with one word deleted that carries the request's form, not its intent "
        "(how, write, me, the...), label kept (default 0: off; bench.word_deletion measures what it is for)",
    )
    parser.add_argument(
        "--cue-balance",
        type=int,
        default=0,
        metavar="N",
        help="N asks an epoch that each lose a form word from the side that over-uses it ('how' from harmful asks, "
        "'please' from harmless ones; python -m guardproxy.training.cue_words lists them) (default 0: off)",
    )
    parser.add_argument(
        "--form-consistency",
        type=float,
        default=0.0,
        metavar="W",
        help="weight W of a loss that pulls an ask's harm score and its copy's without one form word together (up "
        f"to {CONSISTENCY_ROWS} asks a batch; counterfactual logit pairing) (default 0: off; "
        "bench.word_deletion measures it)",
    )
    parser.add_argument(
        "--language-weights",
        action="store_true",
        help="weigh the harm loss so that rows in other languages are the same share of the harmful and the "
        "harmless side (off: 10%% of harmful asks and 2%% of harmless ones, a language cue)",
    )
    parser.add_argument(
        "--window-pool",
        choices=("all", "newest"),
        default="all",
        help="what the heads read of a conversation window: the mean over all its ids (default), or over its newest "
        "turn's ids, the encoder still reading the whole window (the model gets a pool_mask input)",
    )
    parser.add_argument(
        "--chat-turns",
        action="store_true",
        help="also train every MT-Bench user turn on its own as a harmless prompt (half weight; what the per-turn "
        "check sees)",
    )
    parser.add_argument(
        "--chat-replies",
        action="store_true",
        help="also train every (user turn, reply) of MT-Bench's dialogues and the authored harmless chats as a pair "
        "whose reply is no refusal (clarifying questions, short answers, replies in other languages)",
    )
    parser.add_argument(
        "--strip-end-punctuation",
        action="store_true",
        help="the model's tokenizer drops the . ? ! ending each line before reading it (saved in its tokenizer.json), "
        "so no verdict turns on a closing question mark",
    )
    parser.add_argument(
        "--calibrate-by-kind",
        action="store_true",
        help="calibrate the harm threshold with authored harmless prompts grouped by their row's kind (everyday: "
        "ordinary, target 2%%) instead of all as look-alikes (target 5%%)",
    )
    parser.add_argument(
        "--harm-threshold",
        type=float,
        default=None,
        metavar="T",
        help="set the harm threshold to T (0-1) instead of calibrating it; the calibrated one is kept in metrics.json "
        "and the card says which was used",
    )
    parser.add_argument("--model-version", default="1.0.0", help="version written to config.json and the card")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        metavar="DIR",
        help="distil from this trained model directory (its model.onnx), e.g. a 6-layer model into a 4-layer student",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="start from a trained run's student.pt (its fine-tuned layers, picked as from the base model, and heads)",
    )
    parser.add_argument(
        "--distill", type=float, default=0.5, help="weight of the teacher's soft targets against the labels (0-1)"
    )
    parser.add_argument(
        "--distill-heads",
        default=",".join(DISTILL_HEADS),
        metavar="HEAD,...",
        help="the heads the teacher trains, the others learn from the labels alone, e.g. harm,jailbreak,category "
        "to hold a model's harm side while new pairs move its refusal head "
        f"(default: all of {','.join(DISTILL_HEADS)})",
    )
    parser.add_argument(
        "--teacher-defers",
        default="",
        metavar="SOURCE,...",
        help="sources whose rows train the teacher's heads on their own labels, e.g. authored/prompts_objects18 for "
        "a batch written to teach what the teacher gets wrong (default: none)",
    )
    parser.add_argument(
        "--leave-out",
        action="append",
        default=[],
        metavar="SOURCE",
        help="drop a source from train and calibration and report its harm AUROC (repeatable)",
    )
    parser.add_argument(
        "--cheap",
        action="store_true",
        help="the leave-one-out configuration: prompt rows only (no pairs, no jailbreak wrappers), max length 128",
    )
    parser.add_argument("--eval-only", action="store_true", help="re-score the model already in --out (no training)")
    parser.add_argument("--no-authored", action="store_true", help="ignore guardproxy/training/authored/*.jsonl")
    parser.add_argument(
        "--no-fp32-compare",
        action="store_true",
        help="skip scoring dev with the fp32 graph (a training run then deletes it; --eval-only keeps it)",
    )
    parser.add_argument(
        "--no-early-exit-heads",
        action="store_true",
        help="do not fit early_exit.json after training (the per-turn and the window heads, a few minutes); "
        "without it the gateway runs the whole model for every check",
    )
    parser.add_argument("--card", action="store_true", help="write MODEL_CARD.md from metrics (see --loso/--latency)")
    parser.add_argument("--loso", type=Path, nargs="*", default=[], help="metrics.json of leave-one-out runs")
    parser.add_argument("--latency", type=Path, default=None, help="JSON from python -m bench.classifier_latency")
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the model card (repeatable)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="metrics.json of other configurations")


def _check_options(args: argparse.Namespace) -> None:
    """Options that are wrong or contradict each other, reported before anything is loaded or trained."""
    if args.teacher is not None and not (args.teacher / "model.onnx").is_file():
        raise ConfigError(f"--teacher: no model.onnx in {args.teacher}")
    if args.init_from is not None and not args.init_from.is_file():
        raise ConfigError(f"--init-from: no such checkpoint: {args.init_from}")
    missing = [str(d) for d in args.soup if not (d / "student.pt").is_file()]
    if missing:
        raise ConfigError(f"--soup: no student.pt in {', '.join(missing)}")
    counts = {
        "--context-asks": args.context_asks,
        "--terse-asks": args.terse_asks,
        "--word-deletions": args.word_deletions,
        "--cue-balance": args.cue_balance,
    }
    for flag, count in counts.items():
        if count < 0:
            raise ConfigError(f"{flag}: expected a count of 0 or more, got {count}")
    if args.form_consistency < 0:
        raise ConfigError(f"--form-consistency: expected a weight of 0 or more, got {args.form_consistency}")
    if not 0.0 <= args.distill <= 1.0:
        raise ConfigError(f"--distill must be between 0 and 1, got {args.distill}")
    heads = args.distill_heads.split(",")
    unknown = [h for h in heads if h not in DISTILL_HEADS]
    if unknown:
        raise ConfigError(f"--distill-heads: unknown head {unknown[0]!r}; expected some of {','.join(DISTILL_HEADS)}")
    if args.teacher is None and set(heads) != set(DISTILL_HEADS):
        raise ConfigError("--distill-heads names what a teacher trains: it needs --teacher")
    if args.teacher_defers and args.teacher is None:
        raise ConfigError("--teacher-defers names rows a teacher leaves to their labels: it needs --teacher")
    if args.harm_threshold is not None and not 0.0 < args.harm_threshold < 1.0:
        raise ConfigError(f"--harm-threshold must be between 0 and 1 (exclusive), got {args.harm_threshold}")
    if args.train_only and (args.eval_only or args.card):
        raise ConfigError("--train-only trains and stops: it cannot go with --eval-only or --card")
    if args.language_weights and args.no_authored:
        raise ConfigError(
            "--language-weights needs the authored rows in other languages: it cannot go with --no-authored"
        )


def fit_early_exit_heads(model: Path, data: Path, threads: int) -> bool:
    """Fit ``early_exit.json`` for a freshly written model (``guardproxy.training.early_exit``): the per-turn head,
    then the window's, their reports on stderr. A failed fit leaves the model without it (the gateway's ``auto``
    then runs the whole model, and logs so) and prints the command that fits it by hand; False then."""
    fit = importlib.import_module("guardproxy.training.early_exit")
    common = ["--model", str(model), "--data", str(data), "--threads", str(threads)]
    for extra, what in (([], "per-turn"), (["--windows"], "window")):
        print(f"fitting the {what} early-exit head", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # its report: stdout keeps the training's own summary
            done = fit.main([*common, *extra])
        if done != 0:
            command = " ".join(["python -m guardproxy.training.early_exit", *common, *extra])
            print(f"warning: no {what} early-exit head for {model}; fit it by hand: {command}", file=sys.stderr)
            return False
    return True


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    if args.refusal_targets is not None:
        # The reader has no torch in it: a bad file is reported before anything is loaded or trained.
        sources = importlib.import_module("guardproxy.training.sources")
        try:
            sources.load_refusal_targets(args.refusal_targets)
        except ValueError as exc:
            raise ConfigError(f"--refusal-targets: {exc}") from exc
    # Looked up, not imported: torch is an optional extra, absent from the runtime and CI environments.
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "training needs PyTorch and friends: pip install 'guardproxy[train]' "
            "(CPU build: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
        )
    if args.device != "cpu":
        torch = importlib.import_module("torch")
        try:
            torch.empty(1, device=args.device)
        except (RuntimeError, AssertionError) as exc:  # an unknown device name, or torch built without it
            raise ConfigError(f"--device {args.device}: not usable here ({str(exc).splitlines()[0]})") from exc
    if not args.data.is_dir():
        raise ConfigError(f"data directory not found: {args.data}")
    unknown = [s for s in args.leave_out if not (args.data / "prompts" / f"{s}.jsonl").exists()]
    if unknown:
        raise ConfigError(f"--leave-out: no such prompt source: {', '.join(unknown)}")

    # Imported by name: guardproxy.training is outside mypy's strict scope (torch and transformers are untyped).
    card = importlib.import_module("guardproxy.training.card")
    loop = importlib.import_module("guardproxy.training.loop")
    training = importlib.import_module("guardproxy.training.run")
    TrainConfig, RunOptions = loop.TrainConfig, training.RunOptions

    opts = RunOptions(
        data=args.data,
        out=args.out,
        layers=args.layers,
        version=args.model_version,
        leave_out=tuple(args.leave_out),
        authored=not args.no_authored,
        threads=args.threads,
        fp32_compare=not (args.no_fp32_compare or args.cheap),
        prompts_only=args.cheap,
        eval_only=args.eval_only,
        teacher=args.teacher,
        init_from=args.init_from,
        split_seed=args.split_seed,
        soup=tuple(args.soup),
        init_seed=args.init_seed,
        train_only=args.train_only,
        refusal_targets=args.refusal_targets,
        chat_turns=args.chat_turns,
        chat_replies=args.chat_replies,
        strip_end_punctuation=args.strip_end_punctuation,
        calibrate_by_kind=args.calibrate_by_kind,
        harm_threshold=args.harm_threshold,
        train=TrainConfig(
            device=args.device,
            distill=args.distill,
            # in DISTILL_HEADS' order, each once: one spelling per choice, so "all six" is the default however given
            distill_heads=tuple(h for h in DISTILL_HEADS if h in args.distill_heads.split(",")),
            teacher_defers=tuple(dict.fromkeys(s for s in args.teacher_defers.split(",") if s)),
            max_length=128 if args.cheap else args.max_length,
            epochs=args.epochs,
            max_steps=args.max_steps,
            seed=args.seed,
            wraps_per_epoch=0 if args.cheap else TrainConfig.wraps_per_epoch,
            balanced_rewords=args.balanced_rewords,
            balanced_languages=args.balanced_languages,
            context_asks_per_epoch=args.context_asks,
            terse_per_epoch=args.terse_asks,
            word_deletions_per_epoch=args.word_deletions,
            cue_balance_per_epoch=args.cue_balance,
            form_consistency=args.form_consistency,
            language_weights=args.language_weights,
            window_pool=args.window_pool,
        ),
    )
    if not args.card:
        results = training.main(opts)
        print(json.dumps({"thresholds": results["thresholds"], "seconds": round(results["seconds"])}))
        if args.train_only:
            print(f"wrote {args.out / 'student.pt'}")
            return 0
        if not (args.eval_only or args.no_early_exit_heads):
            fit_early_exit_heads(args.out, args.data, args.threads)
    card.write_card(args.out, loso=args.loso, latency=args.latency, compare=args.compare, notes="\n\n".join(args.note))
    print(f"wrote {args.out}")
    return 0
