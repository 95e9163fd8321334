"""How the classifier handles long inputs: is head+tail truncation enough, or should more windows be scored?

    .venv/bin/python -m bench.classifier_long_inputs [--model models/guard-v1] [--n 100]

Harmful asks (HarmBench / AdvBench, fixed sample) and benign asks (Self-Instruct) are buried in about 1,500
tokens of benign filler (GSM8K word problems) at the start, middle or end, the way a jailbreak wrapper buries
its ask. Each text is scored three ways:

- ``head+tail``: the runtime's default (``encoding.encode_prompt`` keeps 1/4 head, 3/4 tail);
- ``+last window``: also score the last ~max_length tokens alone (``max_length * 3.5`` characters), take the max;
- ``all windows``: max harm over consecutive windows covering the whole text (cost grows with length).

Prints recall of harmful asks and flag rate of benign ones at the model's harm threshold, per placement, and the
number of model passes each strategy costs. Never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from guardproxy.classifier import OnnxClassifier
from guardproxy.settings import DEFAULT_MODEL_DIR, PROJECT_ROOT

DATA = PROJECT_ROOT.parent / "shared" / "data" / "prompts"
CHARS_PER_TOKEN = 3.5  # English prose: a window of max_length * 3.5 characters fits in max_length ids


def rows(name: str, label: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [r["prompt"] for r in map(json.loads, filter(None, text.split("\n"))) if r["label"] == label]


def windows(text: str, step: int) -> list[str]:
    return [text[i : i + step] for i in range(0, max(1, len(text)), step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(0)
    harmful = rng.sample(rows("harmbench.jsonl", "harmful") + rows("advbench.jsonl", "harmful"), args.n)
    benign = rng.sample(rows("self_instruct.jsonl", "benign"), args.n)
    filler_pool = rows("gsm8k.jsonl", "benign")
    clf = OnnxClassifier.load(args.model, threads=2, cache_size=0)
    t = clf.thresholds.harm
    chars = int(clf.info.max_length * CHARS_PER_TOKEN)
    print(f"model {clf.info.name} {clf.info.version}, max_length {clf.info.max_length}, harm threshold {t:.3f}")
    plain_h = [s.harm for s in clf.score_prompts_sync(harmful)]
    plain_b = [s.harm for s in clf.score_prompts_sync(benign)]
    print(
        f"plain asks: harmful recall {sum(h >= t for h in plain_h) / args.n:.2f}, "
        f"benign flagged {sum(h >= t for h in plain_b) / args.n:.2f}"
    )
    for place in ("start", "middle", "end"):
        for kind, asks in (("harmful", harmful), ("benign", benign)):
            texts = []
            for ask in asks:
                filler = " ".join(rng.sample(filler_pool, 14))
                half = len(filler) // 2
                texts.append(
                    {
                        "start": f"{ask}\n\n{filler}",
                        "middle": f"{filler[:half]}\n\n{ask}\n\n{filler[half:]}",
                        "end": f"{filler}\n\n{ask}",
                    }[place]
                )
            base = [s.harm for s in clf.score_prompts_sync(texts)]
            last = [s.harm for s in clf.score_prompts_sync([x[-chars:] for x in texts])]
            split = [windows(x, chars) for x in texts]
            flat = clf.score_prompts_sync([w for ws in split for w in ws])
            it = iter(flat)
            every = [max(max(next(it).harm for _ in ws), b) for ws, b in zip(split, base, strict=True)]
            with_last = [max(a, b) for a, b in zip(base, last, strict=True)]
            passes = sum(len(ws) for ws in split) / len(texts)
            rate = {
                name: sum(h >= t for h in hs) / len(hs)
                for name, hs in (("head+tail", base), ("+last window", with_last), ("all windows", every))
            }
            what = "recall " if kind == "harmful" else "flagged"
            print(
                f"{place:<6} {kind:<7} {what}: "
                + "  ".join(f"{k} {v:.2f}" for k, v in rate.items())
                + f"   (passes: 1 / 2 / {1 + passes:.1f})"
            )
    clf.close()


if __name__ == "__main__":
    main()
