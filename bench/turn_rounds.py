"""What one long user turn costs in each round of a per-turn check (``OnnxClassifier._turn_job``).

    .venv/bin/python -m bench.turn_rounds [--turns 20] [--words 2000]

A per-turn check reads every text's head+tail pass first (with ``prompt_windows``' cut, which needs the text
normalised and tokenized) and the long texts' windows after. How many long turns the first round reaches within
``guard.timeout`` is what decides how far padding can push an earlier ask out of reach (README, "Conversation
state"). The texts are ``tests/test_oversized_requests.padding``'s: ~2,000 random harmless words each. One thread,
no cache hits (each text is new), p50 over the turns; timings of this machine only.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from guardproxy.classifier import OnnxClassifier
from guardproxy.settings import Settings
from tests.test_oversized_requests import padding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn_rounds", description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--words", type=int, default=2000)
    args = parser.parse_args(argv)
    clf = OnnxClassifier.load(Settings().guard.model_dir, workers=1, cache_size=0)
    clf.score_prompts_sync(["warm-up"])
    length, cancel = clf.info.max_length, threading.Event()
    first, second, windows = [], [], []
    for i, text in enumerate(padding(9_000, args.turns, args.words)):
        t0 = time.perf_counter()
        (score,) = clf._prompt_job([text], cancel, max_length=length, newest=[()])
        parts = clf.prompt_windows(text)
        t1 = time.perf_counter()
        clf._prompt_job(parts, cancel, max_length=length, newest=[()] * len(parts))
        first.append((t1 - t0) * 1000)
        second.append((time.perf_counter() - t1) * 1000)
        windows.append(len(parts))
        print(f"\r{i + 1}/{args.turns} turns", end="", flush=True)
    print()
    print(
        f"one turn of {args.words} words, {statistics.median(windows):.0f} windows: first round (head+tail pass) "
        f"{statistics.median(first):.1f} ms p50, second round (its windows) {statistics.median(second):.1f} ms p50"
    )
    clf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
