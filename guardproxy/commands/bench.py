"""``guardproxy bench``: the gateway's added latency, per-stage cost, throughput and memory, measured end to end.

Starts the gateway itself (one process per mode, the real guard with the default policy, on loopback) and drives
it, with direct-to-upstream requests interleaved for reference, against ``--fake-upstream`` (the built-in FAKE
upstream, with ``--ttft-ms`` and ``--tokens-per-s``) or the user's ``--upstream URL``. The key for a real
upstream comes from the environment variable ``--api-key-env`` names (default ``OPENAI_API_KEY``), never from a
flag, and is never printed. See ``guardproxy.benchmark`` for what is measured and how.

A run where a target answered none of its requests (a wrong key, URL or model) prints what it got: each target's
statuses, the first distinct error messages (keys cut out) and what to check; writes ``--json`` (its ``failure``)
if asked; then exits 2 with a one-line error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guardproxy.benchmark.run import BenchConfig


def _ints(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--upstream", metavar="URL", help="your OpenAI-compatible upstream base URL, e.g. https://…/v1")
    src.add_argument("--fake-upstream", action="store_true", help="the built-in FAKE upstream (canned replies)")
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        default="OPENAI_API_KEY",
        help="environment variable holding the upstream key (default OPENAI_API_KEY)",
    )
    parser.add_argument("--upstream-model", metavar="NAME", help="model name sent upstream (default fake-model)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens sent upstream (default 32 for --upstream)")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="FAKE upstream time to first token (50)")
    parser.add_argument("--tokens-per-s", type=float, default=500.0, help="FAKE upstream token rate (500; 0: at once)")
    parser.add_argument("--reply-words", type=int, default=60, help="FAKE upstream reply length in words (60)")
    parser.add_argument(
        "--concurrency",
        type=_ints,
        default=(1, 4, 16),
        metavar="N[,N...]",
        help="concurrency levels of the latency phase (1,4,16)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per level and target (200)")
    parser.add_argument(
        "--modes",
        type=_names,
        default=("direct", "guarded", "speculative"),
        metavar="M[,M...]",
        help="targets: direct, guarded, input-only (the guard without output checks), speculative, passthrough "
        "(direct,guarded,speculative)",
    )
    parser.add_argument(
        "--sweep",
        type=_ints,
        metavar="N[,N...]",
        help="throughput sweep levels (default: 1,2,4,... until throughput stops growing; "
        "'none' skips; default none with --upstream)",
    )
    parser.add_argument("--sweep-seconds", type=float, default=5.0, help="seconds per sweep level (5)")
    parser.add_argument("--sweep-ttft-ms", type=float, default=0.0, help="FAKE upstream TTFT in the sweep (0)")
    parser.add_argument("--max-concurrency", type=int, default=256, help="the sweep's highest level (256)")
    parser.add_argument(
        "--lengths",
        type=_ints,
        metavar="N[,N...]",
        help="history lengths reported by the conversation-length phase "
        "(0,1,2,5,10,20,50,100; 'none' skips it; default none with --upstream)",
    )
    parser.add_argument("--conversations", type=int, default=3, help="conversations grown in that phase (3)")
    parser.add_argument(
        "--length-ttft-ms",
        type=float,
        default=0.0,
        help="FAKE upstream TTFT in that phase (0: the reply at once, so the cost is the gateway's own work; "
        "with --speculative-window a TTFT above the window pass hides it)",
    )
    parser.add_argument("--model", type=Path, metavar="DIR", help="guard model directory (default models/guard-v1)")
    parser.add_argument("--policy", type=Path, metavar="FILE", help="active policy (default policies/default.toml)")
    parser.add_argument("--threads", type=int, help="the gateways' guard.threads: intra-op threads per model run (1)")
    parser.add_argument(
        "--workers",
        type=int,
        help="the gateways' guard.workers: model runs at once (default: this machine's CPUs, at most 2)",
    )
    parser.add_argument(
        "--concurrent-window",
        action="store_true",
        help="the gateways' guard.concurrent_window: a conversation's window pass beside its turn pass "
        "(needs --workers 2+)",
    )
    parser.add_argument(
        "--window-ids",
        type=int,
        help="the gateways' guard.window_max_ids: ids of a conversation window the model reads",
    )
    parser.add_argument(
        "--speculative-window",
        action="store_true",
        help="the gateways' guard.speculative_window: the upstream call starts on a request's own turns while its "
        "conversation window is scored; the reply waits for the window's verdict",
    )
    parser.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the gateways' guard.early_exit: a clearly harmless user turn is answered from the guard model's first "
        "layers (needs the model directory's early_exit.json); default: the gateway's default, auto (on where the "
        "model has a fitting early_exit.json)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gateway processes the conversation-length phase spreads each conversation over, round robin, sharing "
        "conversation state in Redis (--redis-url), as replicas behind a load balancer without sticky sessions (1)",
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="the replicas' shared Redis (keys under a fresh prefix, removed at the end; redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--capacity", type=int, default=512, help="gateway max concurrent requests (512)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per target (20)")
    parser.add_argument(
        "--refusals",
        type=int,
        default=0,
        help="after warm-up, have each guarded gateway block N plainly harmful asks, so the bench's tenant has "
        "refused requests in memory, as a busy shared key does (0; with --upstream, an ask the policy does not "
        "block reaches your upstream)",
    )
    parser.add_argument("--stream-share", type=float, default=0.3, help="share of streaming requests (0.3)")
    parser.add_argument(
        "--conversation-share",
        type=float,
        default=0.5,
        help="share of requests continuing a multi-turn conversation (0.5)",
    )
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="cap on the whole run (1800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full result as JSON")
    parser.add_argument("--png", type=Path, metavar="DIR", help="write charts (latency, length, sweep, rss) here")
    parser.add_argument("--workdir", type=Path, metavar="DIR", help="where gateway configs and logs go (a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def config_from(args: argparse.Namespace) -> BenchConfig:
    from guardproxy.benchmark.load import MixSpec
    from guardproxy.benchmark.run import BenchConfig
    from guardproxy.errors import ConfigError
    from guardproxy.settings import load_settings

    real = args.upstream is not None
    api_key = None
    if real and not args.upstream_model:
        raise ConfigError("--upstream needs --upstream-model NAME (the model your upstream serves)")
    if real:
        api_key = os.environ.get(args.api_key_env) or None
        if api_key is None:
            print(f"guardproxy bench: note: ${args.api_key_env} is not set; sending no upstream key", file=sys.stderr)
    model_dir = args.model
    if model_dir is None:
        model_dir = load_settings().guard.model_dir  # GUARDPROXY_GUARD__MODEL_DIR or models/guard-v1
    sweep = args.sweep
    if sweep is None and real:
        sweep = ()  # a sweep against a real (paid) upstream only when asked for
    lengths = args.lengths
    if lengths is None:
        lengths = () if real else (0, 1, 2, 5, 10, 20, 50, 100)
    mix = MixSpec(
        stream_share=args.stream_share,
        conversation_share=args.conversation_share,
        model=args.upstream_model or "fake-model",
        max_tokens=args.max_tokens if args.max_tokens is not None else (32 if real else None),
    )
    return BenchConfig(
        upstream=args.upstream,
        api_key=api_key,
        api_key_env=args.api_key_env,
        upstream_model=mix.model,
        max_tokens=mix.max_tokens,
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        reply_words=args.reply_words,
        concurrency=args.concurrency,
        requests=args.requests,
        modes=args.modes,
        sweep=sweep,
        sweep_seconds=args.sweep_seconds,
        sweep_ttft_ms=args.sweep_ttft_ms,
        length_ttft_ms=args.length_ttft_ms,
        max_concurrency=args.max_concurrency,
        lengths=lengths,
        conversations=args.conversations,
        model_dir=model_dir,
        policy=args.policy,
        threads=args.threads,
        workers=args.workers,
        concurrent_window=args.concurrent_window,
        speculative_window=args.speculative_window,
        early_exit="auto" if args.early_exit is None else args.early_exit,
        window_ids=args.window_ids,
        capacity=args.capacity,
        replicas=args.replicas,
        redis_url=args.redis_url,
        max_seconds=args.max_seconds,
        warmup=args.warmup,
        refusals=args.refusals,
        mix=mix,
        seed=args.seed,
        workdir=args.workdir,
        progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from guardproxy.benchmark.procs import BenchError
    from guardproxy.benchmark.report import render, write_json, write_pngs
    from guardproxy.benchmark.run import run_bench

    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    cfg = config_from(args)
    result = asyncio.run(run_bench(cfg)).to_dict()
    print(render(result))
    if args.json is not None:
        write_json(result, args.json)
        print(f"JSON: {args.json}")
    if "failure" in result:
        # after the report and the JSON: the error line, and the exit status, say the run measured nothing
        raise BenchError(result["failure"]["message"])
    if args.png is not None:
        for path in write_pngs(result, args.png):
            print(f"chart: {path}")
    return 0
