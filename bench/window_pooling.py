"""The window pass pooled over its newest turn only: an experiment on the shipped graph, no retraining.

``python -m bench.window_pooling [--model DIR] [--json OUT]``

The guard model's heads read the mean of every token of their input. A window is the last four messages joined, so
a harmful ask after a few lines of small talk is averaged with the small talk, and the window reads it as much less
harmful than the ask alone (``bench.asks_after_chat``). Here the graph gets a second mask for the mean
(``pool_mask``: the model's own ``attention_mask`` feeds only its attention), set to the newest user turn's tokens:
the encoder still reads the whole window, so those tokens carry its context, but the mean no longer counts the
context's own tokens.

Measured, each with the whole-window mean (today's) and the newest-turn mean, with every window scored:

- the English held-out asks after one to three exchanges of a harmless dev chat (``asks_after_chat``'s requests):
  turn alone at the harm threshold, and turn plus window at a second-opinion level W;
- dev and challenge conversations: per conversation, whether the per-turn rule flags a turn, and whether it does
  when a later turn also needs its window at W (the window as a second opinion); for escalations, whether the window
  reaches the harm threshold at some turn.

W is on the operating scale (0.5 = the model's calibrated harm threshold; below it the scale is linear).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.asks_after_chat import LABELS, held_out_rows, parse_levels, requests
from bench.conversation_eval import DATA, load_conversations
from guardproxy.conversation.escalation import WINDOW_MAX_IDS, WINDOW_TURNS, window_text
from guardproxy.encoding import POOL_INPUT, encode_prompt, encode_window, load_tokenizer, pad_batch
from guardproxy.normalize import normalize
from guardproxy.settings import DEFAULT_MODEL_DIR

CHECKS = (0.2, 0.3, 0.5)
TURN_IDS = 256


def with_pool_mask(model_path: Path) -> Any:
    """The graph of ``model_path`` with a ``pool_mask`` input feeding the mean pooling in place of attention_mask."""
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    if any(i.name == POOL_INPUT for i in graph.input):  # trained with --window-pool newest: it has the input
        return model
    # the pooling's Unsqueeze reads attention_mask outside the encoder (export of training.model.mean_pool)
    pools = [
        n
        for n in graph.node
        if n.op_type == "Unsqueeze" and "attention_mask" in n.input and not n.name.startswith("/model/encoder/")
    ]
    if len(pools) != 1:
        raise SystemExit(f"{model_path}: expected one pooling Unsqueeze of attention_mask, found {len(pools)}")
    pools[0].input[0] = POOL_INPUT
    graph.input.append(onnx.helper.make_tensor_value_info(POOL_INPUT, onnx.TensorProto.INT64, ["batch", "seq"]))
    return model


def write_rewired(model_dir: Path, out: Path, version: str) -> None:
    """A copy of the model directory ``model_dir`` in ``out`` whose graph has ``pool_mask`` (``with_pool_mask``) and
    whose config says ``version``: the same weights, its windows read through their newest turn by the gateway."""
    import shutil

    import onnx

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "metrics.json", "MODEL_CARD.md", "scores.png"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    onnx.save(with_pool_mask(model_dir / "model.onnx"), str(out / "model.onnx"))
    config = json.loads((model_dir / "config.json").read_text())
    config["version"] = version
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


class PooledScorer:
    """Harm of a text (raw probability), with the mean over every token or over its newest turn (``encode_window``)."""

    def __init__(self, model_dir: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        graph = with_pool_mask(model_dir / "model.onnx").SerializeToString()
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(model_dir / "tokenizer.json")
        self.threshold = float(json.loads((model_dir / "config.json").read_text())["thresholds"]["harm"])

    def harm(self, text: str, max_length: int, newest: str | None = None) -> tuple[float, float]:
        """(whole-input mean, newest-turn mean); ``newest`` is the text of the input's last line (its newest turn)."""
        feed = pad_batch([encode_prompt(self.tokenizer, normalize(text), max_length)], pool_mask=True)
        full = float(self.session.run(["harm"], feed)[0][0])
        if newest is None:
            return full, full
        window = encode_window(self.tokenizer, normalize(text), normalize(newest), max_length)  # as the gateway does
        last = float(self.session.run(["harm"], pad_batch([window], pool_mask=True))[0][0])
        return full, last

    def level(self, w: float) -> float:
        """A level on the operating scale (0.5 = threshold, linear below it) as a raw probability."""
        return w / 0.5 * self.threshold


def window_of(messages: Sequence[dict[str, str]]) -> tuple[str, str]:
    """The window ending at the last message and its newest turn, in the gateway's format (escalation.window_text)."""
    turns = [(m["role"], m["content"]) for m in messages[-WINDOW_TURNS:]]
    return window_text(turns), window_text(turns[-1:])


