"""The processes a bench drives, all on loopback: the FAKE upstream and the gateway(s).

Each gateway is a real ``guardproxy serve`` in its own process (the production entry point: uvicorn, the real
guard, the default policy), configured by a TOML file the bench writes into its work directory. The child gets
none of the caller's ``GUARDPROXY_*`` variables, so a stray environment setting cannot change what is measured;
everything it runs with is in that file, and the file is reported.

``ProcessSampler`` reads RSS and open file descriptors from ``/proc`` (Linux) for the processes it watches.

Every child ``spawn`` starts is kept in a registry until it is stopped: ``kill_children`` kills those still
running (a bench stopped by a signal, or one whose cleanup was interrupted), and runs at interpreter exit too, so
that no child is left behind holding its port.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp

from guardproxy.errors import ConfigError, GuardProxyError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class BenchError(GuardProxyError):
    """A bench process did not start, or the bench was configured beyond its caps."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class Proc:
    """One child process and where it listens."""

    name: str
    base: str  # http://127.0.0.1:PORT
    popen: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path | None = None
    _log: TextIO | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        _children.pop(self.pid, None)
        if self._log is not None:
            self._log.close()
            self._log = None


# pid -> every child spawned and not yet stopped (see kill_children)
_children: dict[int, Proc] = {}


def live_children() -> frozenset[int]:
    """The pids of the children ``spawn`` started and nobody stopped yet."""
    return frozenset(_children)


def kill_children(keep: Collection[int] = ()) -> None:
    """SIGKILL every child ``spawn`` started that is still running (but those in ``keep``: a caller's own, started
    before), and reap it: the last resort of an interrupted cleanup (a child killed so frees its port at once). Safe
    to call from a signal handler of the event loop, and at any time: it only touches this process's own children."""
    for proc in list(_children.values()):
        if proc.pid in keep:
            continue
        if proc.popen.poll() is None:
            with contextlib.suppress(OSError):
                proc.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
        if proc.popen.poll() is not None:
            _children.pop(proc.pid, None)


atexit.register(kill_children)


def spawn(
    name: str,
    argv: list[str],
    workdir: Path,
    port: int,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Proc:
    """Start ``argv`` with its output in ``workdir/<name>.log``; ``env`` defaults to ours minus ``GUARDPROXY_*``."""
    log_path = workdir / f"{name}.log"
    log = log_path.open("w")
    popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env) if env else _child_env())
    proc = Proc(name, f"http://{LOOPBACK}:{port}", popen, log_path, config_path, log)
    _children[proc.pid] = proc
    return proc


