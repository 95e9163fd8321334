"""Benchmark the classifier runtime (``guardproxy.classifier.OnnxClassifier``), not the raw model.

    .venv/bin/python -m bench.classifier_runtime [--model models/guard-v1] [--threads 1] [--repeats 200]

Prints, never passes or fails:

1. latency of one user turn at 64 and 256 tokens through ``await score_prompts([text])`` (tokenization,
   normalization, the executor hop and inference; cache off, every text distinct), beside the sync path
   without the hop, as p50 / p90 in ms;
2. batching: throughput (texts/s) of scoring 64 distinct texts with ``max_batch`` 1, 4, 8, 16, 32, at 64 tokens
   and at mixed lengths (16..256 tokens), so micro-batching is only added if it measurably helps;
3. concurrency: 16 concurrent single-text callers through the one executor (workers=1 and 2), texts/s;
4. process RSS after loading the model and after the runs.

The raw model (session.run only) is measured by the Trainer's ``bench/classifier_latency.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import time
from pathlib import Path

from guardproxy.classifier import OnnxClassifier
from guardproxy.encoding import encode_prompt
from guardproxy.settings import DEFAULT_MODEL_DIR

WORDS = (
    "the a garden river network protocol recipe history student window mountain engine question answer "
    "library ancient modern quickly carefully because although between during system budget weather music "
    "doctor travel kitchen energy paper market planet ocean village teacher computer science"
).split()


def text_of_tokens(clf: OnnxClassifier, n_tokens: int, seed: int) -> str:
    """A distinct English-like text that encodes to exactly ``n_tokens`` ids (special tokens included)."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_tokens)]
    text = " ".join(words)
    while len(encode_prompt(clf._tokenizer, text, 10_000)) > n_tokens:
        words.pop()
        text = " ".join(words)
    return f"{seed} " + text if len(encode_prompt(clf._tokenizer, f"{seed} " + text, 10_000)) <= n_tokens else text


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def rss_mib() -> float:
    # Current RSS from /proc (ru_maxrss is the peak); Linux only, as the deployment is.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def latency(clf: OnnxClassifier, n_tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    texts = [text_of_tokens(clf, n_tokens, 10_000 * n_tokens + i) for i in range(2 * repeats + 20)]
    for t in texts[:10]:  # warm-up
        await clf.score_prompts([t])
    hop: list[float] = []
    sync: list[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        await clf.score_prompts([texts[10 + 2 * i]])
        hop.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        clf.score_prompts_sync([texts[11 + 2 * i]])
        sync.append((time.perf_counter() - t0) * 1000)
    return hop, sync


def batching(model: Path, threads: int, lengths: list[int], label: str) -> None:
    for max_batch in (1, 4, 8, 16, 32):
        clf = OnnxClassifier.load(model, threads=threads, cache_size=0, max_batch=max_batch, max_batch_tokens=8192)
        texts = [text_of_tokens(clf, n, 777 + i) for i, n in enumerate(lengths)]
        clf.score_prompts_sync(texts[:8])
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            clf.score_prompts_sync(texts)
            best = min(best, time.perf_counter() - t0)
        print(f"  {label:<22} max_batch={max_batch:<3} {len(texts) / best:8.1f} texts/s")
        clf.close()


async def concurrency(model: Path, threads: int, workers: int, n_tokens: int) -> float:
    clf = OnnxClassifier.load(model, threads=threads, workers=workers, cache_size=0, timeout=60)
    texts = [text_of_tokens(clf, n_tokens, 50_000 + i) for i in range(16 * 8)]
    await clf.score_prompts(texts[:4])
    t0 = time.perf_counter()

    async def caller(k: int) -> None:
        for j in range(8):
            await clf.score_prompts([texts[k * 8 + j]])

    await asyncio.gather(*(caller(k) for k in range(16)))
    rate = len(texts) / (time.perf_counter() - t0)
    await clf.aclose()
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--skip-batching", action="store_true")
    args = parser.parse_args()

    print(f"RSS before load: {rss_mib():.0f} MiB")
    clf = OnnxClassifier.load(args.model, threads=args.threads, workers=1, cache_size=0, timeout=60)
    print(f"model {clf.info.name} {clf.info.version}, max_length {clf.info.max_length}, threads {args.threads}")
    print(f"RSS after load: {rss_mib():.0f} MiB")
    print("1. one user turn, await score_prompts([text]) (executor hop) vs score_prompts_sync:")
    for n in (64, 256):
        hop, sync = await latency(clf, n, args.repeats)
        print(
            f"  {n:>3} tokens: async p50 {statistics.median(hop):6.2f} ms  p90 {pct(hop, 0.9):6.2f} ms | "
            f"sync p50 {statistics.median(sync):6.2f} ms  p90 {pct(sync, 0.9):6.2f} ms  (n={args.repeats})"
        )
    await clf.aclose()
    if not args.skip_batching:
        print("2. batching, 64 distinct texts per call (best of 3):")
        batching(args.model, args.threads, [64] * 64, "64 tokens")
        rng = random.Random(3)
        batching(args.model, args.threads, [rng.randint(16, 256) for _ in range(64)], "mixed 16-256 tokens")
        print("3. 16 concurrent callers x 8 single-text calls, 64 tokens:")
        for workers in (1, 2):
            rate = await concurrency(args.model, args.threads, workers, 64)
            print(f"  workers={workers}: {rate:8.1f} texts/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RSS now: {rss_mib():.0f} MiB, peak {peak:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
