"""A probe, not a feature: what would early exit do to the conversation window pass, with the per-turn head as it is?

    .venv/bin/python -m bench.window_exit [--model models/guard-v1] [--splits calibration,dev,challenge] [--json FILE]

The gateway's window pass (the recent turns together, ``guard.window_max_ids`` ids) always runs the whole model;
only per-turn checks exit (``guardproxy.early_exit``). This replays the conversations of ``bench.conversation_eval``
(the Trainer's splits; the train split is left out) through a tracker that scores every window with the whole model
and asks the early-exit head, fitted on prompts only, whether that window would have exited and with what estimate.
Then it recomputes each conversation's flags offline (``bench.conversation_eval.guard_flags``: the tracker's
escalation and the per-turn rule, shipped parameters) with each exited window's harm replaced by the head's
estimate, and reports:

- the share of windows that would exit (the CPU a window exit could save), by split and label;
- windows the whole model scores at or above 0.15 (the strict policy's lowest line) or 0.5 that would exit;
- conversations whose first flag would move or vanish.

A head for windows would need its threshold fitted and checked on windows; this measures the prompt head's as is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.conversation_eval import (
    DATA,
    WINDOW_MAX_IDS,
    Conv,
    EscalationParams,
    every_window_tracker,
    guard_flags,
    load_conversations,
    turn_components,
)
from guardproxy.classifier import OnnxClassifier
from guardproxy.conversation.escalation import window_text
from guardproxy.conversation.integrity import message_text
from guardproxy.settings import DEFAULT_MODEL_DIR
from guardproxy.signals import PromptScore

STRICT_LINE = 0.15


class WindowRecorder:
    """The classifier a replay's tracker sees: the whole model for everything, and for each window also the early-exit
    head's reading, recorded by the window's newest turn."""

    def __init__(self, whole: OnnxClassifier, early: OnnxClassifier) -> None:
        self.whole, self.early = whole, early
        self.windows: list[tuple[str, PromptScore, PromptScore]] = []  # (newest turn, whole, early)

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        scores = await self.whole.score_prompts(texts, max_length=max_length, newest=newest, exact=exact)
        if max_length is not None and newest is not None:
            for text, last, whole in zip(texts, newest, scores, strict=True):
                (head,) = await asyncio.to_thread(self._head, text, max_length)
                self.windows.append((last, whole, head))
        return scores

    def _head(self, text: str, max_length: int) -> list[PromptScore]:
        # the per-turn path with the window's length: what the head would say if windows could exit
        return self.early._prompt_job(  # noqa: SLF001 (a probe of the runtime's own path)
            [text], threading.Event(), max_length=max_length, newest=[()], may_exit=True
        )

    async def score_replies(self, pairs: Any) -> Any:
        return await self.whole.score_replies(pairs)

    async def aclose(self) -> None:
        pass


async def replay(convs: list[Conv], whole: OnnxClassifier, early: OnnxClassifier, window_ids: int) -> list[Any]:
    """Per conversation, per user turn: (the whole model's window score, the head's reading of the window: exited or
    not, with its estimate), or None for a turn without a window. Fills each conversation's ``turns`` too."""
    out: list[Any] = []
    started = time.perf_counter()
    for n, c in enumerate(convs, 1):
        rec = WindowRecorder(whole, early)
        tracker = every_window_tracker(rec, window_ids)
        results = await tracker.replay(c.messages)
        by_newest: dict[str, list[tuple[PromptScore, PromptScore]]] = {}
        for last, w, h in rec.windows:
            by_newest.setdefault(last, []).append((w, h))
        c.turns, readings = [], []
        for r in results:
            c.turns.append(turn_components(r))
            newest = window_text([("user", message_text(c.messages[r.index]))])  # as the tracker's window names it
            queue = by_newest.get(newest) or []
            readings.append(queue.pop(0) if queue else None)
        unmatched = sum(len(q) for q in by_newest.values())
        if unmatched:
            print(f"  {c.id}: {unmatched} window(s) not matched to a turn", file=sys.stderr)
        out.append(readings)
        if n % 100 == 0:
            print(f"  {n}/{len(convs)} conversations ({n / (time.perf_counter() - started):.1f}/s)", file=sys.stderr)
    return out


def with_estimates(c: Conv, readings: list[Any]) -> Conv:
    turns = []
    for t, r in zip(c.turns or [], readings, strict=True):
        if r is not None and r[1].exited:
            t = {**t, "window": r[1].harm}
        turns.append(t)
    return replace(c, turns=turns)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.window_exit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--splits", default="calibration,dev,challenge", help="comma-separated splits replayed")
    ap.add_argument("--stitched", type=int, default=100, help="stitched long MT-Bench chats per split")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text()).get("data", {})
    seed, chat_turns = int(config.get("seed", 0)), bool(config.get("chat_turns", False))
    wanted = set(args.splits.split(","))
    convs = [c for c in load_conversations(args.data, seed, args.stitched, chat_turns) if c.split in wanted]
    print(f"{len(convs)} conversations in {sorted(wanted)}", file=sys.stderr)
    whole = OnnxClassifier.load(args.model, cache_size=400_000, timeout=60.0)
    early = OnnxClassifier.load(args.model, cache_size=0, timeout=60.0, early_exit=True)
    readings = asyncio.run(replay(convs, whole, early, WINDOW_MAX_IDS))
    p = EscalationParams()
    harm_line = 0.5
    before = guard_flags(convs, p, harm_line)
    after = guard_flags([with_estimates(c, r) for c, r in zip(convs, readings, strict=True)], p, harm_line)
    groups: dict[str, dict[str, Any]] = {}
    for c, rs, b, a in zip(convs, readings, before, after, strict=True):
        g = groups.setdefault(
            f"{c.split}/{c.label}",
            {"conversations": 0, "windows": 0, "exited": 0, "whole_ge_strict_exited": 0, "whole_ge_strict": 0,
             "whole_ge_half_exited": 0, "flag_lost": 0, "flag_moved": 0, "flag_gained": 0, "flagged": 0},
        )  # fmt: skip
        g["conversations"] += 1
        g["flagged"] += b is not None
        g["flag_lost"] += b is not None and a is None
        g["flag_gained"] += b is None and a is not None
        g["flag_moved"] += b is not None and a is not None and a != b
        for r in rs:
            if r is None:
                continue
            whole_h, head = r[0].harm, r[1]
            g["windows"] += 1
            g["exited"] += head.exited
            g["whole_ge_strict"] += whole_h >= STRICT_LINE
            g["whole_ge_strict_exited"] += head.exited and whole_h >= STRICT_LINE
            g["whole_ge_half_exited"] += head.exited and whole_h >= 0.5
    print(f"{'split/label':24} {'convs':>6} {'windows':>8} {'exited':>8} {'>=0.15':>7} {'>=0.15 ex':>9} "
          f"{'>=0.5 ex':>8} {'flagged':>8} {'lost':>5} {'moved':>6} {'gained':>6}")  # fmt: skip
    for k, g in sorted(groups.items()):
        share = g["exited"] / g["windows"] if g["windows"] else 0.0
        print(f"{k:24} {g['conversations']:6d} {g['windows']:8d} {share:8.1%} {g['whole_ge_strict']:7d} "
              f"{g['whole_ge_strict_exited']:9d} {g['whole_ge_half_exited']:8d} {g['flagged']:8d} "
              f"{g['flag_lost']:5d} {g['flag_moved']:6d} {g['flag_gained']:6d}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(
            json.dumps({"model": str(args.model), "splits": sorted(wanted), "groups": groups}, indent=1)
        )
    whole.close()
    early.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
