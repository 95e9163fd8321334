"""The space that rephrase-after-refusal compares requests in: the guard model's pooled embedding, centred and with
its dominant directions removed (``embedding_projection.json`` beside the model).

Why: the pooled embedding was trained for the heads, not for similarity. Its first principal direction carries about
60% of its variance (model 2.34.1, 2,522 training prompts), and that direction is mostly "harmful or not". So
every harmless request sits close to every other: two unrelated harmless prompts have cosine 0.96 at the median
(p90 0.99), above the policies' rephrase lines (0.8-0.85). After one refused harmless request, every later
harmless request of that tenant read as a rewording of it. Removing the mean and the top directions (Mu and
Viswanath, "All-but-the-Top", ICLR 2018) leaves what tells one request from another. On the seven English
challenge sets (never trained on), same-intent rewordings against different harmful intents went from AUROC 0.81
to 0.89, and unrelated harmless pairs from 61% at or above 0.85 to 9.6% at its mapped line 0.59
(bench/RESULTS.md, "Rephrase similarity").

The projection is fitted per model (``python -m guardproxy.embedding_projection --model DIR --data DATA``) on the
prompts that the model's trainer put in its training split, and holds the md5 of the ``model.onnx`` it was
fitted on. A model without the file, or with one fitted on another graph, compares raw embeddings (logged).

File format: ``{"model_md5": str, "dim": int, "mean": [dim numbers], "remove": [[dim numbers], ...], "fit": {...}}``;
``apply(e) = normalize((e - mean) - (e - mean) @ remove.T @ remove)``, ``remove`` orthonormal rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from guardproxy.early_exit import file_md5

logger = logging.getLogger(__name__)

FILE = "embedding_projection.json"
COMPONENTS = 2  # on the challenge sets 1, 2, 3, 5 gave AUROC 0.883, 0.885, 0.867, 0.857 (bench/RESULTS.md)
PER_SOURCE = 200  # prompts per training source (capped: several sources are thousands of one style)
MAX_CHARS = 2000  # long jailbreak wrappers cost a 256-id pass each and say little about the space


@dataclass(frozen=True)
class EmbeddingProjection:
    mean: npt.NDArray[np.float32]  # [dim]
    remove: npt.NDArray[np.float32]  # [k, dim], orthonormal rows
    model_md5: str

    def apply(self, e: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``e`` [n, dim] (or [dim]) in the projected space, each row L2-normalised."""
        x = np.asarray(e, dtype=np.float32) - self.mean
        x = x - (x @ self.remove.T) @ self.remove
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return np.asarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


