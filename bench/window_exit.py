"""What does early exit do to the conversation window pass? The check for a window head, and the probe that showed
the per-turn head cannot serve windows.

    .venv/bin/python -m bench.window_exit [--model models/guard-v1] [--head window|turn]
        [--splits calibration,dev,challenge] [--time N] [--json FILE]

With early exit on, the gateway's window pass (the recent turns together, ``guard.window_max_ids`` ids) exits on the
spec's window head (``guardproxy.early_exit``, fitted by ``python -m guardproxy.training.early_exit --windows``).
This replays the conversations of ``bench.conversation_eval`` (the Trainer's splits; the train split is left out)
through a tracker that scores every window with the whole model and asks the head (``--head window``, the default:
the spec's window head; ``--head turn``: the per-turn head, fitted on prompts) whether that window would have exited
and with what estimate. Then it recomputes each conversation's flags offline (``bench.conversation_eval.guard_flags``:
the tracker's escalation and the per-turn rule, shipped parameters) with each exited window's harm replaced by the
head's estimate, and reports:

- the share of windows that exit (the CPU the window exit saves), by split and label;
- windows the whole model scores at or above 0.15 (the strict policy's lowest line) or 0.5 that exit;
- conversations whose first flag moves or vanishes.

The tracker sends a window whose trajectory or user turns read at or above the window head's line to the whole
model (``ConversationTracker._window_exact``); the replay does the same (``whole_by_turn_rule`` counts them).
``--time N`` then times up to N of the windows the head read per split and label, whole model against early exit
(``bench.early_exit.timings``, as the per-turn check is timed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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
from bench.early_exit import timings
from guardproxy.classifier import OnnxClassifier
from guardproxy.conversation.escalation import window_text
from guardproxy.conversation.integrity import message_text
from guardproxy.early_exit import Head, WindowHead
from guardproxy.settings import DEFAULT_MODEL_DIR
from guardproxy.signals import PromptScore

STRICT_LINE = 0.15


class WindowRecorder:
    """The classifier a replay's tracker sees: the whole model for everything, and for each window also the early-exit
    head's reading, recorded by the window's newest turn."""

    def __init__(self, whole: OnnxClassifier, early: OnnxClassifier, head: Head) -> None:
        self.whole, self.early, self.head = whole, early, head
        self.windows: list[tuple[str, PromptScore, PromptScore]] = []  # (newest turn, whole, early)
        self.sent_to_head: list[str] = []  # the texts of windows the tracker's rule let the head read

    @property
    def early_exit(self) -> Any:
        """The spec the tracker reads (its ``_window_exact`` rule needs the window head's line)."""
        return self.early.early_exit

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
                if exact:  # the tracker's rule (a turn in it reads risky): the whole model, as in the gateway
                    self.windows.append((last, whole, whole))
                    continue
                (head,) = await asyncio.to_thread(self._head, text, max_length)
                self.windows.append((last, whole, head))
                self.sent_to_head.append(text)
        return scores

    def _head(self, text: str, max_length: int) -> list[PromptScore]:
        # the runtime's own path, on the head asked for, at the window's length
        return self.early._prompt_job(  # noqa: SLF001 (a probe of the runtime's own path)
            [text], threading.Event(), max_length=max_length, newest=[()], head=self.head
        )

    async def score_replies(self, pairs: Any) -> Any:
        return await self.whole.score_replies(pairs)

    async def aclose(self) -> None:
        pass


async def replay(
    convs: list[Conv],
    whole: OnnxClassifier,
    early: OnnxClassifier,
    head: Head,
    window_ids: int,
    sent: dict[str, list[str]] | None = None,
) -> list[Any]:
    """Per conversation, per user turn: (the whole model's window score, the head's reading of the window: exited or
    not, with its estimate), or None for a turn without a window. Fills each conversation's ``turns`` too, and
    ``sent`` (by split/label) with the windows the tracker's rule let the head read."""
    out: list[Any] = []
    started = time.perf_counter()
    for n, c in enumerate(convs, 1):
        rec = WindowRecorder(whole, early, head)
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
        if sent is not None:
            sent.setdefault(f"{c.split}/{c.label}", []).extend(rec.sent_to_head)
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
    ap.add_argument(
        "--head", choices=("window", "turn"), default="window", help="the spec's window head, or its per-turn head"
    )
    ap.add_argument(
        "--time",
        type=int,
        default=0,
        metavar="N",
        help="also time up to N window passes per split/label that the rule lets the head read (whole vs exit)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text()).get("data", {})
    seed, chat_turns = int(config.get("seed", 0)), bool(config.get("chat_turns", False))
    wanted = set(args.splits.split(","))
    convs = [c for c in load_conversations(args.data, seed, args.stitched, chat_turns) if c.split in wanted]
    print(f"{len(convs)} conversations in {sorted(wanted)}", file=sys.stderr)
    whole = OnnxClassifier.load(args.model, cache_size=400_000, timeout=60.0)
    early = OnnxClassifier.load(args.model, cache_size=0, timeout=60.0, early_exit=True)
    spec = early.early_exit
    assert spec is not None
    head: Head | None = spec.window if args.head == "window" else spec
    if head is None:
        print(f"error: {args.model}: its early-exit spec has no window head (--head turn reads the per-turn one)")
        return 2
    if isinstance(head, WindowHead) and head.max_ids != WINDOW_MAX_IDS:
        print(f"note: the window head was fitted at {head.max_ids} ids, the gateway's window has {WINDOW_MAX_IDS}")
    sent: dict[str, list[str]] = {}
    readings = asyncio.run(replay(convs, whole, early, head, WINDOW_MAX_IDS, sent))
    p = EscalationParams()
    harm_line = 0.5
    before = guard_flags(convs, p, harm_line)
    after = guard_flags([with_estimates(c, r) for c, r in zip(convs, readings, strict=True)], p, harm_line)
    groups: dict[str, dict[str, Any]] = {}
    for c, rs, b, a in zip(convs, readings, before, after, strict=True):
        g = groups.setdefault(
            f"{c.split}/{c.label}",
            {"conversations": 0, "windows": 0, "exited": 0, "whole_ge_strict_exited": 0, "whole_ge_strict": 0,
             "whole_ge_half_exited": 0, "whole_by_turn_rule": 0, "flag_lost": 0, "flag_moved": 0, "flag_gained": 0,
             "flagged": 0},
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
            g["whole_by_turn_rule"] += head is r[0]
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
    timing: dict[str, Any] = {}
    if args.time > 0:
        # uncached on both sides; the early classifier serves exits through the runtime's own path
        cold_whole = OnnxClassifier.load(args.model, cache_size=0, timeout=60.0)
        cold_early = OnnxClassifier.load(args.model, cache_size=0, timeout=60.0, early_exit=True)
        if args.head == "turn":
            print("note: --time measures the window head (the runtime's path), whatever --head says")
        for key, texts in sorted(sent.items()):
            sample = random.Random(7).sample(texts, min(args.time, len(texts)))
            timing[key] = t = timings(cold_whole, cold_early, sample, WINDOW_MAX_IDS)
            print(f"time {key:24} {t['passes']:4d} windows, {t['exited']:4d} exit: whole p50 {t['whole_p50_ms']} ms, "
                  f"early exit p50 {t['early_exit_p50_ms']} ms (mean {t['whole_mean_ms']} / {t['early_exit_mean_ms']}"
                  f"; exited {t['exited_p50_ms']}, went on {t['went_on_p50_ms']})")  # fmt: skip
        cold_whole.close()
        cold_early.close()
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "model": str(args.model),
                    "head": args.head,
                    "splits": sorted(wanted),
                    "groups": groups,
                    "timing": timing,
                },
                indent=1,
            )  # fmt: skip
        )
    whole.close()
    early.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
