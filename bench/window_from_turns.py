"""Can the conversation window be read from what each message's own check already computed? A probe for request N+1
at the cost of one turn pass (issue 4's cost target).

    .venv/bin/python -m bench.window_from_turns [--model models/guard-v1] [--data ../shared/data]
        [--dims 16,64] [--gates 0.02,0.05,0.1,0.2] [--cache FILE] [--vectors FILE] [--json FILE] [--write DIR]

Request N+1 of a conversation pays for two encoder passes: its new user turn, and the window (the last four messages
together, ``guard.window_max_ids`` ids). The window catches a request split or steered across turns, so it cannot
simply be dropped (the window gate, ``bench/RESULTS.md``). But every message in the window was read once before, alone,
by its own check, and the early-exit cut leaves each such pass's mean state at the cut layer
(``guardproxy.early_exit``). If the window's harm can be estimated from those vectors, a tracker that kept them
(projected small) would read the window for the cost of a small MLP, and request N+1 would cost one turn pass.

What it does:

- reads each distinct message of the conversations of ``bench.conversation_eval`` (the Trainer's splits, the
  challenge sets) through the first part of the cut graph: its cut-layer mean state, alone as a user turn is read,
  and for a reply also with the user message before it, as the reply check reads it (cached in ``--vectors``);
- takes the whole model's window harm per user turn from ``bench.conversation_eval``'s replay (its ``--cache``);
- for every user turn after the first, builds features from the messages of its window (the newest user turn's
  vector, the mean of the other messages' vectors, their product, each projected to D dimensions by a PCA fitted on
  the train split's messages; and the window's user turns' own harm, newest and highest, as logits);
- fits, on the train split's windows only, a ridge regression and a small MLP from those features to the whole
  model's window logit, with the window's other messages being its user turns only, or also its replies (alone or
  as pairs);
- reports, on the calibration, dev and challenge splits: how well the estimate ranks the windows the whole model puts
  at or above the operating point, and what the conversation flags (``bench.conversation_eval.guard_flags``, the
  shipped parameters and rules) become with the window estimated, beside the whole window and beside no window at
  all (every window read as its newest turn, as a closed window gate reads it); and with each estimate as the
  window pass's gate (``--gates``: the whole window where the estimate reaches the gate, the estimate below), with
  the share of windows that would run the pass.

``--write DIR`` writes the arm ``WRITTEN`` into ``DIR/early_exit.json`` as its ``window_estimate``
(``guardproxy.early_exit.WindowEstimate``), at the highest gate that keeps every calibration flag and early flag
of the whole window, after checking that the run-time arithmetic reproduces the fitted model on the dev windows.

Prints, never passes or fails. Needs the 'train' extra (scikit-learn). The first run scores about 30,000 messages
(a few minutes on two cores) and replays the conversations if the cache lacks them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.conversation_eval import DATA, Conv, guard_flags, load_conversations, replayed
from guardproxy.conversation import EscalationParams
from guardproxy.conversation.escalation import WINDOW_MAX_IDS, WINDOW_TURNS
from guardproxy.conversation.integrity import message_text
from guardproxy.early_exit import file_md5, pooled, score_logit
from guardproxy.settings import DEFAULT_MODEL_DIR

REPORTED = ("calibration", "dev", "challenge")
WRITTEN = "mlp d=16 none"  # the arm --write ships: user turns only, so it needs nothing a per-turn check lacks
Vectors = dict[str, npt.NDArray[np.float32]]


def window_messages(c: Conv, end: int) -> list[int]:
    """Indices of the messages the tracker's window ending at ``end`` holds: the last ``WINDOW_TURNS`` with text."""
    start = max(0, end + 1 - WINDOW_TURNS)
    return [i for i in range(start, end + 1) if message_text(c.messages[i])]


