"""Memory per tracked conversation: the in-process backend (tracemalloc) and Redis (``MEMORY USAGE``).

    .venv/bin/python -m bench.conversation_memory [--conversations 10000] [--turns 10] [--more 10] [--skip-redis]

Drives real ``ConversationTracker``s the way the gateway does (``observe`` then ``record_reply`` per turn) with a
constant fake classifier (memory does not depend on the scores; each turn carries a state, so the conversation keeps
its last user turns' states as with the shipped model), for N conversations of ``--turns`` turns, then
extends each by ``--more`` turns. Prints bytes per conversation and per further turn; the tracker's score cache is
off for the measurement (it is a fixed-size cache, reported separately). Never passes or fails.

Redis: 127.0.0.1:6379, keys under a fresh ``gpbench:<uuid>:`` prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from guardproxy.conversation import ConversationTracker, MemoryBackend
from guardproxy.conversation.redis_backend import RedisBackend
from guardproxy.early_exit import SPEC_FILE, WindowEstimate, file_md5, load_spec
from guardproxy.settings import Settings
from guardproxy.signals import PromptScore, ReplyScore

SECRET = b"bench-secret-bench-secret-bench!"
_EMBEDDING = np.full(384, 1 / np.sqrt(384), dtype=np.float32)


def _shipped_estimate() -> WindowEstimate | None:
    """The shipped model's window estimate: with it the tracker keeps its user turns' states (``state.TurnState``)."""
    directory = Settings().guard.model_dir
    spec = load_spec(directory / SPEC_FILE, model_md5=file_md5(directory / "model.onnx"), dim=384)
    return spec.window_estimate


class ConstantClassifier:
    """Constant scores; each turn carries a state of the shipped estimate's dimension, as an early-exit check does,
    so the conversation's kept turn states are in the measure."""

    def __init__(self) -> None:
        self.early_exit = SimpleNamespace(window_estimate=_shipped_estimate())
        dims = self.early_exit.window_estimate.dims if self.early_exit.window_estimate is not None else 0
        self._state = np.full(dims, 0.5, dtype=np.float32)

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        return [PromptScore(0.05, "none", 0.0, _EMBEDDING, state=self._state) for _ in texts]

    async def score_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        return [ReplyScore("none", (1.0, 0.0, 0.0), 0.0) for _ in pairs]

    async def aclose(self) -> None:
        return None


def user_text(conv: int, turn: int) -> str:
    return f"conversation {conv} turn {turn}: could you tell me a little more about the garden and the weather there?"


def reply_text(conv: int, turn: int) -> str:
    return f"Certainly. In conversation {conv}, turn {turn}: the garden is lovely and the weather is mild in spring."


