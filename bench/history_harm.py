"""How often ``history_harm`` (``guard.GuardCheck``: assistant turns the gateway did not relay, read as replies) reaches
each line on harmless conversations the gateway has not seen, and on harmful compliances.

Every harmless conversation of ``bench.conversation_eval``'s sets (MT-Bench-101, stitched MT-Bench chats, the authored
long chats, the challenge long chats), by the trainer's split, is read as a client would send it to a gateway that
never saw it (history ``unverified``): each assistant turn as a reply to the user turn before it, head only, the
newest 32, as the guard reads them; a conversation counts at a line when its highest reply harm reaches it. Beside it,
HarmBench's classifier validation replies (harmful compliances and the rest; its rows are in training, so this
flatters): how many a line would still catch.

    python -m bench.history_harm --data ../shared/data --json bench/results/history_harm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.chat_replies import cells, harmbench_replies, reply_pairs, shares
from bench.conversation_eval import load_conversations
from guardproxy.classifier import OnnxClassifier
from guardproxy.guard import MAX_HISTORY_REPLIES

ROOT = Path(__file__).resolve().parent.parent
LINES = (0.5, 0.6, 0.7, 0.8, 0.9)


def history_pairs(messages: Sequence[dict[str, object]]) -> list[tuple[str, str]]:
    """(user turn before it, assistant text) for each assistant turn with string content, the newest 32."""
    return reply_pairs(messages)[-MAX_HISTORY_REPLIES:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    clf = OnnxClassifier.load(args.model, threads=1, workers=1, timeout=60.0, cache_size=0)
    maxima: dict[str, list[float]] = defaultdict(list)
    convs = [c for c in load_conversations(args.data, args.seed, 50) if c.label == "benign"]
    for i, c in enumerate(convs, 1):
        pairs = history_pairs(c.messages)
        scores = clf.score_replies_sync(pairs) if pairs else []
        maxima[c.split].append(max((s.reply_harm for s in scores), default=0.0))
        if i % 200 == 0 or i == len(convs):
            print(f"  harmless conversations {i}/{len(convs)}", file=sys.stderr)
    result: dict[str, object] = {
        "model": str(args.model),
        "harmless_conversations": {s: {"n": len(m), "at_line": shares(m, LINES)} for s, m in sorted(maxima.items())},
    }
    replies = harmbench_replies(args.data, clf.score_replies_sync, LINES)
    result["harmbench_replies"] = replies
    print("share at or above each line: " + "  ".join(f"{line:.2f}" for line in LINES))
    for split, row in result["harmless_conversations"].items():  # type: ignore[attr-defined]
        print(f"harmless conversations, {split:<11} {row['n']:5d}  {cells(row['at_line'])}")
    for name, row in replies.items():
        print(f"HarmBench {name:<22} {row['n']:5d}  {cells(row['at_line'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
