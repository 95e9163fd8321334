"""Would a held batch of (prompt, reply) pairs fix the refusal head? A head-only refit on frozen embeddings.

    .venv/bin/python -m bench.refusal_head_refit [--data ../shared/data] [--held FILE] [--train-pairs 3000]

The shipped model's encoder reads every pair once (``embedding``, its pooled output in pair mode) and a multinomial
logistic regression is fitted on the train split's pairs, twice: without the held batch and with its train-split
families. Both are scored on the dev split's pairs (the public sets and the authored ones) and on the held batch's
dev and calibration families; the shipped head is scored beside them (``refusal_partial`` rule of
``models/README.md``). Splits are the trainer's (``assign_splits``, the model's seed); the held rows are split by
family the same way. A probe for whether the batch is worth a training run: a linear head on frozen features is
not the fine-tuned model. Prints, never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from guardproxy.encoding import encode_pair, load_tokenizer, pad_batch
from guardproxy.normalize import normalize
from guardproxy.settings import DEFAULT_MODEL_DIR, PROJECT_ROOT
from guardproxy.signals import REFUSAL_CLASSES
from guardproxy.training.sources import Example, load_all
from guardproxy.training.splits import assign_splits

# The batch this probe was written for. It has been loaded by the trainer since 2.34.1, so the "without" fit holds its
# train families as well now: pass --held with a batch under authored/held/ to probe a new one.
HELD = PROJECT_ROOT / "guardproxy" / "training" / "authored" / "responses_clarify16.jsonl"


def held_examples(path: Path) -> list[Example]:
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out.append(
            Example(
                text=row["prompt"],
                source="held/" + path.stem,
                group=row["family"],
                label=row["prompt_label"],
                reply=row["response"],
                refusal=REFUSAL_CLASSES.index(row["refusal"]),
                meta={"voice": row["voice"]},
            )
        )
    return out


def embed(
    session: ort.InferenceSession, tokenizer: object, max_length: int, rows: Sequence[Example]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(embeddings, the shipped head's refusal probabilities) of the pairs, in batches of 16."""
    embs, probs = [], []
    for start in range(0, len(rows), 16):
        batch = rows[start : start + 16]
        enc = [encode_pair(tokenizer, normalize(e.text), normalize(e.reply or ""), max_length) for e in batch]  # type: ignore[arg-type]
        refusal, embedding = session.run(["refusal", "embedding"], pad_batch(enc))
        embs.append(embedding)
        probs.append(refusal)
        if (start // 16) % 50 == 0:
            print(f"  encoded {start + len(batch)}/{len(rows)} pairs", file=sys.stderr)
    return np.concatenate(embs), np.concatenate(probs)


def shipped_classes(probs: npt.NDArray[np.float32], line: float) -> npt.NDArray[np.int64]:
    refused = probs[:, 1] + probs[:, 2] >= line
    return np.where(refused, np.where(probs[:, 1] >= probs[:, 2], 1, 2), 0).astype(np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refusal_head_refit", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--held", type=Path, default=HELD)
    parser.add_argument("--train-pairs", type=int, default=3000, help="train pairs drawn (seeded) for the fit")
    parser.add_argument("--dev-pairs", type=int, default=2000, help="dev pairs drawn (seeded) for the score")
    args = parser.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text())
    data = config.get("data", {})
    seed = int(data.get("seed", 0))
    examples = load_all(args.data, seed=seed, chat_turns=bool(data.get("chat_turns", False)))
    held = held_examples(args.held)
    assign_splits([*examples, *held], seed)
    pairs = [e for e in examples if e.pair and e.refusal is not None]
    rng = random.Random(seed)
    train = [e for e in pairs if e.split == "train"]
    dev = [e for e in pairs if e.split == "dev"]
    train = rng.sample(train, min(args.train_pairs, len(train)))
    dev = rng.sample(dev, min(args.dev_pairs, len(dev)))
    held_train = [e for e in held if e.split == "train"]
    held_eval = [e for e in held if e.split != "train"]
    print(f"pairs: train {len(train)} (+{len(held_train)} held), dev {len(dev)}, held eval {len(held_eval)}")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(args.model / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    tokenizer = load_tokenizer(args.model / "tokenizer.json")
    max_length = int(config.get("max_length", 256))
    line = float(config.get("thresholds", {}).get("refusal_partial", 0.5))
    x_train, _ = embed(session, tokenizer, max_length, train)
    x_held_train, _ = embed(session, tokenizer, max_length, held_train)
    x_dev, p_dev = embed(session, tokenizer, max_length, dev)
    x_held, p_held = embed(session, tokenizer, max_length, held_eval)
    y_train = np.array([e.refusal for e in train])
    y_held_train = np.array([e.refusal for e in held_train])
    y_dev = np.array([e.refusal for e in dev])
    y_held = np.array([e.refusal for e in held_eval])

    fits = {
        "refit without the batch": LogisticRegression(max_iter=2000, C=1.0).fit(x_train, y_train),
        "refit with its train families": LogisticRegression(max_iter=2000, C=1.0).fit(
            np.concatenate([x_train, x_held_train]), np.concatenate([y_train, y_held_train])
        ),
    }
    rows = [("shipped head", shipped_classes(p_dev, line), shipped_classes(p_held, line))]
    rows += [(name, m.predict(x_dev), m.predict(x_held)) for name, m in fits.items()]
    helpful = y_held == 0
    print(f"{'head':32s} {'dev macro-F1':>12s} {'held eval macro-F1':>19s} {'held helpful read as refusal':>29s}")
    for name, d, h in rows:
        dev_f1 = f1_score(y_dev, d, average="macro", labels=[0, 1, 2])
        held_f1 = f1_score(y_held, h, average="macro", labels=[0, 1, 2])
        wrong = int(np.sum(h[helpful] != 0))
        print(f"{name:32s} {dev_f1:12.3f} {held_f1:19.3f} {wrong:>20d} of {int(helpful.sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
