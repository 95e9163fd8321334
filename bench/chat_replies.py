"""How often the output check's reply harm reaches each line on ordinary chat replies (``stop-harmful-reply``).

Every assistant turn of the harmless conversations of ``bench.conversation_eval``'s sets (MT-Bench-101, stitched
MT-Bench chats, the authored long chats, the challenge long chats), by the trainer's split, scored as the gateway's
output check scores a reply (``OnnxClassifier.score_whole_replies``: the head and, for a long reply, its windows;
prompt = the user turn before it): the share of replies at or above each line, and of conversations with at least one.
Beside it, HarmBench's classifier validation replies (in training: flattering).

    python -m bench.chat_replies --data ../shared/data --json bench/results/chat_replies.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.conversation_eval import load_conversations, read_jsonl
from guardproxy.classifier import OnnxClassifier
from guardproxy.signals import ReplyScore

ROOT = Path(__file__).resolve().parent.parent
LINES = (0.5, 0.55, 0.6, 0.65, 0.7, 0.8)


def reply_pairs(messages: Sequence[dict[str, object]]) -> list[tuple[str, str]]:
    """(user turn before it, reply) for each assistant turn with string content."""
    pairs, last_user = [], ""
    for m in messages:
        content = m.get("content")
        if m.get("role") == "user" and isinstance(content, str):
            last_user = content
        elif m.get("role") == "assistant" and isinstance(content, str) and content.strip():
            pairs.append((last_user, content))
    return pairs


def shares(values: Sequence[float], lines: Sequence[float] = LINES) -> dict[str, float]:
    """The share of ``values`` at or above each line."""
    return {f"{line:.2f}": sum(v >= line for v in values) / max(len(values), 1) for line in lines}


def cells(at_line: dict[str, float]) -> str:
    """One table row's shares, as percentages."""
    return "  ".join(f"{100 * v:5.1f}%" for v in at_line.values())


def harmbench_replies(
    data: Path, score: Callable[[list[tuple[str, str]]], list[ReplyScore]], lines: Sequence[float] = LINES
) -> dict[str, dict[str, object]]:
    """HarmBench's classifier validation replies (in training: flattering), harmful compliances and the rest, scored
    by ``score``: how many reach each line."""
    rows = list(read_jsonl(data / "responses" / "harmbench_classifier_val.jsonl"))
    out: dict[str, dict[str, object]] = {}
    for label in (True, False):
        chosen = [r for r in rows if bool(r["harmful_compliance_human_majority"]) == label]
        harms = [s.reply_harm for s in score([(r["prompt"], r["response"]) for r in chosen])]
        out["harmful_compliance" if label else "not_harmful"] = {"n": len(chosen), "at_line": shares(harms, lines)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    clf = OnnxClassifier.load(args.model, threads=1, workers=1, timeout=60.0, cache_size=0)
    replies: dict[str, list[float]] = defaultdict(list)
    maxima: dict[str, list[float]] = defaultdict(list)
    convs = [c for c in load_conversations(args.data, args.seed, 50) if c.label == "benign"]
    for i, c in enumerate(convs, 1):
        pairs = reply_pairs(c.messages)
        harms = [s.reply_harm for s in clf.score_whole_replies_sync(pairs)] if pairs else []
        for key in (c.split, f"{c.split}/{c.set}"):
            replies[key] += harms
            maxima[key].append(max(harms, default=0.0))
        if i % 200 == 0 or i == len(convs):
            print(f"  harmless conversations {i}/{len(convs)}", file=sys.stderr)
    result: dict[str, object] = {
        "model": str(args.model),
        "lines": list(LINES),
        "harmless_replies": {k: {"n": len(v), "at_line": shares(v)} for k, v in sorted(replies.items())},
        "harmless_conversations": {k: {"n": len(v), "at_line": shares(v)} for k, v in sorted(maxima.items())},
    }
    hb = harmbench_replies(args.data, clf.score_whole_replies_sync)
    result["harmbench_replies"] = hb
    print("share of replies at or above each line: " + "  ".join(f"{line:.2f}" for line in LINES))
    for key, row in result["harmless_replies"].items():  # type: ignore[attr-defined]
        conv = result["harmless_conversations"][key]  # type: ignore[index]
        at = conv["at_line"]
        shown = cells(row["at_line"])
        print(f"{key:<24} replies {row['n']:5d}  {shown}   conversations with one: {at['0.50']:.1%}, {at['0.60']:.1%}")
    for name, row in hb.items():
        print(f"HarmBench {name:<18} {row['n']:5d}  {cells(row['at_line'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
