"""Fit the early-exit head of a guard model (``guardproxy.early_exit``) and write its ``early_exit.json``.

    python -m guardproxy.training.early_exit --model models/guard-v1 --data ../shared/data [--layer 2]
        [--harm-line 0.15] [--jailbreak-line 0.5] [--miss 0.002] [--min-ids 24] [--train-rows 8000]

The teacher is the model itself, not the labels: a prompt row is "kept" when the whole model scores it at or above
``--harm-line`` for harm or ``--jailbreak-line`` for jailbreak (operating scale, 0.5 = the calibrated threshold). Every
prompt row of the model's own data split (``load_all`` and ``assign_splits`` with the seed in its ``config.json``) is
scored one at a time, as the gateway scores it, through the graph cut at ``--layer``. On the cut layer's mean state:

- a logistic regression (scikit-learn, from the train extra) on up to ``--train-rows`` train rows learns "kept";
- ridge regressions on the same rows estimate the whole model's harm and jailbreak logits (what an exited turn
  reports, capped below the lines);
- the exit threshold is set on the calibration split: the highest at which at most ``--miss`` of its kept rows would
  exit (rows shorter than ``--min-ids`` ids never exit, and do not count);
- the dev split, used for neither, is where the head is reported: its exit rate, and kept rows that would exit.

The fit writes what it measured into the spec's ``fit`` and prints it. Progress goes to stderr.

``--windows`` fits the window's head instead, on the conversation windows of each split (the training rows with a
newest turn, read at ``--window-ids`` ids, as the gateway's window pass reads them), and writes it into the existing
spec's ``window`` (the per-turn head must be fitted first: the two share the cut). The prompt head cannot be reused
on windows (``bench.window_exit``). A refit of the per-turn head keeps the spec's window head, and its window estimate
(``python -m bench.window_from_turns --write DIR``), when the model and the cut are the same.

    python -m guardproxy.training.early_exit --model models/guard-v1 --data ../shared/data --windows

Check a new window head's effect on the conversation flags with ``python -m bench.window_exit``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from guardproxy.early_exit import (
    SPEC_FILE,
    ExitSpec,
    Linear,
    WindowHead,
    file_md5,
    load_spec,
    pooled,
    split_graph,
    tap_name,
)
from guardproxy.signals import to_operating_scale

SPLITS = ("train", "calibration", "dev")


Row = tuple[str, str | None]  # (text, its newest turn when it is a conversation window)


def prompt_rows(data: Path, config: dict[str, Any], train_rows: int, *, windows: bool = False) -> dict[str, list[Row]]:
    """The prompt-mode texts (no reply, not a window) of each split of the model's own data split; with
    ``windows``, the conversation windows instead (with their newest turns)."""
    from guardproxy.training.sources import load_all
    from guardproxy.training.splits import assign_splits

    seed = int(config.get("data", {}).get("seed", 0))
    chat_turns = bool(config.get("data", {}).get("chat_turns", False))
    chat_replies = bool(config.get("data", {}).get("chat_replies", False))
    examples = load_all(data, seed=seed, chat_turns=chat_turns, chat_replies=chat_replies)
    assign_splits(examples, seed)
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for e in examples:
        if e.reply is None and (e.newest is not None) == windows and e.split in out:
            out[e.split].append((e.text, e.newest))
    for split in SPLITS:
        out[split] = list(dict.fromkeys(out[split]))
    random.Random(seed).shuffle(out["train"])
    out["train"] = out["train"][:train_rows]
    return out


def cut_sessions(model_dir: Path, layer: int, threads: int) -> tuple[str, Any, Any]:
    """(the tap's name, the first part's session, the rest's) of ``model_dir``'s graph cut after ``layer``, each
    session with ``threads`` intra-op threads (in this process: a fit or a probe, not the gateway)."""
    import onnx
    import onnxruntime as ort

    model_path = model_dir / "model.onnx"
    tap = tap_name(onnx.load(str(model_path)).graph, layer)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    parts = [
        ort.InferenceSession(b, sess_options=opts, providers=["CPUExecutionProvider"])
        for b in split_graph(model_path, tap)
    ]
    return tap, parts[0], parts[1]


def score(
    model_dir: Path, layer: int, texts: dict[str, list[Row]], threads: int, max_length: int | None = None
) -> dict[str, dict[str, Any]]:
    """Per split: the cut layer's mean states and the whole model's raw harm and jailbreak, one text per run, each
    read at ``max_length`` ids (default: the model's); a window as the gateway's window pass encodes it."""
    from guardproxy.encoding import POOL_INPUT, encode_prompt, encode_window, load_tokenizer, pad_batch

    tap, first, rest = cut_sessions(model_dir, layer, threads)
    first_in = [i.name for i in first.get_inputs()]
    rest_in = [i.name for i in rest.get_inputs() if i.name != tap]
    pools = POOL_INPUT in rest_in
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    max_length = max_length or int(json.loads((model_dir / "config.json").read_text())["max_length"])
    out: dict[str, dict[str, Any]] = {"tap": {"name": tap}}
    total = sum(len(v) for v in texts.values())
    done, began = 0, time.monotonic()
    for split, rows in texts.items():
        x = np.zeros((len(rows), 0), dtype=np.float32)
        harm = np.zeros(len(rows), dtype=np.float64)
        jailbreak = np.zeros(len(rows), dtype=np.float64)
        ids = np.zeros(len(rows), dtype=np.int64)
        for i, (text, newest) in enumerate(rows):
            if newest is not None:
                encoding = encode_window(tokenizer, text, newest, max_length)
            else:
                encoding = encode_prompt(tokenizer, text, max_length)
            feeds = pad_batch([encoding], pool_mask=pools)
            (hidden,) = first.run([tap], {k: feeds[k] for k in first_in})
            h, j = rest.run(["harm", "jailbreak"], {**{k: feeds[k] for k in rest_in}, tap: hidden})
            state = pooled(hidden, feeds["attention_mask"])[0]
            if not x.shape[1]:
                x = np.zeros((len(rows), state.shape[0]), dtype=np.float32)
            x[i], harm[i], jailbreak[i] = state, float(np.ravel(h)[0]), float(np.ravel(j)[0])
            ids[i] = int(feeds["attention_mask"].sum())
            done += 1
            if done % 1000 == 0 or done == total:
                rate = done / max(time.monotonic() - began, 1e-9)
                print(f"  scored {done}/{total} rows ({rate:.0f}/s, {split})", file=sys.stderr, flush=True)
        out[split] = {"x": x, "harm": harm, "jailbreak": jailbreak, "ids": ids}
    return out


def _fold(coef: np.ndarray, intercept: float, mean: np.ndarray, scale: np.ndarray) -> Linear:
    """A linear model on standardized inputs as one on the raw pooled states."""
    weights = coef / scale
    return Linear(weights.astype(np.float32), float(intercept - float(np.dot(coef, mean / scale))))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit(
    scored: dict[str, dict[str, Any]],
    thresholds: dict[str, float],
    *,
    harm_line: float,
    jailbreak_line: float,
    miss: float,
    min_ids: int,
) -> tuple[Linear, float, Linear, Linear, dict[str, Any]]:
    """(exit head, its threshold, harm estimate, jailbreak estimate, what was measured)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    def op(raw: np.ndarray, t: float) -> np.ndarray:
        return np.array([to_operating_scale(float(v), t) for v in raw])

    def kept(split: str) -> np.ndarray:
        s = scored[split]
        return (op(s["harm"], thresholds["harm"]) >= harm_line) | (
            op(s["jailbreak"], thresholds["jailbreak"]) >= jailbreak_line
        )

    train = scored["train"]
    scaler = StandardScaler().fit(train["x"])
    z_train = scaler.transform(train["x"])
    y = kept("train")
    if y.all() or not y.any():
        raise ValueError("the train rows are all on one side of the lines: nothing to learn")
    clf = LogisticRegression(C=0.1, max_iter=5000).fit(z_train, y)
    head = _fold(clf.coef_[0], float(clf.intercept_[0]), scaler.mean_, scaler.scale_)
    estimates = []
    for name in ("harm", "jailbreak"):
        reg = Ridge(alpha=1.0).fit(z_train, _logit(train[name]))
        estimates.append(_fold(reg.coef_, float(reg.intercept_), scaler.mean_, scaler.scale_))
    cal_kept = kept("calibration") & (scored["calibration"]["ids"] >= min_ids)
    if not cal_kept.any():
        raise ValueError("the calibration split has no row the model keeps: no threshold can be set")
    cal_z = np.sort(head(scored["calibration"]["x"])[cal_kept])
    threshold = float(cal_z[int(np.floor(miss * len(cal_z)))])
    report: dict[str, Any] = {}
    for split in SPLITS:
        s = scored[split]
        k = kept(split)
        flagged = (op(s["harm"], thresholds["harm"]) >= 0.5) | (op(s["jailbreak"], thresholds["jailbreak"]) >= 0.5)
        out = (head(s["x"]) < threshold) & (s["ids"] >= min_ids)
        est = 1 / (1 + np.exp(-estimates[0](s["x"]).astype(np.float64)))
        err = np.abs(op(est, thresholds["harm"]) - op(s["harm"], thresholds["harm"]))[out]
        report[split] = {
            "rows": int(len(k)),
            "kept": int(k.sum()),
            "exit_rate": round(float(out.mean()), 4),
            "exit_rate_of_the_rest": round(float(out[~k].mean()), 4) if (~k).any() else None,
            "kept_that_exit": int((out & k).sum()),
            # at the calibrated threshold itself (0.5), what the default policy flags
            "flagged_that_exit": int((out & flagged).sum()),
            "exited_harm_estimate_error_p50": round(float(np.median(err)), 4) if len(err) else None,
            "exited_harm_estimate_error_p99": round(float(np.quantile(err, 0.99)), 4) if len(err) else None,
        }
    return head, threshold, estimates[0], estimates[1], report


def _existing(path: Path, md5: str, layer: int, *, required: bool) -> ExitSpec | None:
    """The spec at ``path`` if it was fitted on this model and cut at ``layer`` (its window head stays valid);
    None otherwise. ``required`` (a window fit, which writes into it): ``ValueError`` instead of None."""
    from guardproxy.errors import ClassifierError

    if not path.is_file():
        if required:
            raise ValueError("no spec to add the window head to: fit the per-turn head first (without --windows)")
        return None
    try:
        doc = json.loads(path.read_text())
        dim = len(doc["exit"]["weights"])
        spec = load_spec(path, model_md5=md5, dim=dim)
    except (ClassifierError, OSError, KeyError, TypeError, ValueError) as exc:
        if required:
            raise ValueError(f"cannot add the window head to it: {exc}") from exc
        return None
    if spec.layer != layer:
        if required:
            raise ValueError(f"its cut is after layer {spec.layer}, not {layer}: pass --layer {spec.layer}")
        return None
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardproxy.training.early_exit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/guard-v1"), help="the model directory")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data sets")
    ap.add_argument("--layer", type=int, default=2, help="the encoder layer (0-based) whose output the head reads")
    ap.add_argument("--harm-line", type=float, default=0.15, help="operating-scale harm at which a turn never exits")
    ap.add_argument("--jailbreak-line", type=float, default=0.5, help="the same for jailbreak")
    ap.add_argument("--miss", type=float, default=0.002, help="share of calibration rows kept that may exit")
    ap.add_argument("--min-ids", type=int, default=24, help="turns of fewer ids never exit")
    ap.add_argument("--train-rows", type=int, default=8000, help="train rows the head is fitted on (sampled)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    ap.add_argument("--out", type=Path, help=f"where the spec goes (default: MODEL/{SPEC_FILE})")
    ap.add_argument(
        "--windows",
        action="store_true",
        help="fit the conversation window's head and write it into the existing spec (fit the per-turn head first)",
    )
    ap.add_argument("--window-ids", type=int, default=96, help="ids of a window, with --windows (the gateway's)")
    args = ap.parse_args(argv)
    if args.window_ids < 8:
        ap.error("--window-ids must be at least 8")
    for name in ("harm_line", "jailbreak_line"):
        if not 0 < getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must lie in (0, 1]")
    if not 0 <= args.miss < 1:
        ap.error("--miss must lie in [0, 1)")
    model_path = args.model / "model.onnx"
    try:
        config = json.loads((args.model / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {args.model / 'config.json'}: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.model / SPEC_FILE
    md5 = file_md5(model_path)
    try:
        existing = _existing(out, md5, args.layer, required=args.windows)
    except ValueError as exc:
        print(f"error: {out}: {exc}", file=sys.stderr)
        return 2
    began = time.monotonic()
    texts = prompt_rows(args.data, config, args.train_rows, windows=args.windows)
    print(
        ("window rows: " if args.windows else "prompt rows: ")
        + ", ".join(f"{s} {len(v)}" for s, v in texts.items())
        + f" (layer {args.layer})",
        file=sys.stderr,
    )
    try:
        scored = score(args.model, args.layer, texts, args.threads, args.window_ids if args.windows else None)
        head, threshold, harm, jailbreak, report = fit(
            scored,
            config["thresholds"],
            harm_line=args.harm_line,
            jailbreak_line=args.jailbreak_line,
            miss=args.miss,
            min_ids=args.min_ids,
        )
    except ValueError as exc:
        print(f"error: {args.model}: {exc}", file=sys.stderr)
        return 2
    fitted = {
        "command": "python -m guardproxy.training.early_exit " + " ".join(sys.argv[1:] if argv is None else argv),
        "model_version": config.get("version"),
        "miss": args.miss,
        "train_rows": args.train_rows,
        "splits": report,
        "seconds": round(time.monotonic() - began, 1),
    }
    head_fields = {
        "exit": head,
        "threshold": threshold,
        "harm": harm,
        "jailbreak": jailbreak,
        "harm_line": args.harm_line,
        "jailbreak_line": args.jailbreak_line,
        "min_ids": args.min_ids,
    }
    if args.windows:
        assert existing is not None
        spec = replace(existing, window=WindowHead(**head_fields, max_ids=args.window_ids, fit=fitted))
        out.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
        print(json.dumps(report, indent=1))
        print(f"wrote the window head into {out}: a {args.window_ids}-id window exits when the head's logit < "
              f"{threshold:.4f}", file=sys.stderr)  # fmt: skip
        return 0
    spec = ExitSpec(
        **head_fields,
        model_md5=md5,
        layer=args.layer,
        tap=scored["tap"]["name"],
        fit=fitted,
        window=existing.window if existing is not None else None,
        window_estimate=existing.window_estimate if existing is not None else None,
    )
    if existing is not None and existing.window is not None:
        print(f"kept the window head of {out} (same model, same cut)", file=sys.stderr)
    if existing is not None and existing.window_estimate is not None:
        print(f"kept the window estimate of {out} (same model, same cut)", file=sys.stderr)
    out.write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out}: exit when the head's logit < {threshold:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