def conversation(conv: int, turns: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for turn in range(turns):
        out += [
            {"role": "user", "content": user_text(conv, turn)},
            {"role": "assistant", "content": reply_text(conv, turn)},
        ]
    return out


async def run_turns(
    tracker: ConversationTracker, histories: list[list[dict[str, Any]]], first: int, last: int, *, parallel: int
) -> None:
    """Turns ``first..last-1`` of every conversation. The histories are built before measuring; each request is a
    fresh slice of one (the client's request, freed after it), so what stays allocated is the tracker's state."""

    async def one(conv: int) -> None:
        full = histories[conv]
        tenant = f"tenant-{conv % 100}"
        for turn in range(first, last):
            messages = full[: 2 * turn + 1]
            obs = await tracker.observe(tenant, None, messages)
            reply = full[2 * turn + 1]["content"]
            await tracker.record_reply(tenant, None, messages, reply, refused=False, observation=obs)

    started = time.perf_counter()
    step = max(parallel, len(histories) // 10 // parallel * parallel)
    for start in range(0, len(histories), parallel):
        await asyncio.gather(*(one(c) for c in range(start, min(start + parallel, len(histories)))))
        if (start + parallel) % step == 0:
            print(f"  turns {first}..{last - 1}: {start + parallel}/{len(histories)} conversations", file=sys.stderr)
    took = time.perf_counter() - started
    calls = len(histories) * (last - first)
    print(f"  {calls} requests in {took:.1f} s ({took / calls * 1e6:.0f} us per observe+record_reply)")


def tracker_for(backend: Any) -> ConversationTracker:
    return ConversationTracker(backend, ConstantClassifier(), hmac_secret=SECRET, score_cache_size=0)


async def bench_memory(n: int, turns: int, more: int) -> None:
    print(f"== memory backend: {n} conversations x {turns} turns, then +{more} turns (tracemalloc)")
    backend = MemoryBackend(max_records=10 * n, max_bytes=1 << 34)
    tracker = tracker_for(backend)
    histories = [conversation(c, turns + more) for c in range(n)]  # the clients' side, allocated before the baseline
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    await run_turns(tracker, histories, 0, turns, parallel=1)
    gc.collect()
    after_first = tracemalloc.get_traced_memory()[0]
    await run_turns(tracker, histories, turns, turns + more, parallel=1)
    gc.collect()
    after_more = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_conv = (after_first - base) / n
    per_turn = (after_more - after_first) / (n * more)
    print(f"  state per {turns}-turn conversation: {per_conv:,.0f} B (tracemalloc)")
    print(f"  state per further turn:            {per_turn:,.1f} B")
    print(f"  backend's own estimate (bytes_used): {backend.bytes_used / n:,.0f} B per conversation after +{more}")
    print(f"  records: {len(backend)}; pending replies held: {len(tracker._pending)}")


async def bench_redis(n: int, turns: int, more: int) -> None:
    prefix = f"gpbench:{uuid.uuid4().hex}:"
    print(f"== redis backend: {n} conversations x {turns} turns, then +{more} turns (MEMORY USAGE, prefix {prefix})")
    backend = RedisBackend("redis://127.0.0.1:6379/0", prefix=prefix)
    tracker = tracker_for(backend)
    client = aioredis.Redis(port=6379)
    histories = [conversation(c, turns + more) for c in range(n)]
    try:
        await run_turns(tracker, histories, 0, turns, parallel=50)
        first, count = await _usage(client, prefix)
        print(f"  {count} keys; MEMORY USAGE per {turns}-turn conversation: {first / n:,.0f} B")
        await run_turns(tracker, histories, turns, turns + more, parallel=50)
        second, _ = await _usage(client, prefix)
        print(f"  MEMORY USAGE per further turn: {(second - first) / (n * more):,.1f} B")
        # a tenant's refusal memory, at its cap of 32 int8 embeddings
        for i in range(40):
            msgs = [{"role": "user", "content": f"refused request {i}"}]
            await tracker.observe("tenant-refusals", None, msgs)
            await tracker.record_reply("tenant-refusals", None, msgs, "I can't help with that.", refused=True)
        keys = [k async for k in client.scan_iter(match=f"{prefix}t:*")]
        sizes = [await client.memory_usage(k, samples=0) for k in keys]
        print(f"  a tenant's refusal memory at its cap (32 x 384-dim int8): {max(sizes):,} B")
    finally:
        await backend.drop_all()
        await client.aclose()
        await tracker.aclose()


async def _usage(client: aioredis.Redis, prefix: str) -> tuple[int, int]:
    total = count = 0
    async for key in client.scan_iter(match=f"{prefix}[cs]:*", count=1000):  # records and kept turn states
        total += await client.memory_usage(key, samples=0) or 0
        count += 1
    return total, count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conversation_memory", description=__doc__)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--more", type=int, default=10)
    parser.add_argument("--skip-redis", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(bench_memory(args.conversations, args.turns, args.more))
    if not args.skip_redis:
        asyncio.run(bench_redis(args.conversations, args.turns, args.more))
    return 0


if __name__ == "__main__":
    sys.exit(main())