def cut_states(model: Path, items: list[tuple[str, str | None]], threads: int) -> npt.NDArray[np.float32]:
    """The mean state at the early-exit spec's cut layer of each (text, None), read as a user turn is read, or
    (prompt, reply), read as the reply check reads the pair: the first part of the cut graph only, one at a time."""
    from guardproxy.encoding import encode_pair, encode_prompt, load_tokenizer, pad_batch
    from guardproxy.training.early_exit import cut_sessions

    layer = int(json.loads((model / "early_exit.json").read_text())["layer"])
    tap, first, _ = cut_sessions(model, layer, threads)
    names = [i.name for i in first.get_inputs()]
    tokenizer = load_tokenizer(model / "tokenizer.json")
    max_length = int(json.loads((model / "config.json").read_text())["max_length"])
    out = np.zeros((len(items), 0), dtype=np.float32)
    began = time.monotonic()
    for n, (text, reply) in enumerate(items):
        if reply is None:
            encoding = encode_prompt(tokenizer, text, max_length)
        else:
            encoding = encode_pair(tokenizer, text, reply, max_length)
        feeds = pad_batch([encoding])
        (hidden,) = first.run([tap], {k: feeds[k] for k in names})
        state = pooled(hidden, feeds["attention_mask"])[0]
        if not out.shape[1]:
            out = np.zeros((len(items), state.shape[0]), dtype=np.float32)
        out[n] = state
        if (n + 1) % 2000 == 0 or n + 1 == len(items):
            rate = (n + 1) / max(time.monotonic() - began, 1e-9)
            print(f"  read {n + 1}/{len(items)} messages ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return out


def message_vectors(model: Path, convs: Sequence[Conv], threads: int, cache: Path | None) -> Vectors:
    """Every message of ``convs`` read alone (key: the text), and every assistant message read as the reply check
    reads it, with the user message before it (key: ``pair_key``); from ``cache`` when it holds this model's."""
    items: dict[tuple[str, str | None], None] = {}
    for c in convs:
        for i, m in enumerate(c.messages):
            text = message_text(m)
            if not text:
                continue
            items[(text, None)] = None
            if m.get("role") == "assistant" and (prompt := previous_user(c, i)) is not None:
                items[(prompt, text)] = None
    keys = [t if r is None else pair_key(t, r) for t, r in items]
    md5 = file_md5(model / "model.onnx")
    if cache is not None and cache.is_file():
        blob = np.load(cache, allow_pickle=False)
        if str(blob["md5"]) == md5 and list(blob["keys"]) == keys:
            return dict(zip(keys, blob["x"], strict=True))
    x = cut_states(model, list(items), threads)
    if cache is not None:
        np.savez(cache, md5=md5, keys=np.array(keys), x=x)
    return dict(zip(keys, x, strict=True))


def pair_key(prompt: str, reply: str) -> str:
    return f"{prompt}\x00{reply}"


def previous_user(c: Conv, i: int) -> str | None:
    """The text of the last user message before message ``i``."""
    return next(
        (message_text(c.messages[j]) for j in range(i - 1, -1, -1) if c.messages[j].get("role") == "user"), None
    )


def later_turns(convs: Sequence[Conv]) -> list[tuple[int, int]]:
    """(conversation, user turn) of every user turn after the first: the turns with a window."""
    return [(ci, k) for ci, c in enumerate(convs) for k in range(1, len(c.turns or []))]


def features(
    convs: Sequence[Conv], vec: Vectors, project: Any, replies: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[tuple[int, int]]]:
    """(features, the whole window's logit, (conversation, user turn) of each row) for every user turn after the
    first of each conversation. ``replies``: how the window's assistant messages count: "none" (left out), "alone"
    (read alone), "pair" (read with the user message before them, as the reply check reads them)."""
    rows: list[npt.NDArray[np.float64]] = []
    target: list[float] = []
    where = later_turns(convs)
    for ci, k in where:
        c = convs[ci]
        turns = c.turns or []
        t = turns[k]
        idx = window_messages(c, t["index"])
        others = [i for i in idx if i != t["index"]]
        if replies == "none":
            others = [i for i in others if c.messages[i].get("role") == "user"]
        p_new = project(vec[message_text(c.messages[t["index"]])][None, :])[0]
        if others:
            p_ctx = project(np.stack([vec[message_key(c, i, replies)] for i in others])).mean(axis=0)
        else:
            p_ctx = np.zeros_like(p_new)
        user_harms = [score_logit(u["harm"]) for u in turns[: k + 1] if u["index"] in idx]
        scalars = np.array([score_logit(t["harm"]), max(user_harms)])
        rows.append(np.concatenate([p_new, p_ctx, p_new * p_ctx, scalars]))
        target.append(score_logit(t["window"]))
    return np.array(rows), np.array(target), where


def message_key(c: Conv, i: int, replies: str) -> str:
    text = message_text(c.messages[i])
    if replies == "pair" and c.messages[i].get("role") == "assistant" and (prompt := previous_user(c, i)) is not None:
        return pair_key(prompt, text)
    return text


def with_windows(convs: Sequence[Conv], where: list[tuple[int, int]], values: Sequence[float]) -> list[Conv]:
    """Copies of ``convs`` with each listed user turn's window harm replaced."""
    new = {ci: [dict(t) for t in (c.turns or [])] for ci, c in enumerate(convs)}
    for (ci, k), v in zip(where, values, strict=True):
        new[ci][k]["window"] = float(v)
    return [replace(c, turns=list(new[ci])) for ci, c in enumerate(convs)]


def gated(
    convs: Sequence[Conv], where: list[tuple[int, int]], estimate: Any, gates: Sequence[float], p: Any, line: float
) -> dict[str, Any]:
    """The estimate as the window pass's gate: the whole window where the estimate reaches the gate, the estimate
    where it does not. Per gate: conversation flags, and the share of windows per group that would run the pass."""
    out: dict[str, Any] = {}
    for g in gates:
        whole = [(convs[ci].turns or [])[k]["window"] for ci, k in where]
        runs = [e >= g for e in estimate]
        values = [w if r else e for w, e, r in zip(whole, estimate, runs, strict=True)]
        passes: dict[str, list[int]] = {}
        for (ci, _), r in zip(where, runs, strict=True):
            key = f"{convs[ci].split}/{convs[ci].label}"
            passes.setdefault(key, [0, 0])
            passes[key][0] += r
            passes[key][1] += 1
        out[str(g)] = {
            "flags": flag_counts(convs, guard_flags(with_windows(convs, where, values), p, line)),
            "passes": {k: round(v[0] / v[1], 4) for k, v in passes.items()},
        }
    return out


def flag_counts(convs: Sequence[Conv], flags: Sequence[int | None]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c, f in zip(convs, flags, strict=True):
        g = out.setdefault(f"{c.split}/{c.label}", {"conversations": 0, "flagged": 0, "early": 0})
        g["conversations"] += 1
        g["flagged"] += f is not None
        g["early"] += f is not None and f < len(c.turns or [])
    return out


def write(
    directory: Path,
    arm: tuple[Any, Any, Any],
    results: dict[str, Any],
    gates: Sequence[float],
    base: dict[str, Any],
    vec: Vectors,
    by_split: dict[str, list[Conv]],
    argv: Sequence[str],
) -> int:
    """Write ``arm`` (PCA, scaler, MLP) into ``directory``'s early-exit spec as its window estimate."""
    from guardproxy.early_exit import SPEC_FILE, WindowEstimate, load_spec

    pca, scaler, mlp = arm
    whole = base["calibration"]["whole window"]
    keeps = [g for g in gates if results["arms"][WRITTEN]["calibration"]["gated"][str(g)]["flags"] == whole]
    if not keeps:
        print("error: no gate keeps the calibration split's flags: nothing written", file=sys.stderr)
        return 2
    gate = max(keeps)
    est = WindowEstimate(
        mean=pca.mean_.astype(np.float32),
        components=pca.components_.astype(np.float32),
        scale_mean=scaler.mean_.astype(np.float32),
        scale_std=scaler.scale_.astype(np.float32),
        hidden_weights=mlp.coefs_[0].astype(np.float32),
        hidden_bias=mlp.intercepts_[0].astype(np.float32),
        out_weights=mlp.coefs_[1][:, 0].astype(np.float32),
        out_bias=float(mlp.intercepts_[1][0]),
        gate=gate,
        fit={
            "command": "python -m bench.window_from_turns " + " ".join(argv),
            "arm": WRITTEN,
            "gate_chosen_on": "calibration: the highest of the gates tried that keeps every flag and early flag",
            "splits": {s: results["arms"][WRITTEN][s] for s in REPORTED},
            "baselines": base,
        },
    )
    # the run-time arithmetic must reproduce the fitted model: check it on the dev split's windows
    cs = by_split["dev"]
    x, _, where = features(cs, vec, pca.transform, "none")
    want = 1 / (1 + np.exp(-mlp.predict(scaler.transform(x))))
    got = []
    for ci, k in where:
        c, turns = cs[ci], cs[ci].turns or []
        idx = window_messages(c, turns[k]["index"])
        users = [u for u in turns[: k + 1] if u["index"] in idx]
        states = [est.project(vec[message_text(c.messages[u["index"]])][None, :])[0] for u in users]
        got.append(est.estimate(states[-1], states[:-1], [u["harm"] for u in users]))
    worst = float(np.max(np.abs(np.array(got) - want)))
    if worst > 1e-4:
        print(
            f"error: the run-time estimate differs from the fitted model by {worst:.2e}: nothing written",
            file=sys.stderr,
        )
        return 2
    path = directory / SPEC_FILE
    spec = load_spec(path, model_md5=file_md5(directory / "model.onnx"), dim=int(pca.mean_.shape[0]))
    path.write_text(json.dumps(replace(spec, window_estimate=est).to_json(), indent=1) + "\n")
    print(f"wrote the window estimate into {path}: gate {gate} (largest run-time difference {worst:.1e})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.metrics import roc_auc_score
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser(prog="python -m bench.window_from_turns", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--dims", default="16,64", help="comma-separated PCA sizes of the kept vectors (0: no PCA)")
    ap.add_argument("--gates", default="0.02,0.05,0.1,0.2", help="estimate levels that would run the window pass")
    ap.add_argument("--stitched", type=int, default=100, help="stitched long MT-Bench chats per split")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/guardproxy-conversation-eval.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--vectors",
        type=Path,
        default=Path("/tmp/guardproxy-window-from-turns.npz"),
        help="cache of the messages' cut-layer states (written on the first run)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--write",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"write the arm {WRITTEN!r} into DIR/early_exit.json as its window estimate, at the highest gate that "
        "keeps every calibration flag and early flag of the whole window",
    )
    args = ap.parse_args(argv)
    if not (args.model / "early_exit.json").is_file():
        print(f"error: {args.model}: no early_exit.json (the probe reads the spec's cut layer)", file=sys.stderr)
        return 2
    config = json.loads((args.model / "config.json").read_text()).get("data", {})
    seed, chat_turns = int(config.get("seed", 0)), bool(config.get("chat_turns", False))
    convs = load_conversations(args.data, seed, args.stitched, chat_turns)
    replayed(convs, args.model, args.cache, WINDOW_MAX_IDS, 4, False, (seed, chat_turns, args.stitched))
    print(f"{len(convs)} conversations", file=sys.stderr)
    vec = message_vectors(args.model, convs, args.threads, args.vectors)
    train_keys = {message_key(c, i, r) for c in convs if c.split == "train" for i, m in enumerate(c.messages)
                  if message_text(m) for r in ("alone", "pair")}  # fmt: skip
    train_x = np.stack([vec[k] for k in sorted(train_keys)])

    p = EscalationParams()
    line = 0.5
    gates = [float(g) for g in args.gates.split(",")]
    by_split = {s: [c for c in convs if c.split == s] for s in ("train", *REPORTED)}
    results: dict[str, Any] = {"model": str(args.model), "arms": {}}
    base: dict[str, Any] = {}
    for split in REPORTED:
        cs = by_split[split]
        where = later_turns(cs)
        no_window = [(cs[ci].turns or [])[k]["harm"] for ci, k in where]
        base[split] = {
            "whole window": flag_counts(cs, guard_flags(cs, p, line)),
            "no window": flag_counts(cs, guard_flags(with_windows(cs, where, no_window), p, line)),
        }
    results["baselines"] = base

    arms = [
        (f"{kind} d={d} {replies}", d, replies, kind)
        for d in [int(x) for x in args.dims.split(",")]
        for replies in ("none", "alone", "pair")
        for kind in ("ridge", "mlp")
    ]
    fitted: dict[str, tuple[Any, Any, Any]] = {}
    for name, d, replies, kind in arms:
        pca = PCA(n_components=d, random_state=0).fit(train_x) if d > 0 else None
        project: Any = pca.transform if pca is not None else np.asarray
        x_tr, y_tr, _ = features(by_split["train"], vec, project, replies)
        scaler = StandardScaler().fit(x_tr)
        if kind == "ridge":
            reg: Any = Ridge(alpha=10.0).fit(scaler.transform(x_tr), y_tr)
        else:
            reg = MLPRegressor(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=1000, early_stopping=True, random_state=0)
            reg.fit(scaler.transform(x_tr), y_tr)
        arm: dict[str, Any] = {"train_windows": len(y_tr)}
        for split in REPORTED:
            cs = by_split[split]
            x, y, where = features(cs, vec, project, replies)
            est = reg.predict(scaler.transform(x))
            op = 1 / (1 + np.exp(-est))
            hot = y >= score_logit(line)
            auroc = float(roc_auc_score(hot, est)) if 0 < hot.sum() < len(hot) else None
            arm[split] = {
                "windows": len(y),
                "whole_at_or_over_line": int(hot.sum()),
                "auroc_vs_whole": None if auroc is None else round(auroc, 4),
                "estimate_at_or_over_line": int((op >= line).sum()),
                "both": int(((op >= line) & hot).sum()),
                "r_logit": round(float(np.corrcoef(est, y)[0, 1]), 4),
                "flags": flag_counts(cs, guard_flags(with_windows(cs, where, op), p, line)),
                "gated": gated(cs, where, op, gates, p, line),
            }
        results["arms"][name] = arm
        fitted[name] = (pca, scaler, reg)
        print(f"fitted {name} on {len(y_tr)} train windows", file=sys.stderr)

    groups = sorted({g for s in REPORTED for g in base[s]["whole window"]})
    print("\nconversations flagged / flagged before the final user turn (guard_flags, shipped parameters):")
    print("the whole window, no window (each read as its newest turn), and each estimate")
    names = ["whole", "none", *(n for n, *_ in arms)]
    width = max(len(n) for n in names)
    print(f"{'':{width}} " + " ".join(f"{g:>24}" for g in groups))  # noqa: RUF100
    print(f"{'conversations':{width}} " + " ".join(f"{base[g.split('/')[0]]['whole window'][g]['conversations']:>24d}"
                                                  for g in groups))  # fmt: skip
    for n in names:
        cells = []
        for g in groups:
            split = g.split("/")[0]
            f = base[split]["whole window" if n == "whole" else "no window"][g] if n in ("whole", "none") else (
                results["arms"][n][split]["flags"][g])  # fmt: skip
            cells.append(f"{f['flagged']:>4d} / {f['early']:<4d}".rjust(24))
        print(f"{n:{width}} " + " ".join(cells))
    print("\nwindows the whole model reads at or over the line that the estimate does too (+ its others), its AUROC")
    for n, *_ in arms:
        parts = [
            f"{s} {a['both']}/{a['whole_at_or_over_line']} (+{a['estimate_at_or_over_line'] - a['both']}) "
            f"AUROC {a['auroc_vs_whole']} r {a['r_logit']}"
            for s in REPORTED
            if (a := results["arms"][n][s])
        ]
        print(f"  {n:{width}} " + "; ".join(parts))
    print("\nthe estimate as the window pass's gate: flagged / early, and the share of windows that run the pass")
    for n, *_ in arms:
        for g in gates:
            cells = []
            for grp in groups:
                split = grp.split("/")[0]
                r = results["arms"][n][split]["gated"][str(g)]
                f = r["flags"][grp]
                cells.append(f"{f['flagged']:>4d} / {f['early']:<4d} {r['passes'][grp]:6.1%}".rjust(24))
            print(f"{n + f' gate {g}':{width + 10}} " + " ".join(cells))
    if args.write is not None:
        if WRITTEN not in fitted:
            print(f"error: --write needs the arm {WRITTEN!r}: include 16 in --dims", file=sys.stderr)
            return 2
        return write(
            args.write, fitted[WRITTEN], results, gates, base, vec, by_split, sys.argv[1:] if argv is None else argv
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
