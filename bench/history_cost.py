"""The per-request work that grows with a conversation's history, measured in-process, one function at a time.

    .venv/bin/python -m bench.history_cost [--turns 1,25,50,100] [--repeat 300] [--json OUT]

Every chat request carries its whole history, so some work on it grows with the history even when the guard scores
only the new turn: parsing and validating the body (``guardproxy.validation.parse_chat``), the hash chain over every
message that finds the conversation's state (``guardproxy.conversation.integrity.build_chain``) and picking out
the texts to check (``guardproxy.guard.scored_texts``, as the gateway calls it with a tracker). ``guardproxy bench``
measures request N+1 of a 100-turn conversation end to end (issue 4 asks <= 1.2x a single turn); this names the
parts. The bodies are the bench's own: its user turns (``guardproxy.benchmark.load.user_turn``, 48 words) and the
fake upstream's replies (60 words), JSON-encoded as the bench client sends them. Prints a table (median of
``--repeat`` calls, microseconds); a timing, so run it on a quiet CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guardproxy.benchmark.load import user_turn
from guardproxy.benchmark.upstream import reply_text
from guardproxy.conversation.integrity import build_chain
from guardproxy.guard import scored_texts
from guardproxy.settings import LimitSettings
from guardproxy.validation import parse_chat

SECRET = b"s" * 32


def body(turns: int, seed: int = 0) -> bytes:
    """A request whose last message is user turn ``turns``, after ``turns - 1`` exchanges."""
    rng = random.Random(seed)
    messages: list[dict[str, str]] = []
    for k in range(1, turns + 1):
        messages.append({"role": "user", "content": user_turn(rng, k, 48)})
        if k < turns:
            messages.append({"role": "assistant", "content": reply_text(60)})
    return json.dumps({"model": "fake-model", "messages": messages}).encode()


def median_us(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(turns: int, repeat: int) -> dict[str, float]:
    raw = body(turns)
    limits = LimitSettings()
    messages = parse_chat(raw, limits).body["messages"]
    parts = {
        "parse_chat": lambda: parse_chat(raw, limits),
        "build_chain": lambda: build_chain(SECRET, "tenant", None, messages),
        "scored_texts": lambda: scored_texts(messages, old_user_turns=False),
    }
    out = {name: median_us(fn, repeat) for name, fn in parts.items()}
    out["total"] = sum(out.values())
    out["body_bytes"] = float(len(raw))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.history_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", default="1,25,50,100", help="user turns per request, comma-separated")
    ap.add_argument("--repeat", type=int, default=300, help="calls per measurement (the median is reported)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.turns.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--turns: not a list of integers: {args.turns!r}")
    if not lengths or min(lengths) < 1 or args.repeat < 1:
        ap.error("--turns needs positive integers and --repeat at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json: no such folder: {args.json.parent}")
    rows = {}
    for i, turns in enumerate(lengths, 1):
        print(f"[{i}/{len(lengths)}] {turns} turns...", file=sys.stderr, flush=True)
        rows[turns] = measure(turns, args.repeat)
    names = ["parse_chat", "build_chain", "scored_texts", "total"]
    print(f"{'turns':>6s} {'body KB':>8s} " + " ".join(f"{n + ' us':>16s}" for n in names))
    for turns, r in rows.items():
        print(f"{turns:6d} {r['body_bytes'] / 1000:8.1f} " + " ".join(f"{r[n]:16.1f}" for n in names))
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"machine": machine, "repeat": args.repeat, "rows": rows}, indent=1) + "\n")
        print(f"JSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