def fit(embeddings: npt.NDArray[np.float32], model_md5: str, components: int = COMPONENTS) -> EmbeddingProjection:
    """The mean of ``embeddings`` [n, dim] and their top ``components`` principal directions."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) <= components:
        raise ValueError(f"need more than {components} embeddings of one dimension, got shape {x.shape}")
    mean = x.mean(axis=0)
    _u, _s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return EmbeddingProjection(mean.astype(np.float32), vt[:components].astype(np.float32), model_md5)


def load(directory: Path, model_path: Path, dim: int) -> EmbeddingProjection | None:
    """The projection beside ``model_path``; None (logged) when there is none, it is malformed, or it was fitted on
    another graph: rephrase similarity then compares raw embeddings."""
    path = directory / FILE
    if not path.is_file():
        logger.info("%s not found: rephrase similarity compares raw embeddings (fit one: python -m %s)", path, __name__)
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        mean = np.asarray(doc["mean"], dtype=np.float32)
        remove = np.asarray(doc["remove"], dtype=np.float32)
        md5 = str(doc["model_md5"])
        if mean.shape != (dim,) or remove.ndim != 2 or remove.shape[1] != dim:
            raise ValueError(f"expected a mean of {dim} numbers and rows of {dim}, got {mean.shape} and {remove.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(remove).all()):
            raise ValueError("non-finite numbers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: unreadable (%s): rephrase similarity compares raw embeddings", path, exc)
        return None
    actual = file_md5(model_path)
    if md5 != actual:
        logger.warning(
            "%s was fitted on model.onnx md5 %s, this one is %s: rephrase similarity compares raw embeddings (refit:"
            " python -m %s --model %s)",
            path,
            md5,
            actual,
            __name__,
            directory,
        )
        return None
    return EmbeddingProjection(mean, remove, md5)


def save(projection: EmbeddingProjection, directory: Path, fit_info: dict[str, Any]) -> Path:
    path = directory / FILE
    doc = {
        "model_md5": projection.model_md5,
        "dim": int(projection.mean.shape[0]),
        "mean": [round(float(v), 6) for v in projection.mean],
        "remove": [[round(float(v), 6) for v in row] for row in projection.remove],
        "fit": fit_info,
    }
    path.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    return path


def training_prompts(data: Path, seed: int, chat_turns: bool, per_source: int = PER_SOURCE) -> dict[str, list[str]]:
    """Up to ``per_source`` single prompts of each source from the training split the model's trainer assigned
    (the same loader and splitter, ``seed`` its split seed): nothing from its calibration or dev rows."""
    from guardproxy.training.sources import load_all
    from guardproxy.training.splits import assign_splits

    examples = load_all(data, seed=seed, chat_turns=chat_turns)
    assign_splits(examples, seed)
    return sample_prompts([e for e in examples if e.split == "train"], seed, per_source)


def sample_prompts(examples: Sequence[Any], seed: int, per_source: int = PER_SOURCE) -> dict[str, list[str]]:
    """Up to ``per_source`` distinct single prompts (no pair, no conversation window) of each source of
    ``examples`` (``guardproxy.training.sources.Example``), drawn with ``seed``."""
    by_source: dict[str, set[str]] = {}
    for e in examples:
        if not e.pair and e.newest is None and len(e.text) <= MAX_CHARS:
            by_source.setdefault(e.source, set()).add(e.text)
    rng = random.Random(seed)
    out = {}
    for source in sorted(by_source):
        texts = sorted(by_source[source])
        rng.shuffle(texts)
        out[source] = texts[:per_source]
    return out


def fit_model(
    model_dir: Path, by_source: dict[str, list[str]], components: int = COMPONENTS, progress: bool = True
) -> tuple[EmbeddingProjection, dict[str, Any]]:
    """Fit ``model_dir``'s projection on ``by_source``'s prompts, embedded by the model as the gateway embeds them."""
    from guardproxy.classifier import MODEL_FILE, OnnxClassifier
    from guardproxy.scoring import Progress

    texts = [t for source in sorted(by_source) for t in by_source[source]]
    bar = Progress("embed", len(texts), enabled=progress)
    vectors: list[npt.NDArray[np.float32]] = []
    with OnnxClassifier.load(model_dir, embedding_projection=False) as model:
        for start in range(0, len(texts), 64):
            chunk: Sequence[str] = texts[start : start + 64]
            vectors += [s.embedding for s in model.score_prompts_sync(chunk, exact=True)]
            bar.update(len(chunk), len(chunk))
    bar.close()
    projection = fit(np.stack(vectors), file_md5(model_dir / MODEL_FILE), components)
    info = {
        "prompts": len(texts),
        "sources": {s: len(v) for s, v in sorted(by_source.items())},
        "components": components,
    }
    return projection, info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (written into it)")
    parser.add_argument("--data", type=Path, required=True, help="the shared data root the model was trained on")
    parser.add_argument("--components", type=int, default=COMPONENTS, help="top directions removed (default 2)")
    parser.add_argument("--per-source", type=int, default=PER_SOURCE, help="prompts per training source")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config_path = args.model / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"{config_path}: {exc}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"{args.data}: no such directory (--data)", file=sys.stderr)
        return 2
    data_cfg = config.get("data", {})
    seed, chat_turns = int(data_cfg.get("seed", 0)), bool(data_cfg.get("chat_turns", False))
    by_source = training_prompts(args.data, seed, chat_turns, args.per_source)
    projection, info = fit_model(args.model, by_source, args.components, progress=not args.no_progress)
    info["split_seed"] = seed
    path = save(projection, args.model, info)
    print(f"{path}: {info['prompts']} training prompts, {len(by_source)} sources, {args.components} directions removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
