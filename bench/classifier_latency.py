"""Guard-model latency on one core, tokenization included: ``python -m bench.classifier_latency``.

Measures what a request pays: normalize + tokenize (``guardproxy.encoding``) + one onnxruntime pass, for a
user turn of 64 and of 256 tokens, a conversation window as the tracker cuts it, a 256-token prompt/reply pair,
and the process RSS with the model loaded.
Prints wall and CPU-time percentiles (the CPU time is the uncontended figure on a shared machine) and the
load average. Never passes or fails (targets: p50 <= 6 ms at 64 tokens, <= 20 ms at 256, RSS <= 250 MiB).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "the a how to make can you please explain what why when where is are my for with about from this that "
    "recipe garden python process kill server database network history science water energy music friend "
    "write story letter email report summary table list code function error problem question answer travel"
).split()


def rss_mib() -> tuple[float, float]:
    """Current and peak resident set size of this process, in MiB (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def text_of_tokens(tokenizer: object, n: int, rng: random.Random) -> str:
    """English-like text whose encoding is exactly ``n`` ids, special tokens included."""
    from guardproxy.encoding import encode_prompt

    words: list[str] = []
    while len(encode_prompt(tokenizer, " ".join(words), 10_000)) < n:
        words.append(rng.choice(WORDS))
    while len(encode_prompt(tokenizer, " ".join(words), 10_000)) > n:
        words.pop()
    return " ".join(words)


def timed(fn: Callable[[], object], iterations: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples, cpu = [], []
    for _ in range(iterations):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    samples.sort()
    cpu.sort()
    # CPU time of this process beside wall time: on a shared machine the wall clock also counts the time other
    # processes held the core, the CPU time is what one uncontended core would take (one ORT thread).
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
        "cpu_p50_ms": round(statistics.median(cpu), 3),
        "cpu_p90_ms": round(cpu[int(0.9 * (len(cpu) - 1))], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/guard-v1"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime as ort

    from guardproxy.encoding import encode_pair, encode_prompt, load_tokenizer, pad_batch

    rss_before, _ = rss_mib()
    config = json.loads((args.model / "config.json").read_text())
    tokenizer = load_tokenizer(args.model / "tokenizer.json")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(args.model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rss_loaded, _ = rss_mib()
    max_length = int(config["max_length"])

    rng = random.Random(0)
    results: dict[str, object] = {
        "model": str(args.model),
        "layers": config.get("layers"),
        "threads": args.threads,
        "onnxruntime": ort.__version__,
    }
    for n in (64, 256):
        text = text_of_tokens(tokenizer, n, rng)

        def prompt_turn(text: str = text) -> object:
            return session.run(None, pad_batch([encode_prompt(tokenizer, text, max_length)]))

        results[f"prompt_{n}"] = timed(prompt_turn, args.iterations)
        feeds = pad_batch([encode_prompt(tokenizer, text, max_length)])
        results[f"model_only_{n}"] = timed(lambda feeds=feeds: session.run(None, feeds), args.iterations)
        results[f"tokenize_only_{n}"] = timed(lambda text=text: encode_prompt(tokenizer, text, max_length), 200)
    # a conversation window as the tracker has the model read it: 400 ids of joined turns cut to WINDOW_MAX_IDS
    from guardproxy.conversation.escalation import WINDOW_MAX_IDS

    window = text_of_tokens(tokenizer, 400, rng)
    results[f"window_{WINDOW_MAX_IDS}"] = timed(
        lambda: session.run(None, pad_batch([encode_prompt(tokenizer, window, WINDOW_MAX_IDS)])), args.iterations
    )
    prompt, reply = text_of_tokens(tokenizer, 40, rng), text_of_tokens(tokenizer, 400, rng)
    results["pair_256"] = timed(
        lambda: session.run(None, pad_batch([encode_pair(tokenizer, prompt, reply, max_length)])), args.iterations
    )
    rss_after, peak = rss_mib()
    results["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    results["rss_mib"] = {
        "before_load": round(rss_before, 1),
        "model_loaded": round(rss_loaded, 1),
        "after_runs": round(rss_after, 1),
        "peak": round(peak, 1),
    }
    for key, value in results.items():
        print(f"{key:>18}: {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
