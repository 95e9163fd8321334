"""Window passes when a conversation's requests land on different replicas (two trackers sharing the real Redis).

    .venv/bin/python -m bench.replica_window [--conversations 12] [--turns 12] [--replicas 2]

Each conversation's requests go round robin to ``--replicas`` ``ConversationTracker``s over one Redis
(127.0.0.1:6379, keys under a fresh ``gpbench:<uuid>:`` prefix, deleted at the end), as behind a load balancer
without sticky sessions, with the shipped guard model and early exit. New user turns are the bench's ordinary
benign turns (``guardproxy.benchmark.load.user_turn``). Counts the requests with a window (every one after the
first turn) whose window pass ran and those whose window estimate stood: the estimate needs the earlier user
turns' states, which a replica that did not score them reads from the conversation's kept states. Prints, never
passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import uuid
from collections.abc import Sequence

from guardproxy.benchmark.load import user_turn
from guardproxy.classifier import OnnxClassifier
from guardproxy.conversation import ConversationTracker
from guardproxy.conversation.redis_backend import RedisBackend
from guardproxy.settings import Settings

REPLY = "Here is a short helpful answer about that, with a few practical suggestions to try."


async def run(conversations: int, turns: int, replicas: int) -> None:
    clf = OnnxClassifier.load(Settings().guard.model_dir, timeout=30.0, early_exit=True)
    prefix = f"gpbench:{uuid.uuid4().hex}:"
    backends = [RedisBackend("redis://127.0.0.1:6379/0", prefix=prefix) for _ in range(replicas)]
    trackers = [
        ConversationTracker(
            backend,
            clf,
            hmac_secret=b"bench-secret-bench-secret-bench!",
            shared=True,
            reply_grace=0.05,
        )
        for backend in backends
    ]
    rng = random.Random(7)
    serial = windows = ran = estimated = 0
    try:
        for conv in range(conversations):
            messages: list[dict[str, str]] = []
            for turn in range(turns):
                serial += 1
                messages.append({"role": "user", "content": user_turn(rng, serial, 48)})
                tracker = trackers[turn % replicas]  # each request on the next replica
                obs = await tracker.observe("tenant", f"c{conv}", messages)
                if turn:
                    windows += 1
                    ran += obs.window is not None
                    estimated += obs.window_estimated
                await tracker.record_reply("tenant", f"c{conv}", messages, REPLY, refused=False)
                messages.append({"role": "assistant", "content": REPLY})
            print(f"  {conv + 1}/{conversations} conversations", file=sys.stderr)
        print(
            f"{replicas} replicas, {conversations} conversations x {turns} turns: of {windows} requests with a window, "
            f"the window pass ran on {ran} and the estimate stood on {estimated}"
        )
    finally:
        await backends[0].drop_all()
        for t in trackers:
            await t.aclose()
        clf.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replica_window", description=__doc__)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args(argv)
    asyncio.run(run(args.conversations, args.turns, max(1, args.replicas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