async def wait_ready(proc: Proc, path: str, within: float) -> None:
    """Poll ``path`` until it answers 200; raise with the process's log tail if it exits or times out."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            try:
                async with session.get(proc.base + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name} not ready after {within:.0f} s:\n{proc.log_tail()}")
            await asyncio.sleep(0.1)


async def start_fake_upstream(workdir: Path, *, ttft_ms: float, tokens_per_s: float, reply_words: int) -> Proc:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "guardproxy.benchmark.upstream",
        "--port",
        str(port),
        "--ttft-ms",
        str(ttft_ms),
        "--tokens-per-s",
        str(tokens_per_s),
        "--reply-words",
        str(reply_words),
    ]
    proc = spawn("fake-upstream", argv, workdir, port)
    try:
        await wait_ready(proc, "/v1/models", 30.0)
    except BaseException:
        await asyncio.to_thread(proc.stop)  # off the loop: a signal handler can still run (and kill it at once)
        raise
    return proc


@dataclass(frozen=True)
class GatewaySpec:
    """One gateway to start: its name in the report and what it runs with."""

    name: str  # guarded | input-only | speculative | passthrough
    guard: bool = True
    speculative: bool = False
    output_checks: bool = True  # guard.output_checks (false: the "input-only" mode)
    max_conversations: int | None = None  # state.max_conversations (None: the default)
    threads: int | None = None  # guard.threads (None: the default)
    workers: int | None = None  # guard.workers (None: the default)
    concurrent_window: bool = False  # guard.concurrent_window
    speculative_window: bool = False  # guard.speculative_window (ignored by a speculative gateway)
    window_max_ids: int | None = None  # guard.window_max_ids (None: the default)
    early_exit: bool | Literal["auto"] = "auto"  # guard.early_exit (auto: the gateway's default)
    state: Mapping[str, Any] | None = None  # the state section's settings over the default (memory://, own key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def gateway_config(
    spec: GatewaySpec,
    *,
    port: int,
    upstream: str,
    workdir: Path,
    model_dir: Path | None,
    policy: Path | None,
    capacity: int,
) -> dict[str, dict[str, Any]]:
    """The settings sections a bench gateway runs with (written as TOML; no secrets but a random HMAC key)."""
    cfg: dict[str, dict[str, Any]] = {
        "server": {
            "host": LOOPBACK,
            "port": port,
            "log_level": "warning",
            "max_concurrent_requests": capacity,
            "shutdown_timeout": 2.0,
        },
        "upstream": {"base_url": upstream},
        "guard": {"enabled": spec.guard, "speculative": spec.speculative},
        "state": {"url": "memory://", "hmac_secret": secrets.token_hex(16)},
        "drills": {"store": f"sqlite:///{workdir / (spec.name + '-drills.db')}"},
    }
    if spec.state is not None:
        cfg["state"].update(spec.state)
    if spec.max_conversations is not None:
        cfg["state"]["max_conversations"] = spec.max_conversations
    if spec.threads is not None:
        cfg["guard"]["threads"] = spec.threads
    if spec.workers is not None:
        cfg["guard"]["workers"] = spec.workers
    if spec.concurrent_window:
        cfg["guard"]["concurrent_window"] = True
    if spec.speculative_window:
        cfg["guard"]["speculative_window"] = True
    cfg["guard"]["early_exit"] = spec.early_exit
    if not spec.output_checks:
        cfg["guard"]["output_checks"] = False
    if spec.window_max_ids is not None:
        cfg["guard"]["window_max_ids"] = spec.window_max_ids
    if model_dir is not None:
        cfg["guard"]["model_dir"] = str(model_dir)
    if policy is not None:
        cfg["policy"] = {"active": str(policy)}
    return cfg


def write_toml(path: Path, cfg: Mapping[str, Mapping[str, Any]]) -> None:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


async def start_gateway(
    spec: GatewaySpec,
    workdir: Path,
    *,
    upstream: str,
    model_dir: Path | None,
    policy: Path | None,
    capacity: int,
    within: float = 180.0,
) -> Proc:
    """``guardproxy serve --config <file>`` in its own process; returns once ``/readyz`` answers 200."""
    if model_dir is not None and spec.guard and not (model_dir / "model.onnx").is_file():
        raise ConfigError("no guard model here (model.onnx missing)", where=str(model_dir))
    port = free_port()
    config_path = workdir / f"{spec.name}.toml"
    write_toml(
        config_path,
        gateway_config(
            spec, port=port, upstream=upstream, workdir=workdir, model_dir=model_dir, policy=policy, capacity=capacity
        ),
    )
    argv = [sys.executable, "-m", "guardproxy.cli", "serve", "--config", str(config_path)]
    proc = spawn(spec.name, argv, workdir, port, config_path)
    try:
        await wait_ready(proc, "/readyz", within)
    except BaseException:
        await asyncio.to_thread(proc.stop)  # off the loop: a signal handler can still run (and kill it at once)
        raise
    return proc


# --- RSS and descriptors -------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB, from /proc (None where /proc is not there)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far, from /proc/<pid>/stat (None where /proc is not there).

    Per request, it does not depend on what else the machine runs, unlike latency on a shared machine."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may contain spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14 and 15 of the line


def tree_cpu_seconds(pid: int) -> float | None:
    """``cpu_seconds`` of ``pid`` and every live descendant (a server that forks workers)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for child in entries:
        try:
            with open(f"/proc/{child}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        cpu = cpu_seconds(p)
        if cpu is None and p == pid:
            return None
        total += cpu or 0.0
        todo.extend(children.get(p, []))
    return total


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass(frozen=True)
class ProcSample:
    t: float  # seconds since the sampler started
    process: str
    rss_mib: float
    fds: int | None
    phase: str
    requests: int  # requests the bench had completed when sampled


class ProcessSampler:
    """Samples RSS and open fds of named processes every ``interval`` seconds while running."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.5) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.samples: list[ProcSample] = []
        self.phase = "start"
        self.requests = 0  # the load driver bumps this
        self._t0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        for name, pid in self.pids.items():
            rss = rss_mib(pid)
            if rss is not None:
                self.samples.append(ProcSample(now, name, rss, open_fds(pid), self.phase, self.requests))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.sample()
