"""The training rows of a shipped model, each with the split its trainer gave it (``guardproxy.training``'s own loader
and splitter, with the seed and options in the model's config.json): what the bench scripts that report on "the dev
split" read, so that a row they call dev is one the model never trained on."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any


def trainer_rows(model: Path, data: Path) -> list[Any]:
    """Every example ``guardproxy train`` would load for ``model``, ``split`` set (train / calibration / dev)."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8")).get("data", {})
    seed = int(config.get("seed", 0))
    sources = importlib.import_module("guardproxy.training.sources")  # outside mypy's strict scope
    splits = importlib.import_module("guardproxy.training.splits")
    examples: list[Any] = sources.load_all(data, seed=seed, chat_turns=bool(config.get("chat_turns")))
    splits.assign_splits(examples, seed)
    return examples


def prompt_rows(examples: list[Any], split: str) -> list[Any]:
    """The split's single-prompt rows with a harm label: no reply pairs, no conversation windows."""
    return [
        e
        for e in examples
        if e.split == split
        and not e.pair
        and e.newest is None
        and not e.text.startswith(("user: ", "assistant: "))
        and e.harm is not None
    ]
