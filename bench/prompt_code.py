"""A short ask with fenced code before or after it: what a per-turn check finds, and what the prose view adds.

Code after a short ask dilutes it past what the whole-turn windows recover. Per-turn checks now also read a turn
with fenced code without it (``classifier.prose_view``), counted from ``WHOLE_TURN_WINDOW_LINE``. The probe, on the
model's calibration or dev split (the trainer's own splitter; dev rows were never trained on): each of 120 short
harmful asks of the split (label ``harmful``, at most 48 ids) and 120 short harmless ones, with a fenced block of
4-25 lines of MBPP or HumanEval code (any split: it is padding) after or before it; the share at the default
policy's block line (0.5) for the pass and its windows, and with the prose view besides (at the line).

    python -m bench.prompt_code --split dev
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from bench.trainer_rows import prompt_rows, trainer_rows
from guardproxy.classifier import WHOLE_TURN_WINDOW_LINE, OnnxClassifier, prose_view
from guardproxy.normalize import normalize

ROOT = Path(__file__).resolve().parent.parent
LINE = 0.5
ASKS = 120


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "guard-v1")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", default="dev", choices=("calibration", "dev"))
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    examples = trainer_rows(args.model, args.data)
    rows = prompt_rows(examples, args.split)
    clf = OnnxClassifier.load(args.model, cache_size=0)
    length = clf.info.max_length

    def ids(text: str) -> int:
        return len(clf._tokenizer.encode(normalize(text), add_special_tokens=False).ids)

    short = [e for e in rows if ids(e.text) <= 48]
    sets = {
        "harmful": [e.text for e in short if e.label == "harmful" and e.harm >= 0.5],
        "harmless": [e.text for e in short if e.harm < 0.5],
    }
    code = [
        e.text.replace("```python", "").replace("```", "").strip()
        for e in examples
        if e.source in ("humaneval", "mbpp") and 4 <= e.text.count("\n") <= 25
    ][:400]
    rng = random.Random(args.seed)
    print(f"{'code':7} {'asks':9} {'n':>4} {'pass+windows':>13} {'+prose view':>12}")
    for where in ("after", "before"):
        for kind, pool in sets.items():
            asks = rng.sample(pool, min(ASKS, len(pool)))
            texts = [
                f"{a}\n```python\n{rng.choice(code)}\n```"
                if where == "after"
                else f"```python\n{rng.choice(code)}\n```\n{a}"
                for a in asks
            ]
            # the per-turn check without the view: the pass and its windows, as prompt_windows cuts them
            passes = clf.score_prompts_sync(texts, max_length=length)
            windows = [
                max((s.harm for s in clf.score_prompts_sync(clf.prompt_windows(t), max_length=length)), default=0.0)
                for t in texts
            ]
            views = clf.score_prompts_sync([prose_view(t) or "" for t in texts], max_length=length)
            before = [
                p.harm >= LINE or (p.harm >= 0.02 and w >= WHOLE_TURN_WINDOW_LINE)
                for p, w in zip(passes, windows, strict=True)
            ]
            after = [b or v.harm >= WHOLE_TURN_WINDOW_LINE for b, v in zip(before, views, strict=True)]
            n = len(texts)
            print(f"{where:7} {kind:9} {n:4} {sum(before) / n:13.1%} {sum(after) / n:12.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
