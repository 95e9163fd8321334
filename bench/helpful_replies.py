"""How often does the refusal head call a helpful reply a refusal? And on pairs files, how right is it?

    .venv/bin/python -m bench.helpful_replies [--model DIR] [--data ../shared/data] [--pairs FILE ...] [--json OUT]

Two readings, both with the model's own refusal rule (``refusal_partial`` of its ``config.json``, as the gateway
applies it):

- **Helpful replies in harmless conversations.** Each (user turn, assistant reply) pair of the dev split's harmless
  conversations, MT-Bench dialogues and the authored harmless chats, split as the model's trainer split them
  (``config.json`` ``data.seed`` and ``data.chat_turns``, as ``bench.conversation_eval`` reads them), and of the
  harmless chats of the challenge conversation sets (``challenge``, ``challenge12``: written blind, never trained
  on). Every reply there is helpful, so each one read as a partial or full refusal is a false refusal event: with
  output checks on it adds to the conversation's escalation and opens the window gate for the rest of the chat.
- **Pairs files** (``--pairs``, the responses format of ``guardproxy/training/authored/``: ``prompt``, ``response``,
  ``refusal``, optional ``voice``): the three-way confusion, macro-F1 and binary F1 (refusal = partial or full), and
  per ``voice`` group how many replies labelled ``none`` were read as refusals and how many refusals were read as
  ``none``.

Prints a table and, with ``--json``, writes every count. Never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.conversation_eval import AUTHORED_DIR, CHALLENGE_SETS, read_jsonl
from guardproxy.classifier import OnnxClassifier
from guardproxy.commands.evaluate import trainer_split_of_ids
from guardproxy.evaluation import binary_metrics, macro_f1
from guardproxy.settings import DEFAULT_MODEL_DIR
from guardproxy.signals import REFUSAL_CLASSES
from guardproxy.training.sources import chat_reply_pairs


def conversation_pairs(data: Path, seed: int, chat_turns: bool) -> dict[str, list[tuple[str, str, str]]]:
    """The (user, reply, language) triples of the harmless conversations, per set: the dev split's MT-Bench dialogues
    and authored chats, and the challenge sets' harmless chats (written blind, never trained on)."""
    split = trainer_split_of_ids(data, seed, chat_turns)
    dev: dict[str, list[dict[str, Any]]] = {"mtbench": list(read_jsonl(data / "conversations" / "mtbench101.jsonl"))}
    dev["authored"] = []
    for path in sorted(AUTHORED_DIR.glob("conversations*.jsonl")):
        dev["authored"] += [r for r in read_jsonl(path) if r["label"] == "benign"]
    chats = {name: [c for c in convs if split.get(c["id"]) == "dev"] for name, convs in dev.items()}
    for name, path in CHALLENGE_SETS.items():
        chats[name] = [r for r in read_jsonl(path) if r["label"] == "benign"]
    # the pairs the trainer's --chat-replies makes of a chat (its train split's), here of chats it never trains on
    return {
        name: [
            (e.text, e.reply or "", conv.get("language", "en"))
            for conv in convs
            for e in chat_reply_pairs(conv, name, "")
        ]
        for name, convs in chats.items()
    }


def file_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row["refusal"] not in REFUSAL_CLASSES:
                raise ValueError(f"refusal {row['refusal']!r} is not one of {REFUSAL_CLASSES}")
            row["prompt"], row["response"]  # noqa: B018 - both must be there
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"{path}:{n}: {exc}") from None
        rows.append(row)
    return rows


def pairs_report(rows: Sequence[dict[str, Any]], predicted: Sequence[str]) -> dict[str, Any]:
    gold = [r["refusal"] for r in rows]
    confusion = Counter(f"{g}->{p}" for g, p in zip(gold, predicted, strict=True))
    voices: dict[str, Counter[str]] = defaultdict(Counter)
    for r, p in zip(rows, predicted, strict=True):
        v = voices[str(r.get("voice", "-"))]
        v["n"] += 1
        if r["refusal"] == "none":
            v["helpful"] += 1
            v["helpful_read_as_refusal"] += p != "none"
        else:
            v["refusals"] += 1
            v["refusal_read_as_none"] += p == "none"
    helpful = [p for g, p in zip(gold, predicted, strict=True) if g == "none"]
    return {
        "n": len(rows),
        "macro_f1": macro_f1(gold, list(predicted), REFUSAL_CLASSES),
        "binary_f1": binary_metrics([g != "none" for g in gold], [p != "none" for p in predicted]).f1,
        "helpful": len(helpful),
        "helpful_read_as_refusal": sum(p != "none" for p in helpful),
        "confusion": dict(sorted(confusion.items())),
        "by_voice": {k: dict(v) for k, v in sorted(voices.items())},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.helpful_replies", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--pairs", type=Path, nargs="*", default=[], help="responses-format JSONL files")
    parser.add_argument("--no-conversations", action="store_true", help="only the --pairs files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    files = {p: file_rows(p) for p in args.pairs}

    data_config = json.loads((args.model / "config.json").read_text()).get("data", {})
    seed, chat_turns = int(data_config.get("seed", 0)), bool(data_config.get("chat_turns", False))
    clf = OnnxClassifier.load(args.model, threads=args.threads, cache_size=0)
    result: dict[str, Any] = {"model": str(args.model), "version": clf.info.version, "seed": seed}
    try:
        if not args.no_conversations:
            result["conversations"] = {}
            for name, pairs in conversation_pairs(args.data, seed, chat_turns).items():
                print(f"scoring {len(pairs)} dev {name} replies", file=sys.stderr, flush=True)
                scores = clf.score_replies_sync([(u, r) for u, r, _ in pairs])
                classes = Counter(s.refusal for s in scores)
                read = classes["partial"] + classes["full"]
                languages: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # language -> [read, n]
                for (_, _, language), s in zip(pairs, scores, strict=True):
                    languages[language][0] += s.refusal != "none"
                    languages[language][1] += 1
                counts: dict[str, Any] = {"n": len(pairs), "read_as_refusal": read, **classes}
                counts["by_language"] = {k: {"read_as_refusal": v[0], "n": v[1]} for k, v in sorted(languages.items())}
                result["conversations"][name] = counts
                by_language = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(languages.items()))
                where = name if name in CHALLENGE_SETS else f"dev {name}"
                print(
                    f"{where} harmless chats: {read} of {len(pairs)} helpful replies read as refusals "
                    f"({read / max(1, len(pairs)):.1%}: {classes['full']} full, {classes['partial']} partial; "
                    f"by language {by_language})"
                )
        result["pairs"] = {}
        for path, rows in files.items():
            print(f"scoring {len(rows)} pairs of {path}", file=sys.stderr, flush=True)
            scores = clf.score_replies_sync([(r["prompt"], r["response"]) for r in rows])
            rep = pairs_report(rows, [s.refusal for s in scores])
            result["pairs"][str(path)] = rep
            print(
                f"{path.name}: macro-F1 {rep['macro_f1']:.3f}, binary F1 {rep['binary_f1']:.3f}, helpful read as "
                f"refusal {rep['helpful_read_as_refusal']} of {rep['helpful']}"
            )
            for voice, v in rep["by_voice"].items():
                print(
                    f"  {voice:<24} n {v['n']:>3}  helpful misread {v.get('helpful_read_as_refusal', 0)}"
                    f"/{v.get('helpful', 0)}  refusals missed {v.get('refusal_read_as_none', 0)}/{v.get('refusals', 0)}"
                )
    finally:
        clf.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
