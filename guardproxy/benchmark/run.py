"""The bench's phases and their results.

1. Start the processes: the FAKE upstream (or use the user's), one gateway per mode (``guarded``: the guard with
   the default policy, input check before the upstream call; ``speculative``: the same with speculative
   forwarding; ``input-only``: the guard with ``guard.output_checks = false``, the configuration of issue 7's
   targets; ``passthrough``: no checks, on request), all on loopback.
2. Warm-up, not recorded.
3. Latency per concurrency level: the mix, planned once (``load.Plan``), sent to every target (``direct`` is
   the upstream itself) interleaved request by request in one run, so every target gets the same requests and sees
   the same moment of a shared machine. Per-stage times from each gateway's ``/metrics`` histograms, diffed over
   the level. Blocked and flagged requests are counted per target (a blocked one has no latency sample).
4. Conversation length: conversations grown to the longest length one request at a time through the guarded
   gateway (concurrency 1, plain replies), each request's overhead recorded against its history length, with a
   fresh single-turn request interleaved at every step as the reference.
5. Throughput sweep: doubling concurrency until throughput stops growing (two levels under 5% above the best),
   reporting what happens past that point: latency, 503s at capacity, classifier timeouts (fail-open).
6. RSS and open descriptors of every gateway, sampled all along.

Load is bounded: concurrency, requests per level, conversation length and total time are capped
(``BenchConfig.validate``; ``--max-seconds`` counts from the start, warm-up included), and requests go only to
loopback processes the bench started or to ``--upstream``.

Stopping: SIGINT, SIGTERM and SIGHUP cancel the run, whose cleanup stops every process it started and removes its
temp folder (a second signal kills the processes at once); a target none of whose requests was answered stops the
run: the result then carries ``failure`` (``failure_report``: what each target got, the first distinct error messages
with keys cut out, what to check) beside whatever was measured before, and ``guardproxy bench`` prints it, writes
``--json``, then exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from redis.exceptions import RedisError

from guardproxy.benchmark.load import (
    Mix,
    MixSpec,
    Plan,
    Progress,
    Replay,
    Sample,
    Scrape,
    Target,
    client_session,
    counter_diff,
    cpu_ms_per_request,
    percentiles,
    run_steps,
    scrape,
    seed_refusals,
    send,
    stage_diff,
    status_key,
    summarize,
)
from guardproxy.benchmark.procs import (
    BenchError,
    GatewaySpec,
    Proc,
    ProcessSampler,
    cpu_seconds,
    kill_children,
    live_children,
    start_fake_upstream,
    start_gateway,
)
from guardproxy.conversation.redis_backend import RedisBackend
from guardproxy.errors import StateBackendError
from guardproxy.settings import default_workers

MAX_CONCURRENCY = 1024
MAX_REQUESTS = 200_000
MAX_TURNS = 200
MAX_SECONDS = 3 * 3600
MAX_TTFT_MS = 10_000  # above it the FAKE upstream would not answer its readiness check in time
MAX_CONVERSATIONS = 1000
MAX_CAPACITY = 65_536
# a target verdict from fewer samples than this is marked as indicative
MIN_VERDICT_SAMPLES = 20
MODES = ("direct", "guarded", "input-only", "speculative", "passthrough")
# Server-Timing stages of a request whose work grows with the history it carries: the body's parse and validation,
# and the conversation state's lookup (the hash chain over every message); the length phase reports them per length
HISTORY_STAGES = ("parse", "state_lookup")
# Issue 7's reference: LiteLLM's proxy did 31-35 req/s on this machine; the target is 5x the top of that range.
LITELLM_REFERENCE_RPS = 35.0


def _within(value: float, lo: float, hi: float) -> bool:
    return math.isfinite(value) and lo <= value <= hi


def upstream_problem(url: str) -> None:
    """Refuse an ``--upstream`` URL the bench cannot use, in one line that never echoes it: a key or password in
    it would be printed, written to the gateways' config files and sent where the gateway cannot keep it apart (the
    gateway appends ``/chat/completions`` to the base URL, after any query)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        raise BenchError("--upstream is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError("--upstream must be an http:// or https:// base URL, such as https://host/v1")
    if parts.username is not None or parts.password is not None:
        raise BenchError(
            "--upstream: credentials in the URL (user:password@host) are not supported: put the key in the "
            "environment variable --api-key-env names (default OPENAI_API_KEY)"
        )
    if parts.query or parts.fragment or url.rstrip().endswith(("?", "#")):
        raise BenchError(
            "--upstream: a query string or fragment (?...) is not supported: the gateway appends the API path to the "
            "base URL; put the key in the environment variable --api-key-env names (default OPENAI_API_KEY)"
        )


def public_url(url: str) -> str:
    """``url`` as reported: without user info, query or fragment (``upstream_problem`` refuses those anyway)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class BenchConfig:
    upstream: str | None = None  # the user's upstream base URL (…/v1); None: the FAKE upstream
    api_key: str | None = field(default=None, repr=False)  # sent as the client's bearer key; never reported
    api_key_env: str = "OPENAI_API_KEY"  # the variable the key came from (--api-key-env), named in a failure's checks
    upstream_model: str = "fake-model"
    max_tokens: int | None = None
    ttft_ms: float = 50.0
    tokens_per_s: float = 500.0
    reply_words: int = 60
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 200  # per concurrency level and target
    modes: tuple[str, ...] = ("direct", "guarded", "speculative")
    sweep: tuple[int, ...] | None = None  # None: 1, 2, 4, ... until saturation; (): no sweep
    sweep_seconds: float = 5.0
    sweep_ttft_ms: float = 0.0
    max_concurrency: int = 256
    lengths: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100)  # history turns reported; () skips the phase
    # FAKE upstream TTFT in that phase. 0: the upstream answers at once, so nothing the gateway does beside the
    # upstream call (guard.speculative_window's window pass) can hide behind it: the cost of CPU work, not latency.
    length_ttft_ms: float = 0.0
    conversations: int = 3
    model_dir: Path | None = None
    policy: Path | None = None
    threads: int | None = None  # the gateways' guard.threads (None: the default)
    workers: int | None = None  # the gateways' guard.workers (None: the default)
    concurrent_window: bool = False  # the gateways' guard.concurrent_window
    speculative_window: bool = False  # the gateways' guard.speculative_window
    early_exit: bool | Literal["auto"] = "auto"  # the gateways' guard.early_exit (auto: the gateway's default)
    refusals: int = 0  # harmful asks each guarded gateway blocks after warm-up (its tenant's refusal memory)
    window_ids: int | None = None  # the gateways' guard.window_max_ids (None: the default)
    capacity: int = 512
    # gateway processes the conversation-length phase spreads each conversation over, round robin, sharing conversation
    # state in Redis (``redis_url``), as replicas behind a load balancer without sticky sessions; 1: one gateway
    replicas: int = 1
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_seconds: float = 1800.0
    warmup: int = 20
    mix: MixSpec = MixSpec()
    seed: int = 0
    workdir: Path | None = None
    progress: bool = True

    @property
    def fake(self) -> bool:
        return self.upstream is None

    def validate(self) -> None:
        """Raise ``BenchError`` naming the first flag out of its range (the checks in flag order). NaN fails every
        range check (a comparison with it is false)."""
        if self.upstream is not None:
            upstream_problem(self.upstream)
        unknown = set(self.modes) - set(MODES)
        mix = self.mix
        checks = (
            (self.max_tokens is None or 1 <= self.max_tokens <= 1_000_000, "--max-tokens must be 1..1000000"),
            (_within(self.ttft_ms, 0, MAX_TTFT_MS), f"--ttft-ms must be a number in 0..{MAX_TTFT_MS}"),
            (_within(self.tokens_per_s, 0, 1e6), "--tokens-per-s must be a number in 0..1000000 (0: at once)"),
            (1 <= self.reply_words <= 10_000, "--reply-words must be 1..10000"),
            (bool(self.concurrency) and all(1 <= c <= MAX_CONCURRENCY for c in self.concurrency),
             f"--concurrency: each level must be 1..{MAX_CONCURRENCY}"),
            (1 <= self.requests <= MAX_REQUESTS, f"--requests must be 1..{MAX_REQUESTS}"),
            (all(1 <= c <= MAX_CONCURRENCY for c in self.sweep or ()),
             f"--sweep: each level must be 1..{MAX_CONCURRENCY}"),
            (1 <= self.max_concurrency <= MAX_CONCURRENCY, f"--max-concurrency must be 1..{MAX_CONCURRENCY}"),
            (all(0 <= n <= MAX_TURNS for n in self.lengths), f"--lengths: each must be 0..{MAX_TURNS}"),
            (0 < self.max_seconds <= MAX_SECONDS, f"--max-seconds must be in (0, {MAX_SECONDS}]"),
            (0 < self.sweep_seconds <= 600, "--sweep-seconds must be in (0, 600]"),
            (_within(self.sweep_ttft_ms, 0, MAX_TTFT_MS), f"--sweep-ttft-ms must be a number in 0..{MAX_TTFT_MS}"),
            (1 <= self.conversations <= MAX_CONVERSATIONS, f"--conversations must be 1..{MAX_CONVERSATIONS}"),
            (0 <= self.length_ttft_ms <= MAX_TTFT_MS, f"--length-ttft-ms must be 0..{MAX_TTFT_MS}"),
            (0 <= self.refusals <= 100, "--refusals must be 0..100"),
            (0 <= self.warmup <= MAX_REQUESTS, f"--warmup must be 0..{MAX_REQUESTS}"),
            (1 <= self.capacity <= MAX_CAPACITY, f"--capacity must be 1..{MAX_CAPACITY}"),
            (_within(mix.stream_share, 0, 1), "--stream-share must be a number in 0..1"),
            (_within(mix.conversation_share, 0, 1), "--conversation-share must be a number in 0..1"),
            (not unknown and bool(self.modes), f"--modes: choose from {', '.join(MODES)}"),
            (bool(set(self.modes) - {"direct"}), "--modes needs at least one gateway mode"),
            (self.threads is None or 1 <= self.threads <= 64, "--threads must be 1..64"),
            (self.workers is None or 1 <= self.workers <= 64, "--workers must be 1..64"),
            (
                not self.concurrent_window or (self.workers or default_workers()) >= 2,
                "--concurrent-window needs --workers 2 or more",
            ),
            (self.window_ids is None or 8 <= self.window_ids <= 512, "--window-ids must be 8..512"),
            (1 <= self.replicas <= 8, "--replicas must be 1..8"),
            (self.replicas == 1 or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
             "--redis-url must be redis://host:port/db"),
        )  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise BenchError(message)

    def public(self) -> dict[str, Any]:
        """The configuration as reported (no key: none of ``api_key``, nor any password or query in the URL)."""
        out = dataclasses.asdict(self)
        out.pop("api_key")
        out["api_key_set"] = self.api_key is not None
        out["upstream"] = public_url(self.upstream) if self.upstream is not None else None
        for k in ("model_dir", "policy", "workdir"):
            out[k] = str(out[k]) if out[k] is not None else None
        return out


@dataclass(frozen=True)
class BenchResult:
    machine: dict[str, Any]
    config: dict[str, Any]
    latency: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    length: dict[str, Any]
    sweep: dict[str, Any]
    rss: dict[str, Any]
    targets: list[dict[str, Any]]
    notes: list[str]
    # a target none of whose requests was answered stopped the run (``failure_report``); None when it ran through
    failure: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; ``failure`` only in that of a run that stopped (a complete run's keys stay as they
        were)."""
        out = dataclasses.asdict(self)
        if out["failure"] is None:
            del out["failure"]
        return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    load: tuple[float, float, float] | None = None
    with contextlib.suppress(OSError, AttributeError):
        load = os.getloadavg()
    versions: dict[str, str] = {}
    for mod in ("onnxruntime", "uvicorn", "aiohttp", "httpx"):
        with contextlib.suppress(Exception):
            versions[mod] = str(__import__(mod).__version__)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
        "versions": versions,
        "default_workers": default_workers(),  # guard.workers of a gateway started here without --workers
    }


