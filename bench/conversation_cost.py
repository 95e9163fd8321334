"""Cost of request N+1 against conversation length: a sweep over 1..100 turns with the real guard model.

    .venv/bin/python -m bench.conversation_cost [--model models/guard-v1] [--repeats 15] [--turns 1,2,5,10,20,50,100]

For each length N, ``--repeats`` distinct conversations are played through one ``ConversationTracker`` (memory
backend) the way the gateway does (``observe``, then ``record_reply`` with the observation handed back); request N
is timed: ``observe`` (state read, hashing the history, the guard model on the new user turn and on the window, state
write) and ``record_reply``. Every text is distinct and the classifier's cache is off, so nothing is a cache hit.
Reference: the guard model alone on one user turn (``score_prompts([turn])``), and ``observe`` with the window
switched off (``window_turns=1``). Prints medians in ms and ratios; never passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardproxy.conversation import ConversationTracker, MemoryBackend
from guardproxy.settings import DEFAULT_MODEL_DIR

WORDS = (
    "garden river network protocol recipe history student window mountain engine question answer library "
    "ancient modern quickly carefully because although between during system budget weather music doctor "
    "travel kitchen energy paper market planet ocean village teacher computer science bridge harvest lantern"
).split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def conversation(rng: random.Random, turns: int) -> list[dict[str, Any]]:
    """``turns`` user turns of 25 words, each but the last answered with 120 words."""
    out: list[dict[str, Any]] = []
    for t in range(turns):
        out.append({"role": "user", "content": sentence(rng, 25)})
        if t < turns - 1:
            out.append({"role": "assistant", "content": " ".join(sentence(rng, 12) for _ in range(10))})
    return out


async def sweep(model: Path, lengths: Sequence[int], repeats: int, seed: int) -> None:
    from guardproxy.classifier import OnnxClassifier

    clf = OnnxClassifier.load(model, workers=1, cache_size=0, timeout=30.0)
    rng = random.Random(seed)
    try:
        single = []
        for _ in range(repeats):
            text = sentence(rng, 25)
            t0 = time.perf_counter()
            await clf.score_prompts([text])
            single.append(time.perf_counter() - t0)
        base = statistics.median(single)
        print(f"guard model alone on one 25-word user turn: {1000 * base:.2f} ms (median of {repeats})")
        for window_turns in (4, 1):
            label = "window of 4 turns" if window_turns == 4 else "window off (window_turns=1)"
            print(f"\n== observe of request N, {label}")
            print("    N   observe ms   x single-turn observe   x guard alone   record_reply ms")
            first: float | None = None
            for n in lengths:
                tracker = ConversationTracker(
                    MemoryBackend(), clf, hmac_secret=b"bench", window_turns=window_turns, score_cache_size=0
                )
                observe_s, record_s = [], []
                for _ in range(repeats):
                    messages = conversation(rng, n)
                    for k in range(len(messages)):
                        if messages[k]["role"] != "user":
                            continue
                        request = messages[: k + 1]
                        t0 = time.perf_counter()
                        obs = await tracker.observe("bench", None, request)
                        t1 = time.perf_counter()
                        reply = messages[k + 1]["content"] if k + 1 < len(messages) else "Sure."
                        await tracker.record_reply("bench", None, request, reply, refused=False, observation=obs)
                        t2 = time.perf_counter()
                    observe_s.append(t1 - t0)  # the last request: N turns of history
                    record_s.append(t2 - t1)
                med = statistics.median(observe_s)
                first = med if first is None else first
                print(
                    f"  {n:3d}   {1000 * med:9.2f}   {med / first:20.2f}x   {med / base:12.2f}x   "
                    f"{1000 * statistics.median(record_s):14.3f}"
                )
    finally:
        await clf.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conversation_cost", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--turns", default="1,2,5,10,20,50,100")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(sweep(args.model, [int(x) for x in args.turns.split(",")], args.repeats, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