def _options(argv: Sequence[str] | None) -> tuple[argparse.Namespace, tuple[float, ...]]:
    parser = argparse.ArgumentParser(prog="python -m bench.window_pooling", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--checks",
        default=",".join(f"{w:g}" for w in CHECKS),
        help="second-opinion levels W on the operating scale, comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--write-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the rewired model directory to DIR (version --version) and stop",
    )
    parser.add_argument("--version", default=None, help="the rewired model's version (with --write-model)")
    args = parser.parse_args(argv)
    if args.write_model is not None and not args.version:
        parser.error("--write-model needs --version")
    return args, tuple(parse_levels(parser, "--checks", args.checks))


def main(argv: Sequence[str] | None = None) -> int:
    args, checks = _options(argv)
    if args.write_model is not None:
        write_rewired(args.model, args.write_model, args.version)
        print(f"wrote {args.write_model}")
        return 0
    scorer = PooledScorer(args.model)
    thr = scorer.threshold

    rows = held_out_rows()
    convs = load_conversations(args.data, 0, 100)
    chats = [c.messages for c in convs if c.set == "mtbench" and c.split == "dev"]
    asks: dict[str, list[tuple[float, float, float]]] = {"harmful": [], "harmless": []}
    for i, (row, request) in enumerate(zip(rows, requests(rows, chats, 1), strict=True)):
        turn, _ = scorer.harm(row["prompt"], TURN_IDS)
        asks[LABELS[row["label"]]].append((turn, *scorer.harm(*_window_args(request))))
        if (i + 1) % 500 == 0:
            print(f"  asks after a chat: {i + 1}/{len(rows)}", file=sys.stderr)

    per_conv: dict[str, list[list[tuple[float, float, float]]]] = {}
    chosen = [c for c in convs if c.split in ("dev", "challenge")]
    for i, c in enumerate(chosen):
        record = []
        for k, index in enumerate([j for j, m in enumerate(c.messages) if m["role"] == "user"]):
            turn, _ = scorer.harm(c.messages[index]["content"], TURN_IDS)
            full, last = (turn, turn) if k == 0 and index == 0 else scorer.harm(*_window_args(c.messages[: index + 1]))
            record.append((turn, full, last))
        per_conv.setdefault(f"{c.split}/{c.set}:{c.label}", []).append(record)
        if (i + 1) % 200 == 0:
            print(f"  conversations: {i + 1}/{len(chosen)}", file=sys.stderr)

    out: dict[str, Any] = {
        "model": str(args.model),
        "threshold": thr,
        "checks": checks,
        "asks": {},
        "conversations": {},
    }
    print(
        "\nasks after a harmless chat: turn >= threshold, and turn plus window >= W (whole-window / newest-turn mean)"
    )
    for label, triples in asks.items():
        n = len(triples)
        entry: dict[str, float] = {"n": n, "turn": sum(t >= thr for t, _, _ in triples) / n}
        for w in checks:
            entry[f"full@{w:g}"] = sum(t >= thr and f >= scorer.level(w) for t, f, _ in triples) / n
            entry[f"newest@{w:g}"] = sum(t >= thr and x >= scorer.level(w) for t, _, x in triples) / n
        out["asks"][label] = entry
        cells = " ".join(f"W={w:g} {entry[f'full@{w:g}']:6.1%} / {entry[f'newest@{w:g}']:6.1%}" for w in checks)
        print(f"  {label:8s} n={n:4d} turn {entry['turn']:6.1%}  {cells}")
    print("\nconversations flagged by the per-turn rule, alone and with the window at W (whole-window / newest-turn)")
    for key, records in sorted(per_conv.items()):
        n = len(records)
        entry = {"n": n, "per_turn": sum(any(t >= thr for t, _, _ in r) for r in records) / n}
        for w in checks:
            for name, pos in (("full", 1), ("newest", 2)):
                entry[f"{name}@{w:g}"] = (
                    sum(
                        any(x[0] >= thr and (k == 0 or x[pos] >= scorer.level(w)) for k, x in enumerate(r))
                        for r in records
                    )
                    / n
                )
        if ":escalation" in key:
            entry["window_full"] = sum(any(x[1] >= thr for x in r) for r in records) / n
            entry["window_newest"] = sum(any(x[2] >= thr for x in r) for r in records) / n
        out["conversations"][key] = entry
        cells = " ".join(f"W={w:g} {entry[f'full@{w:g}']:6.1%} / {entry[f'newest@{w:g}']:6.1%}" for w in checks)
        print(f"  {key:32s} n={n:3d} per-turn {entry['per_turn']:6.1%}  {cells}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def _window_args(messages: Sequence[dict[str, str]]) -> tuple[str, int, str]:
    text, newest = window_of(messages)
    return text, WINDOW_MAX_IDS, newest


if __name__ == "__main__":
    sys.exit(main())
