"""Can the gateway tell English from other languages with what it already computes? A probe for an own harm line.

    .venv/bin/python -m bench.language_signal [--model models/guard-v1] [--data ../shared/data] [--json OUT]

Candidate 2.28.0 showed that other languages need an operating point of their own (`bench/results/candidates/
README.md`), and the gateway has no language signal. This fits two logistic regressions, English or not, on the
train split's single prompts (the 519 in other languages, by the authored rows' `language` field, and three times as
many English ones drawn with seed 0), each from features the gateway has for free:

- `tokens`: the tokenization's share of continuation pieces (`##`), of `[UNK]` pieces, and the share of non-ASCII
  letters (English text tokenizes into whole words; other languages break into pieces);
- `embedding`: the guard model's own sentence embedding (the `embedding` output the rephrase check uses).

It then reports the share of each held-out pool read as "other language": the seven English challenge sets and the
three multilingual ones (challenge4, 9, 10). No run trained on these. Needs the 'train' extra (scikit-learn).
Prints, never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from guardproxy.classifier import OnnxClassifier
from guardproxy.settings import DEFAULT_MODEL_DIR, PROJECT_ROOT

ENGLISH = ("challenge", "challenge2", "challenge3", "challenge5", "challenge6", "challenge7", "challenge8")
OTHER = ("challenge4", "challenge9", "challenge10")


def pool(names: Sequence[str]) -> list[str]:
    files = [PROJECT_ROOT / "bench" / n / f"harm_{n}.jsonl" for n in names]
    return [json.loads(line)["prompt"] for f in files for line in f.read_text().splitlines() if line.strip()]


def token_features(clf: OnnxClassifier) -> Callable[[list[str]], np.ndarray]:
    tokenizer = clf._tokenizer

    def features(texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            pieces = [p for p in tokenizer.encode(text).tokens if p not in ("[CLS]", "[SEP]")]
            n = max(1, len(pieces))
            letters = [c for c in text if c.isalpha()]
            rows.append(
                [
                    sum(p.startswith("##") for p in pieces) / n,
                    sum(p == "[UNK]" for p in pieces) / n,
                    sum(ord(c) > 127 for c in letters) / max(1, len(letters)),
                ]
            )
        return np.array(rows)

    return features


def embedding_features(clf: OnnxClassifier) -> Callable[[list[str]], np.ndarray]:
    def features(texts: list[str]) -> np.ndarray:
        out: list[np.ndarray] = []
        for start in range(0, len(texts), 64):
            out += [s.embedding for s in clf.score_prompts_sync(texts[start : start + 64])]
            print(f"\r  embedded {min(start + 64, len(texts))}/{len(texts)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        return np.array(out)

    return features


def training_rows(data: Path) -> tuple[list[str], np.ndarray]:
    from guardproxy.training.augment import language_of
    from guardproxy.training.sources import load_all
    from guardproxy.training.splits import assign_splits

    examples = load_all(data, authored=True, seed=0, chat_turns=True)
    assign_splits(examples, 0)
    single = [e for e in examples if e.split == "train" and e.reply is None and e.newest is None]
    other = [e for e in single if language_of(e) != "en"]
    english = random.Random(0).sample([e for e in single if language_of(e) == "en"], 3 * len(other))
    return [e.text for e in other + english], np.array([True] * len(other) + [False] * len(english))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.language_signal", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    clf = OnnxClassifier.load(args.model)
    texts, other = training_rows(args.data)
    english_pool, other_pool = pool(ENGLISH), pool(OTHER)
    result: dict[str, dict[str, float]] = {}
    try:
        for name, make in (("tokens", token_features), ("embedding", embedding_features)):
            features = make(clf)
            fit = LogisticRegression(max_iter=2000).fit(features(texts), other)
            result[name] = {
                "english_read_as_other": float(np.mean(fit.predict(features(english_pool)))),
                "other_read_as_other": float(np.mean(fit.predict(features(other_pool)))),
            }
            print(
                f"{name}: {len(english_pool)} English held-out prompts read as another language "
                f"{result[name]['english_read_as_other']:.1%}; {len(other_pool)} in other languages "
                f"{result[name]['other_read_as_other']:.1%}",
                flush=True,
            )
    finally:
        clf.close()
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "train_rows": len(texts), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