class Bench:
    def __init__(self, cfg: BenchConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.progress = Progress(enabled=cfg.progress)
        self.procs: list[Proc] = []
        self.gateways: dict[str, Proc] = {}
        self.targets: list[Target] = []
        self.sampler: ProcessSampler | None = None
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.notes: list[str] = []
        self.deadline = time.monotonic() + cfg.max_seconds
        self.workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="guardproxy-bench-"))
        # the length target's further replicas (``--replicas``), and the Redis key prefix they share (removed at close)
        self.replicas: list[tuple[Target, Proc]] = []
        self.redis_prefix = f"gpbench:{secrets.token_hex(8)}:"
        # the latency phase's rows and stages so far: reported even when a dead target stops the phase
        self.latency_rows: list[dict[str, Any]] = []
        self.latency_stages: list[dict[str, Any]] = []

    # --- setup ---

    async def start(self) -> None:
        cfg = self.cfg
        self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.replicas > 1:
            await self._check_redis()
        if cfg.fake:
            self.progress.phase("starting the FAKE upstream", None)
            up = await start_fake_upstream(
                self.workdir, ttft_ms=cfg.ttft_ms, tokens_per_s=cfg.tokens_per_s, reply_words=cfg.reply_words
            )
            self.procs.append(up)
            upstream = up.base + "/v1"
        else:
            assert cfg.upstream is not None
            upstream = cfg.upstream.rstrip("/")
        headers = {"content-type": "application/json"}
        # The key the client presents: the user's for a real upstream (passed through by the gateway), a dummy
        # for the fake (it also names the bench's tenant in the gateway).
        headers["authorization"] = f"Bearer {cfg.api_key or 'bench-not-a-real-key'}"
        if "direct" in cfg.modes:
            self.targets.append(Target("direct", upstream + "/chat/completions", headers))
        for mode in cfg.modes:
            if mode == "direct":
                continue
            spec = GatewaySpec(
                mode,
                guard=mode != "passthrough",
                speculative=mode == "speculative",
                output_checks=mode != "input-only",
                threads=cfg.threads,
                workers=cfg.workers,
                concurrent_window=cfg.concurrent_window,
                speculative_window=cfg.speculative_window,
                window_max_ids=cfg.window_ids,
                early_exit=cfg.early_exit,
            )
            what = {"passthrough": "no checks", "input-only": "loading the guard model; input checks only"}.get(
                mode, "loading the guard model"
            )
            replicated = cfg.replicas > 1 and mode == self._length_mode()
            if replicated:
                # one conversation state for every replica: the same Redis, key prefix and HMAC secret
                shared = {
                    "url": cfg.redis_url,
                    "hmac_secret": secrets.token_hex(16),
                    "prefix": self.redis_prefix,
                    "ttl_seconds": 3600,
                }
                spec = dataclasses.replace(spec, state=shared)
            print(f"starting gateway '{mode}' ({what})...", file=self.progress.stream, flush=True)
            proc = await start_gateway(
                spec, self.workdir, upstream=upstream, model_dir=cfg.model_dir, policy=cfg.policy, capacity=cfg.capacity
            )
            self.procs.append(proc)
            self.gateways[mode] = proc
            self.targets.append(Target(mode, proc.base + "/v1/chat/completions", headers))
            for k in range(2, cfg.replicas + 1) if replicated else ():
                name = f"{mode}-r{k}"
                print(f"starting gateway '{name}' (replica {k} of '{mode}', Redis state)...", file=self.progress.stream)
                replica = await start_gateway(
                    dataclasses.replace(spec, name=name), self.workdir, upstream=upstream, model_dir=cfg.model_dir,
                    policy=cfg.policy, capacity=cfg.capacity,
                )  # fmt: skip
                self.procs.append(replica)
                self.replicas.append((Target(name, replica.base + "/v1/chat/completions", headers), replica))
        self.sampler = ProcessSampler({name: p.pid for name, p in self.gateways.items()})
        self.sampler.start()

    async def close(self) -> None:
        self.progress.end()
        try:
            if self.sampler is not None:
                await self.sampler.stop()
            for s in self.sessions.values():
                await s.close()
        finally:
            # every process at once (each waits for its own shutdown), whatever failed above
            await asyncio.gather(*(asyncio.to_thread(proc.stop) for proc in self.procs))
        if self.replicas:
            await self._drop_redis_keys()

    async def _check_redis(self) -> None:
        """Replicas without their shared Redis would each fall back to local state: refuse to measure that."""
        backend = RedisBackend(self.cfg.redis_url, prefix=self.redis_prefix)
        try:
            await backend.redis.ping()
        except (RedisError, OSError) as exc:
            raise BenchError(f"--replicas needs Redis at {self.cfg.redis_url} ({type(exc).__name__})") from None
        finally:
            await backend.aclose()

    async def _drop_redis_keys(self) -> None:
        """Remove the replicas' conversation state from Redis (it would expire within the hour anyway)."""
        backend = RedisBackend(self.cfg.redis_url, prefix=self.redis_prefix)
        try:
            await backend.drop_all()
        except StateBackendError as exc:
            self.notes.append(f"could not remove the replicas' Redis keys ({exc}); they expire in 1 h")
        finally:
            await backend.aclose()

    def session(self, target: str) -> aiohttp.ClientSession:
        s = self.sessions.get(target)
        if s is None:
            s = self.sessions[target] = client_session()
        return s

    def _ttft(self, ms: float | None) -> float | None:
        return ms if self.cfg.fake else None

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _phase(self, name: str, total: int | None) -> None:
        self.progress.phase(name, total)
        if self.sampler is not None:
            self.sampler.phase = name

    def _tick(self, s: Sample) -> None:
        self.progress.tick(s.ok)
        if self.sampler is not None:
            self.sampler.requests += 1

    async def _scrape_replicas(self) -> dict[str, Scrape]:
        return {t.name: await scrape(self.session(t.name), proc.base) for t, proc in self.replicas}

    async def _scrape_all(self) -> dict[str, Scrape]:
        out = {}
        for name, proc in self.gateways.items():
            scraped = await scrape(self.session(name), proc.base)
            out[name] = dataclasses.replace(scraped, cpu_s=cpu_seconds(proc.pid))
        return out

    async def _mixed(
        self,
        targets: Sequence[Target],
        concurrency: int,
        *,
        steps: int | None,
        seconds: float | None,
        ttft_ms: float | None,
        seed: int,
        fast: bool = False,
    ) -> tuple[list[Sample], float, int]:
        """The mix sent to every one of ``targets``: ``steps`` planned turns (None: as many as ``seconds`` allow),
        each sent to every target in turn, interleaved request by request (each step starts at the next target, so
        none is always first). The samples, the wall time, and the conversations a block or failure ended early."""
        plan = Plan(self.cfg.mix, seed, concurrency, steps)
        names = [t.name for t in targets]
        replays = [Replay(self.cfg.mix, names) for _ in range(concurrency)]

        async def job(w: int, k: int) -> list[Sample] | None:
            step = plan.step(w, k)
            if step is None:
                return None
            requests = replays[w].requests(step)
            first = (w + k) % len(targets)
            out = []
            for target in [*targets[first:], *targets[:first]]:
                planned = requests[target.name]
                sample, text = await send(
                    self.session(target.name),
                    target,
                    planned,
                    want_text=planned.conversation is not None,
                    ttft_ms=ttft_ms,
                    fast=fast and self.cfg.fake,
                )
                replays[w].settle(target.name, planned, sample, text)
                self._tick(sample)
                out.append(sample)
            return out

        samples, wall = await run_steps(job, concurrency=concurrency, seconds=seconds)
        return samples, wall, sum(r.ended for r in replays)

    # --- phases ---

    async def warmup(self) -> None:
        if self.cfg.warmup <= 0:
            return
        self._phase("warm-up", self.cfg.warmup * len(self.targets))
        samples, _, _ = await self._mixed(
            self.targets, 2, steps=self.cfg.warmup, seconds=max(self._left(), 0.0), ttft_ms=self._ttft(0),
            seed=self.cfg.seed + 7, fast=True,
        )  # fmt: skip
        if self._left() <= 0:
            self.notes.append(
                f"warm-up: stopped after {len(samples)} of {self.cfg.warmup * len(self.targets)} requests: "
                "--max-seconds reached"
            )
        _raise_if_dead("warm-up", samples, self.cfg)

    async def refuse(self) -> None:
        """``--refusals``: each guarded gateway blocks that many harmful asks, so its tenant has refusals in memory
        (as a busy shared key does: a conversation tracker then compares every new turn with them)."""
        if self.cfg.refusals <= 0:
            return
        guarded = [t for t in self.targets if t.name not in ("direct", "passthrough")]
        self._phase("refusals", None)
        for t in guarded:
            if self._left() <= 0:
                self.notes.append(f"refusals: stopped before {t.name}: --max-seconds reached")
                break
            blocked = await seed_refusals(
                self.session(t.name), t, self.cfg.refusals, model=self.cfg.mix.model, fake=self.cfg.fake,
                deadline=self.deadline,
            )  # fmt: skip
            self.notes.append(f"{t.name}: blocked {blocked} of {self.cfg.refusals} --refusals asks before the runs")

    async def latency(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows, stages = self.latency_rows, self.latency_stages
        every: list[Sample] = []
        for c in self.cfg.concurrency:
            if self._left() <= 0:
                self.notes.append(f"latency: stopped before concurrency {c}: --max-seconds reached")
                break
            self._phase(f"latency c={c}", self.cfg.requests * len(self.targets))
            before = await self._scrape_all()
            samples, wall, ended = await self._mixed(
                self.targets,
                c,
                steps=self.cfg.requests,
                seconds=self._left(),
                ttft_ms=self._ttft(self.cfg.ttft_ms),
                seed=self.cfg.seed + 1000 * c,
            )
            after = await self._scrape_all()
            if ended:
                self.notes.append(
                    f"latency c={c}: {ended} conversations ended early for every target after a turn that one of "
                    "them blocked or failed (so that every target still got the same turns)"
                )
            for t in self.targets:
                mine = [s for s in samples if s.target == t.name]
                row = {"concurrency": c, "target": t.name, **summarize(mine)}
                row["by_history"] = _by_history(mine)
                rows.append(row)
            for name in self.gateways:
                n = sum(s.target == name for s in samples)
                stages.append(
                    {
                        "phase": f"latency c={c}",
                        "gateway": name,
                        "requests": n,
                        "stages": [dataclasses.asdict(st) for st in stage_diff(before[name], after[name], n)],
                        "counters": counter_diff(before[name], after[name], "guardproxy_"),
                        "cpu_ms_per_request": cpu_ms_per_request(before[name], after[name], n),
                    }
                )
            _ = wall
            every += samples
        _raise_if_dead("latency", every, self.cfg)
        return rows, stages

    def _length_mode(self) -> str | None:
        """The gateway mode the conversation-length phase drives."""
        return next((m for m in ("guarded", "input-only", "speculative", "passthrough") if m in self.cfg.modes), None)

    def _length_target(self) -> Target | None:
        return next((t for t in self.targets if t.name == self._length_mode()), None)

    async def length(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        cfg = self.cfg
        target = self._length_target()
        if not cfg.lengths or target is None:
            return {}, None
        longest = max(cfg.lengths)
        spec = dataclasses.replace(cfg.mix, max_turns=longest + 1)
        per_turn: dict[int, list[float]] = {}
        single: list[float] = []
        # the gateway's own account of the same requests (Server-Timing "gateway"): without the client's encoding
        # and sending of a body that grows with the history, which the overhead above includes
        own_turn: dict[int, list[float]] = {}
        own_single: list[float] = []
        # (request N+1, its single-turn twin) per history length, for both measures
        pairs: dict[int, list[tuple[float, float]]] = {}
        own_pairs: dict[int, list[tuple[float, float]]] = {}
        # the stages whose work grows with the history a request carries (Server-Timing), per history length
        grows: dict[int, dict[str, list[float]]] = {}
        failed = blocked = twins_blocked = flagged = 0
        # --replicas: each conversation's requests go round robin over the replicas, and each twin where its
        # request went; one replica: all to the target
        replicas = [target, *(t for t, _ in self.replicas)]
        served = dict.fromkeys((t.name for t in replicas), 0)
        total = cfg.conversations * (longest + 1) * 2
        self._phase(f"conversation length 0..{longest}", total)
        before = await self._scrape_all()
        before_replicas = await self._scrape_replicas()
        if self.replicas:
            self.notes.append(
                f"conversation length: {len(replicas)} gateway processes share conversation state in Redis, each "
                "conversation's requests round robin over them; its stage row is the first replica's alone, the "
                "others' counters are in the JSON (length.replica_counters)."
            )
        for conv in range(cfg.conversations):
            mix = Mix(spec, cfg.seed + 50_000 + conv)
            for n in range(longest + 1):
                if self._left() <= 0:
                    break
                at = replicas[n % len(replicas)]
                session = self.session(at.name)
                planned = mix.next(target.name, stream=False, conversation=True)
                assert planned.history_turns == n
                served[at.name] += 2  # the request and its twin
                sample, text = await send(
                    session, at, planned, want_text=True, ttft_ms=self._ttft(cfg.length_ttft_ms), fast=cfg.fake
                )
                self._tick(sample)
                flagged += sample.flagged
                if not sample.ok or text is None:
                    blocked += sample.blocked
                    failed += not sample.blocked
                    break  # a conversation that lost a reply cannot go on as the same conversation
                # A blocked turn (a plain reply: this phase sends no streams) goes on with exactly what the client
                # received, the policy's reply, as a client holding it would; it has no overhead sample: it never
                # reached the upstream, or its reply was replaced.
                mix.settle(target.name, planned, text)
                if sample.blocked:
                    blocked += 1
                else:
                    if sample.overhead_ms is not None:
                        per_turn.setdefault(n, []).append(sample.overhead_ms)
                    if sample.gateway_ms is not None:
                        own_turn.setdefault(n, []).append(sample.gateway_ms)
                    _keep_history_stages(grows.setdefault(n, {}), sample)
                # the reference: the same new turn as a single-turn request (its twin), so each pair differs by
                # the history alone
                ref, _ = await send(
                    session,
                    at,
                    mix.twin(planned),
                    want_text=False,
                    ttft_ms=self._ttft(cfg.length_ttft_ms),
                    fast=cfg.fake,
                )
                self._tick(ref)
                twins_blocked += ref.blocked
                flagged += ref.flagged
                _keep_pair(single, pairs, n, sample.overhead_ms, ref.overhead_ms)
                _keep_pair(own_single, own_pairs, n, sample.gateway_ms, ref.gateway_ms)
        after = await self._scrape_all()
        after_replicas = await self._scrape_replicas()
        base = percentiles(single)
        points = []
        for n in sorted(per_turn):
            p = percentiles(per_turn[n])
            assert p is not None
            points.append(
                {
                    "history_turns": n,
                    "n": p.n,
                    "p50_ms": p.p50,
                    "mean_ms": p.mean,
                    "ratio_to_single": p.p50 / base.p50 if base is not None and base.p50 > 0 else None,
                    # this length's twins alone, and the median of each request's cost over its twin's (both measures)
                    "twin_p50_ms": statistics.median(b for _, b in pairs[n]) if pairs.get(n) else None,
                    "paired_ratio": _median_ratio(pairs.get(n, [])),
                    "gateway_paired_ratio": _median_ratio(own_pairs.get(n, [])),
                    # p50 of the gateway's own stage times that grow with the history (Server-Timing)
                    "stage_p50_ms": {name: statistics.median(v) for name, v in sorted(grows.get(n, {}).items())},
                }
            )
        result = {
            "target": target.name,
            "conversations": cfg.conversations,
            "longest": longest,
            "reported": sorted(cfg.lengths),
            "upstream_ttft_ms": cfg.length_ttft_ms if cfg.fake else None,
            "single_turn_ms": base.to_dict() if base is not None else None,
            "points": points,
            "tail_history_turns": [max(0, longest - 4), longest],
            **length_ratios(per_turn, single, longest, pairs=pairs),
            "failed_conversations": failed,
            "blocked_turns": blocked,
            "blocked_twins": twins_blocked,  # single-turn references blocked (no sample either)
            "flagged": flagged,  # requests of the phase, turns and twins, the gateway flagged
            **length_ratios(own_turn, own_single, longest, prefix="gateway_", pairs=own_pairs),
            "replicas": len(replicas),
            "redis_prefix": self.redis_prefix if self.replicas else None,
            "requests_per_replica": served,
            # the other replicas' /metrics counters over the phase (the stage table below is the first replica's)
            "replica_counters": {
                name: counter_diff(before_replicas[name], scraped, "guardproxy_")
                for name, scraped in after_replicas.items()
            },
        }
        n_req = served[target.name]
        stages = None
        if target.name in self.gateways:
            stages = {
                "phase": "conversation length",
                "gateway": target.name,
                "requests": n_req,
                "stages": [dataclasses.asdict(st) for st in stage_diff(before[target.name], after[target.name], n_req)],
                "counters": counter_diff(before[target.name], after[target.name], "guardproxy_"),
                "cpu_ms_per_request": cpu_ms_per_request(before[target.name], after[target.name], n_req),
            }
        return result, stages

    async def sweep_level(self, target: Target, c: int, seconds: float, *, seed: int) -> dict[str, Any]:
        """One throughput level: ``c`` workers for ``seconds`` against one target."""
        before = await self._scrape_all() if target.name in self.gateways else None
        samples, wall, _ = await self._mixed(
            [target], c, steps=None, seconds=seconds, ttft_ms=self._ttft(self.cfg.sweep_ttft_ms), seed=seed, fast=True
        )
        row: dict[str, Any] = {"concurrency": c, "target": target.name, "seconds": wall}
        ok = [s for s in samples if s.ok]
        allowed = [s for s in ok if s.measured]
        # req/s: every answered request, blocked ones too (as issue 7's reference counts them); allowed: without
        # the blocked ones, which skip the upstream call and the output check and so cost the gateway less
        row["throughput_rps"] = len(ok) / wall if wall > 0 else 0.0
        row["allowed_rps"] = len(allowed) / wall if wall > 0 else 0.0
        row["requests"] = len(samples)
        row["ok"] = len(ok)
        row["blocked"] = sum(s.blocked for s in samples)
        row["flagged"] = sum(s.flagged for s in samples)
        row["status_503"] = sum(s.status == 503 for s in samples)
        row["errors"] = len(samples) - len(ok) - row["status_503"]
        lat = percentiles(s.total_ms for s in allowed)  # answered, not blocked: as the latency phase's
        row["latency_ms"] = lat.to_dict() if lat is not None else None
        over = percentiles(s.overhead_ms for s in allowed if s.overhead_ms is not None)
        row["overhead_ms"] = over.to_dict() if over is not None else None
        if before is not None:
            after = await self._scrape_all()
            counters = counter_diff(before[target.name], after[target.name], "guardproxy_")
            row["cpu_ms_per_request"] = cpu_ms_per_request(before[target.name], after[target.name], len(samples))
            row["classifier_failures"] = sum(
                v for k, v in counters.items() if k.startswith("guardproxy_classifier_failures")
            )
            row["rejected"] = {
                k.split("reason=")[-1]: v for k, v in counters.items() if k.startswith("guardproxy_rejected_total")
            }
        proc = self.gateways.get(target.name)
        if proc is not None and self.sampler is not None:
            from guardproxy.benchmark.procs import rss_mib

            row["rss_mib"] = rss_mib(proc.pid)
        return row

    async def sweep(self) -> dict[str, Any]:
        cfg = self.cfg
        target = self._length_target()
        if target is None or cfg.sweep == ():
            return {}
        auto = cfg.sweep is None
        levels = list(cfg.sweep or _doubling(cfg.max_concurrency))
        rows: list[dict[str, Any]] = []
        grown = 0.0  # throughput of the last level that grew by more than 5%
        flat = 0
        saturated_at: int | None = None
        for c in levels:
            if self._left() < cfg.sweep_seconds:
                self.notes.append(f"sweep: stopped before concurrency {c}: --max-seconds reached")
                break
            self._phase(f"throughput c={c}", None)
            row = await self.sweep_level(target, c, cfg.sweep_seconds, seed=cfg.seed + 90_000 + c)
            rows.append(row)
            rps = row["throughput_rps"]
            if rps > grown * 1.05:
                grown, flat, saturated_at = rps, 0, c
            else:
                flat += 1
                if auto and flat >= 2:
                    break  # two levels past the best: throughput stopped growing, and we have seen beyond it
        if auto and rows and rows[-1]["concurrency"] < cfg.max_concurrency and self._left() >= cfg.sweep_seconds:
            # Far past saturation: what a burst of --max-concurrency clients gets (queueing, 503s at capacity,
            # guard timeouts that the policy's fail mode then decides).
            c = cfg.max_concurrency
            self._phase(f"throughput c={c} (overload)", None)
            row = await self.sweep_level(target, c, cfg.sweep_seconds, seed=cfg.seed + 90_000 + c)
            row["overload"] = True
            rows.append(row)
        return {
            "target": target.name,
            "ttft_ms": cfg.sweep_ttft_ms if cfg.fake else None,
            "levels": rows,
            "best_rps": max((r["throughput_rps"] for r in rows), default=0.0),
            "saturated_at": saturated_at,
            "auto": auto,
        }

    def rss(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        out: dict[str, Any] = {"interval_s": self.sampler.interval, "processes": {}}
        for name in self.gateways:
            mine = [s for s in self.sampler.samples if s.process == name]
            if not mine:
                continue
            after_warm = [s for s in mine if s.phase not in ("start", "warm-up")] or mine
            start, end = after_warm[0], mine[-1]
            out["processes"][name] = {
                "first_mib": mine[0].rss_mib,
                "after_warmup_mib": start.rss_mib,
                "max_mib": max(s.rss_mib for s in mine),
                "end_mib": end.rss_mib,
                "growth_after_warmup_pct": (end.rss_mib / start.rss_mib - 1.0) * 100.0 if start.rss_mib else None,
                "fds_start": start.fds,
                "fds_end": end.fds,
                "samples": [[round(s.t, 2), round(s.rss_mib, 2), s.fds, s.requests, s.phase] for s in mine],
            }
        return out


def _doubling(cap: int) -> list[int]:
    out, c = [], 1
    while c <= cap:
        out.append(c)
        c *= 2
    return out


def _by_history(samples: Sequence[Sample]) -> dict[str, Any]:
    """Overhead percentiles of single-turn requests and of new turns in conversations (where the window check
    runs too), plain and streams apart."""

    def p(stream: bool, conversation: bool) -> dict[str, float | int] | None:
        r = percentiles(
            s.overhead_ms
            for s in samples
            if s.stream is stream and (s.history_turns > 0) is conversation and s.overhead_ms is not None
        )
        return r.to_dict() if r is not None else None

    return {
        "plain_single_turn": p(False, False),
        "plain_conversation": p(False, True),
        "stream_single_turn": p(True, False),
        "stream_conversation": p(True, True),
    }


def _find(rows: Sequence[dict[str, Any]], c: int, target: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["concurrency"] == c and r["target"] == target), None)


def _n(row: dict[str, Any] | None, *keys: str) -> int | None:
    """The sample count of the percentiles at ``keys`` (0 where there are none; None without the row)."""
    obj: Any = row
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return int(obj["n"]) if isinstance(obj, dict) and "n" in obj else (0 if row is not None else None)


def _p50(row: dict[str, Any] | None, *keys: str) -> float | None:
    obj: Any = row
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return float(obj["p50"]) if isinstance(obj, dict) and "p50" in obj else None


def evaluate_targets(
    cfg: BenchConfig,
    latency: Sequence[dict[str, Any]],
    length: dict[str, Any],
    sweep: dict[str, Any],
) -> list[dict[str, Any]]:
    """Issue 7's targets against what this run measured (reported, never asserted). The RSS target belongs to
    the 100k-request soak (``bench/soak.py``); this run's RSS is in its own section.

    Each target says where its figure comes from (``source``: ``client``, ``server-timing`` or ``throughput``) and
    over how many samples (``n``; ``direct_n``: the reference's, for a difference with the direct rows or a ratio;
    ``few_samples``: under ``MIN_VERDICT_SAMPLES``, the verdict is indicative).
    With the FAKE upstream every request carries the upstream's own time, so the "added" figures are client-side
    (``client``). A real upstream sends no stamp: the client cannot take the upstream's time out of a request, so
    those figures are the gateway's own Server-Timing account (``server-timing``), which leaves out the client's and
    loopback's share and so reads lower than the client-side figure of a FAKE-upstream run for the same gateway;
    ``client_p50_difference`` then holds the difference of the client-side p50s (the upstream's jitter in it)."""
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float | None,
        limit: float,
        unit: str,
        how: str,
        *,
        source: str,
        n: int | None,
        direct_n: int | None = None,
        higher_is_better: bool = False,
        **extra: Any,
    ) -> None:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        fewest = min(x for x in (n, direct_n) if x is not None) if n is not None else None
        out.append(
            {"target": name, "value": value, "limit": limit, "unit": unit, "met": met, "how": how, "source": source,
             "n": n, "direct_n": direct_n, "few_samples": fewest is not None and fewest < MIN_VERDICT_SAMPLES,
             **extra}
        )  # fmt: skip

    stamped = any(r["plain"]["overhead_ms"] or r["stream"]["ttft_overhead_ms"] for r in latency)
    client_measure = {"ttft_overhead_ms": "ttft_ms", "overhead_ms": "total_ms"}

    def added(mode: str, *keys: str) -> dict[str, Any]:
        """The figure, its source and its sample counts (keys of ``add``)."""
        row, direct = _find(latency, 1, mode), _find(latency, 1, "direct")
        if not stamped:
            if keys[0] == "by_history":
                return {"value": None, "source": "server-timing", "n": None}
            g_client = _p50(row, keys[0], client_measure[keys[1]])
            d_client = _p50(direct, keys[0], client_measure[keys[1]])
            return {
                "value": _p50(row, keys[0], "gateway_ms"),
                "source": "server-timing",
                "n": _n(row, keys[0], "gateway_ms"),
                "client_p50_difference": g_client - d_client if g_client is not None and d_client is not None else None,
            }
        g, d = _p50(row, *keys), _p50(direct, *keys)
        return {
            "value": g - d if g is not None and d is not None else None,
            "source": "client",
            "n": _n(row, *keys),
            "direct_n": _n(direct, *keys),
        }

    how = "{} p50 minus the direct requests' p50 over the same planned requests (client and loopback share)"
    if not stamped:
        how = (
            "the gateway's own time outside the upstream, p50 of its Server-Timing header ({}: no upstream stamp "
            "from a real upstream, so not the client-side figure a FAKE-upstream run gives)"
        )
    # the input checks are the same in both modes; "input-only" stands in when "guarded" did not run
    main = "guarded" if _find(latency, 1, "guarded") is not None else "input-only"
    add(
        f"added to TTFT, c=1, input checks only ({main})",
        limit=10.0,
        unit="ms",
        how=how.format(f"{main} TTFT overhead") + "; a stream's first event waits for the input check only",
        **added(main, "stream", "ttft_overhead_ms"),
    )
    add(
        f"added to TTFT, c=1, single user turn: turn check only ({main})",
        limit=10.0,
        unit="ms",
        how=how.format(f"{main} TTFT overhead of streamed single-turn requests"),
        **added(main, "by_history", "stream_single_turn"),
    )
    add(
        f"added to TTFT, c=1, new turn of a conversation: turn + window check ({main})",
        limit=10.0,
        unit="ms",
        how=how.format(f"{main} TTFT overhead of streamed conversation turns"),
        **added(main, "by_history", "stream_conversation"),
    )
    add(
        "added latency, plain reply, c=1, input + output checks (guarded)",
        limit=10.0,
        unit="ms",
        how=how.format("guarded overhead to the last byte"),
        **added("guarded", "plain", "overhead_ms"),
    )
    if any(r["target"] == "speculative" for r in latency):
        note = "" if cfg.ttft_ms >= 50 or not cfg.fake else f" (upstream TTFT here is {cfg.ttft_ms:g} ms, not >= 50)"
        add(
            "added to TTFT, c=1, speculative forwarding",
            limit=1.0,
            unit="ms",
            how=how.format("speculative TTFT overhead") + note,
            **added("speculative", "stream", "ttft_overhead_ms"),
        )
    level16 = next((r for r in sweep.get("levels", []) if r["concurrency"] == 16), None)
    if level16 is not None:
        add(
            f"throughput at c=16 ({sweep.get('target')})",
            level16["throughput_rps"],
            5 * LITELLM_REFERENCE_RPS,
            "req/s",
            f"sweep level c=16; 5x LiteLLM's {LITELLM_REFERENCE_RPS:g} req/s (issue 7's reference)",
            source="throughput",
            n=level16.get("requests"),
            higher_is_better=True,
        )
    # a conversation of 0 turns has no history to cost: its "ratio" would compare single turns with single turns
    if length.get("longest"):
        _length_targets(add, length)
    return [t for t in out if t["value"] is not None]


def _length_targets(add: Any, length: dict[str, Any]) -> None:
    lo, hi = length["tail_history_turns"]
    longest = length["longest"]
    g = length.get
    tail_n, single_n, second_n = g("tail_n"), g("single_turn_n"), g("second_turn_n")
    if length.get("ratio_at_longest") is not None:
        add(
            f"request N+1 of a {longest}-turn conversation / single turn",
            length["ratio_at_longest"],
            1.2,
            "x",
            f"p50 overhead at history {lo}..{hi} over the p50 of the interleaved single-turn twins (each the same new "
            "turn without its history)",
            source="client",
            n=tail_n,
            direct_n=single_n,
        )
    if length.get("paired_ratio_at_longest") is not None:
        add(
            f"request N+1 of a {longest}-turn conversation / the same turn alone, per pair",
            length["paired_ratio_at_longest"],
            1.2,
            "x",
            f"median over the {length['paired_n']} requests at history {lo}..{hi} of each one's overhead over its "
            "single-turn twin's",
            source="client",
            n=length["paired_n"],
        )
    if length.get("ratio_to_second_turn") is not None:
        add(
            f"request N+1 of a {longest}-turn conversation / the second turn",
            length["ratio_to_second_turn"],
            1.2,
            "x",
            "the same over the p50 of request 2 (history 1: the first request with a window check)",
            source="client",
            n=tail_n,
            direct_n=second_n,
        )
    if length.get("gateway_ratio_at_longest") is not None:
        add(
            f"request N+1 of a {longest}-turn conversation / single turn, the gateway's own time",
            length["gateway_ratio_at_longest"],
            1.2,
            "x",
            "the same from the gateway's Server-Timing 'gateway' (its time outside the upstream), without the "
            "client's encoding and sending of the longer body",
            source="server-timing",
            n=g("gateway_tail_n"),
            direct_n=g("gateway_single_turn_n"),
        )
    if length.get("gateway_paired_ratio_at_longest") is not None:
        add(
            f"request N+1 of a {longest}-turn conversation / the same turn alone, per pair, the gateway's own time",
            length["gateway_paired_ratio_at_longest"],
            1.2,
            "x",
            "the per-pair median from the gateway's Server-Timing 'gateway'",
            source="server-timing",
            n=g("gateway_paired_n"),
        )


def _keep_pair(
    single: list[float], pairs: dict[int, list[tuple[float, float]]], n: int, turn: float | None, twin: float | None
) -> None:
    """A twin's measure as a single-turn reference, and (its request's, its own) as a pair at history ``n``."""
    if twin is None:
        return
    single.append(twin)
    if turn is not None:
        pairs.setdefault(n, []).append((turn, twin))


def _keep_history_stages(into: dict[str, list[float]], sample: Sample) -> None:
    for name, ms in sample.server_timing:
        if name in HISTORY_STAGES:
            into.setdefault(name, []).append(ms)


def _median_ratio(pairs: Sequence[tuple[float, float]]) -> float | None:
    ratios = [a / b for a, b in pairs if b > 0]
    return statistics.median(ratios) if ratios else None


def length_ratios(
    per_turn: dict[int, list[float]],
    single: list[float],
    longest: int,
    *,
    prefix: str = "",
    pairs: dict[int, list[tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """The length phase's summary of one measure (keys with ``prefix``; "gateway_": the gateway's own Server-Timing
    time): p50 of the single-turn references, of the second turn and of the long end (the last five lengths, since
    one request per conversation per length is noisy), and the long end's ratios to both; None where missing. A
    single turn has no window to score; from the second turn on every request may, so the ratio to the second turn
    shows whether cost grows with the history. ``pairs``: (request, its single-turn twin) per length; the median of
    the long end's per-pair ratios (``paired_ratio_at_longest``) compares each request with the same ask made
    without its history, which a ratio of two p50s over a cost that is bimodal (a turn exits early or runs the whole
    model) cannot."""
    tail_lengths = range(max(0, longest - 4), longest + 1)
    tail = percentiles(v for n in tail_lengths for v in per_turn.get(n, []))
    base, second = percentiles(single), percentiles(per_turn.get(1, []))
    paired = percentiles(a / b for n in tail_lengths for a, b in (pairs or {}).get(n, []) if b > 0)

    def ratio(a: Any, b: Any) -> float | None:
        return a.p50 / b.p50 if a is not None and b is not None and b.p50 > 0 else None

    return {
        f"{prefix}single_turn_p50_ms": base.p50 if base is not None else None,
        f"{prefix}second_turn_p50_ms": second.p50 if second is not None else None,
        f"{prefix}tail_p50_ms": tail.p50 if tail is not None else None,
        f"{prefix}ratio_at_longest": ratio(tail, base),
        f"{prefix}ratio_to_second_turn": ratio(tail, second),
        f"{prefix}paired_ratio_at_longest": paired.p50 if paired is not None else None,
        f"{prefix}paired_n": paired.n if paired is not None else 0,
        # the sample counts under the p50s above
        f"{prefix}single_turn_n": base.n if base is not None else 0,
        f"{prefix}second_turn_n": second.n if second is not None else 0,
        f"{prefix}tail_n": tail.n if tail is not None else 0,
    }


class _Stop:
    """SIGINT, SIGTERM and SIGHUP while a bench runs. The first cancels the run, whose cleanup then stops every
    process the bench started and removes its temp folder; a signal during that cleanup (a second Ctrl-C) kills
    those processes at once rather than interrupt it, so that none is left running with its port bound."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.signum: int | None = None
        self.cleaning = False
        self._installed: list[int] = []
        self.keep = live_children()  # a caller's own processes, started before the bench: not the bench's to kill

    def kill(self) -> None:
        kill_children(keep=self.keep)

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not on this platform
                continue
            self._installed.append(sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.signum is None and not self.cleaning and self.task is not None:
            self.signum = sig
            print(f"guardproxy bench: {name}: stopping the processes it started...", file=sys.stderr, flush=True)
            self.task.cancel()
            return
        self.signum = self.signum or sig
        print(f"guardproxy bench: {name}: killing the processes it started now", file=sys.stderr, flush=True)
        self.kill()

    def raise_for_signal(self) -> None:
        """After the cleanup: exit as the signal asks (Ctrl-C as KeyboardInterrupt, the others 128 + its number)."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise SystemExit(128 + self.signum)


def _status_counts(samples: Sequence[Sample]) -> str:
    counts: dict[str, int] = {}
    for s in samples:
        key = status_key(s)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))


class NothingMeasured(BenchError):
    """A target none of whose requests was answered (or blocked): the run stops. ``report``: ``failure_report``."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# distinct error messages a failure report keeps per target
FAILURE_EXAMPLES = 3


def _raise_if_dead(phase: str, samples: Sequence[Sample], cfg: BenchConfig) -> None:
    """A target none of whose requests was answered (or blocked) measured nothing: stop with what it got."""
    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.target, []).append(s)
    dead = {name: mine for name, mine in by.items() if not any(s.ok or s.blocked for s in mine)}
    if not dead:
        return
    seen = "; ".join(f"{name}: {_status_counts(mine)}" for name, mine in dead.items())
    what = "every request failed" if len(dead) == len(by) else f"every request to {', '.join(dead)} failed"
    checks = failure_checks(samples, cfg)
    message = f"{phase}: {what} ({seen}); {checks[0]}"
    raise NothingMeasured(message, failure_report(phase, message, by, checks))


def failure_report(phase: str, message: str, by: dict[str, list[Sample]], checks: list[str]) -> dict[str, Any]:
    """The ``failure`` of a result: per target, its requests, failures, statuses and first distinct errors."""
    targets = {}
    for name, mine in by.items():
        statuses: dict[str, int] = {}
        errors: list[str] = []
        for s in mine:
            statuses[status_key(s)] = statuses.get(status_key(s), 0) + 1
            if s.failed:
                error = f"{status_key(s)}: {s.detail}" if s.detail else status_key(s)
                if error not in errors and len(errors) < FAILURE_EXAMPLES:
                    errors.append(error)
        targets[name] = {
            "requests": len(mine),
            "failed": sum(s.failed for s in mine),
            "statuses": statuses,
            "errors": errors,
        }
    return {"phase": phase, "message": message, "targets": targets, "checks": checks}


def failure_checks(samples: Sequence[Sample], cfg: BenchConfig) -> list[str]:
    """What to check, from the statuses the failed requests got, most telling first."""
    if cfg.fake:
        return ["run with --workdir DIR to keep the gateways' logs, and read them"]
    statuses = {s.status for s in samples if s.failed}
    key = f"${cfg.api_key_env}"
    out = []
    if statuses & {401, 403}:
        out.append(
            f"the upstream refused the key (401/403): check that {key} holds a key this upstream accepts "
            "(--api-key-env names another variable)"
            if cfg.api_key is not None
            else f"the upstream wants a key (401/403) and none was sent: {key} is not set (--api-key-env names another "
            "variable)"
        )
    if 404 in statuses:
        out.append(
            "the upstream has no such route or model (404): check --upstream (the base URL, ending where "
            "/chat/completions follows, e.g. https://host/v1) and --upstream-model"
        )
    if statuses & {400, 422}:
        out.append("the upstream refused the request (400/422): check --upstream-model and --max-tokens")
    if 429 in statuses:
        out.append("the upstream limits the rate or the quota (429): lower --concurrency and --requests, or the plan")
    if 0 in statuses or statuses & {502, 503, 504}:
        out.append(
            "nothing answered at --upstream, or not in time (no connection, 502/503/504): check the host, port and "
            "scheme, and that the upstream runs"
        )
    out.append(f"check --upstream, --upstream-model and the key ({key}, --api-key-env)")
    return out


def _block_note(latency: Sequence[dict[str, Any]], length: dict[str, Any], sweep: dict[str, Any]) -> str | None:
    """What the guard blocked and flagged of the bench's own (benign) requests, by phase; None if nothing."""
    gateways = [r for r in latency if r["target"] != "direct"]
    parts = []
    phases = (
        ("latency", sum(r["blocked"] for r in gateways), sum(r["flagged"] for r in gateways),
         sum(r["requests"] for r in gateways)),
        ("conversation length", length.get("blocked_turns", 0) + length.get("blocked_twins", 0),
         length.get("flagged", 0), sum((length.get("requests_per_replica") or {}).values())),
        ("sweep", sum(r.get("blocked", 0) for r in sweep.get("levels", [])),
         sum(r.get("flagged", 0) for r in sweep.get("levels", [])),
         sum(r["requests"] for r in sweep.get("levels", []))),
    )  # fmt: skip
    blocked = flagged = total = 0
    for name, b, f, n in phases:
        blocked, flagged, total = blocked + b, flagged + f, total + n
        if b or f:
            parts.append(f"{name} {b} blocked, {f} flagged of {n}")
    if not parts:
        return None
    share = f" ({100 * blocked / total:.1f}%)" if total else ""
    return (
        f"the guard blocked {blocked}{share} and flagged {flagged} of the bench's {total} benign requests through "
        f"gateways ({'; '.join(parts)}). Every bench text is harmless: each block is a false positive of the model "
        "or the policy, or follows one (a refusal in the tenant's memory makes later asks read as rephrasings of it)."
        + (" Is the model right?" if total and blocked / total > 0.05 else "")
        + " A blocked request has no latency sample. --workdir DIR keeps the gateways' drill stores, which "
        "record each decision."
    )


async def run_bench(cfg: BenchConfig) -> BenchResult:
    machine = machine_info()
    bench = Bench(cfg)  # validates the configuration before anything starts (and makes the temp folder after)
    stop = _Stop(asyncio.current_task())
    failure: dict[str, Any] | None = None
    try:
        stop.install()
        try:
            await bench.start()
            await bench.warmup()
            await bench.refuse()
            latency, stages = await bench.latency()
            length, length_stages = await bench.length()
            if length_stages is not None:
                stages.append(length_stages)
            sweep = await bench.sweep()
        except NothingMeasured as exc:
            failure = exc.report  # reported with what was measured before it
            latency, stages, length, sweep = bench.latency_rows, bench.latency_stages, {}, {}
        except asyncio.CancelledError:
            if stop.signum is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
    finally:
        stop.cleaning = True
        try:
            await bench.close()
        finally:
            stop.kill()  # any the cleanup missed, or started but not yet registered (a gateway still loading)
            stop.uninstall()
            if cfg.workdir is None:
                # configs with HMAC secrets, logs and drill stores: nothing of a temp folder outlives the run
                shutil.rmtree(bench.workdir, ignore_errors=True)
    stop.raise_for_signal()
    with contextlib.suppress(OSError, AttributeError):
        machine["loadavg_at_end"] = os.getloadavg()
    rss = bench.rss()
    config = cfg.public()
    config["workdir"] = str(cfg.workdir) if cfg.workdir is not None else None
    if failure is not None:
        return BenchResult(machine, config, latency, stages, length, sweep, rss, [], bench.notes, failure)
    source = "FAKE upstream" if cfg.fake else "the upstream's time included, since a real upstream sends no stamp"
    notes = bench.notes + [
        "overhead = the client's time for a request minus the upstream's own stamp for the same request "
        "(plain: to the last byte; streams: to the first SSE event); the 'direct' rows are the client and "
        "loopback share of it, so 'added' = gateway minus direct."
        if cfg.fake
        else "with a real upstream there is no per-request upstream stamp, so no client-side overhead: the "
        "gateway's figures are its own Server-Timing 'gateway' (its time outside the upstream, measured inside "
        "it); client-side latency (" + source + ") is in its own table.",
        f"all processes (client, {'FAKE upstream, ' if cfg.fake else ''}gateways) share this machine's cores; "
        "load from other jobs shows in loadavg.",
    ]
    targets = evaluate_targets(cfg, latency, length, sweep)
    if any(t["source"] == "server-timing" and not t["target"].startswith("request N+1") for t in targets):
        notes.append(
            "targets from the gateway's Server-Timing (the 'from' column): a real upstream sends no per-request "
            "stamp, so these leave out the client's and loopback's share and read lower than the client-side "
            "figures of a FAKE-upstream run; client_p50_difference in the JSON is the difference of the client-side "
            "p50s, the upstream's jitter in it."
        )
    if any(t["few_samples"] for t in targets):
        notes.append(
            f"targets marked 'few samples' rest on fewer than {MIN_VERDICT_SAMPLES} requests (the 'n' column): "
            "their verdicts are indicative only; raise --requests."
        )
    blocks = _block_note(latency, length, sweep)
    if blocks is not None:
        notes.insert(0, blocks)
    return BenchResult(machine, config, latency, stages, length, sweep, rss, targets, notes)
