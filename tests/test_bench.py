"""``guardproxy bench``: it runs end to end on a tiny configuration and its numbers are internally consistent.

Numbers never gate these tests (no latency or throughput bound is asserted): only that every section is there,
that counts add up, that percentiles are ordered, that the charts are written, and that a real upstream's key is
used but never shown. The bench starts real processes (the FAKE upstream, two gateways with the guard model) on
loopback, as a user's run does.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from guardproxy.benchmark.load import (
    Mix,
    MixSpec,
    Plan,
    Planned,
    Replay,
    Sample,
    Scrape,
    Step,
    Target,
    client_session,
    percentiles,
    send,
    stage_diff,
    summarize,
    user_turn,
)
from guardproxy.benchmark.procs import BenchError, GatewaySpec, gateway_config
from guardproxy.benchmark.run import Bench, BenchConfig, evaluate_targets, public_url
from guardproxy.benchmark.upstream import STAMP_HEADER, TTFT_HEADER, build
from guardproxy.fake_upstream import FakeUpstream
from guardproxy.settings import PROJECT_ROOT, Settings
from tests.servers import free_port, serve

MONITOR = PROJECT_ROOT / "policies" / "monitor.toml"  # never blocks: every request reaches the upstream
SECTIONS = {"machine", "config", "latency", "stages", "length", "sweep", "rss", "targets", "notes"}
TINY = ["--concurrency", "1,2", "--requests", "10", "--warmup", "2", "--ttft-ms", "5", "--tokens-per-s", "0",
        "--sweep", "1,2", "--sweep-seconds", "0.5", "--lengths", "0,1,3", "--conversations", "2",
        "--length-ttft-ms", "30"]  # fmt: skip


def _bench(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
        env=env,
    )


@dataclass(frozen=True)
class Run:
    proc: subprocess.CompletedProcess[str]
    result: dict[str, Any]
    png: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("bench")
    proc = _bench(["--fake-upstream", *TINY, "--policy", str(MONITOR), "--json", str(tmp / "b.json"),
                   "--png", str(tmp / "png"), "--workdir", str(tmp / "work"), "--threads", "1",
                   "--quiet"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    yield Run(proc, json.loads((tmp / "b.json").read_text()), tmp / "png")


def _ordered(p: dict[str, Any] | None) -> None:
    if p is None:
        return
    assert p["n"] > 0
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["max"]


def test_every_section_is_in_the_json_and_the_terminal_report(tiny: Run) -> None:
    assert set(tiny.result) == SECTIONS
    for heading in ("Overhead per request", "Gateway stages", "Cost against conversation length",
                    "Throughput sweep", "Gateway RSS", "Issue 7 targets"):  # fmt: skip
        assert heading in tiny.proc.stdout
    assert tiny.result["config"]["api_key_set"] is False
    # the thread settings reach the gateways' config files and the report says which ran
    assert tiny.result["config"]["threads"] == 1 and "guard threads: 1" in tiny.proc.stdout
    configs = [c for c in (tiny.png.parent / "work").glob("*.toml") if c.stem in ("guarded", "speculative")]
    assert configs and all("threads = 1" in c.read_text() for c in configs)
    # without --early-exit/--no-early-exit the gateways run the gateway's default, and the report says so
    assert tiny.result["config"]["early_exit"] == "auto" and "early exit auto" in tiny.proc.stdout
    assert all('early_exit = "auto"' in c.read_text() for c in configs)
    assert "exited" in tiny.proc.stdout.split("Gateway stages")[1].splitlines()[1]


def test_latency_counts_add_up_and_percentiles_are_ordered(tiny: Run) -> None:
    rows = tiny.result["latency"]
    assert {(r["concurrency"], r["target"]) for r in rows} == {
        (c, t) for c in (1, 2) for t in ("direct", "guarded", "speculative")
    }
    for r in rows:
        assert r["requests"] == 10
        assert sum(r["statuses"].values()) == r["requests"]
        assert r["plain"]["n"] + r["stream"]["n"] == r["requests"]
        assert r["ok"] == r["requests"], r["statuses"]  # FAKE upstream, monitor policy: nothing fails or blocks
        assert r["blocked"] == 0
        for p in (r["plain"]["overhead_ms"], r["plain"]["total_ms"], r["stream"]["ttft_overhead_ms"],
                  r["stream"]["ttft_ms"], r["stream"]["total_ms"]):  # fmt: skip
            _ordered(p)
        # every ok request carried the upstream's stamp, so every one has an overhead sample
        assert (r["plain"]["overhead_ms"] or {"n": 0})["n"] == r["plain"]["n"]
        assert (r["stream"]["ttft_overhead_ms"] or {"n": 0})["n"] == r["stream"]["n"]
        if r["plain"]["total_ms"] is not None:
            assert r["plain"]["overhead_ms"]["p50"] <= r["plain"]["total_ms"]["p50"]
        # the gateway's own per-request account (Server-Timing) comes with every request through it, never direct
        own = [x for x in (r["plain"]["gateway_ms"], r["stream"]["gateway_ms"]) if x is not None]
        assert sum(x["n"] for x in own) == (0 if r["target"] == "direct" else r["requests"])
        # (the monitor policy may flag a request: the model's verdict, not the bench's; flags are counted apart)
        assert r["failed"] == r["blocked_in_stream"] == 0 and r["measured"] == r["requests"]
    # every target got the same planned requests: as many plain and streamed, single turns and conversation turns
    for c in (1, 2):
        level = [r for r in rows if r["concurrency"] == c]
        shapes = {
            (r["plain"]["n"], r["stream"]["n"], *((p or {"n": 0})["n"] for p in r["by_history"].values()))
            for r in level
        }
        assert len(shapes) == 1, shapes
    # the terminal says what the percentiles are over, and shows blocks and flags
    table = tiny.proc.stdout.split("Overhead per request")[1]
    assert "flagged" in table.splitlines()[1] and "plain n, stream n: the requests each row's percentiles" in table


def test_stage_breakdown_covers_every_gateway_request(tiny: Run) -> None:
    stages = tiny.result["stages"]
    phases = {(s["phase"], s["gateway"]) for s in stages}
    assert {("latency c=1", "guarded"), ("latency c=2", "speculative"), ("conversation length", "guarded")} <= phases
    for s in stages:
        by = {st["stage"]: st for st in s["stages"]}
        assert by["parse"]["count"] == s["requests"]  # one parse per guarded request
        assert by["input_check"]["count"] == s["requests"]
        # the tracker's lookup, timed inside "state" (which also holds the inference): once per request
        assert by["state_lookup"]["count"] == s["requests"] and by["state_store"]["count"] >= s["requests"]
        assert by["state_lookup"]["mean_ms"] <= by["state"]["mean_ms"]
        for st in s["stages"]:
            assert st["mean_ms"] >= 0 and st["per_request_ms"] >= 0


def test_conversation_length_phase_records_every_step(tiny: Run) -> None:
    length = tiny.result["length"]
    assert length["failed_conversations"] == 0 and length["blocked_turns"] == 0
    assert [p["history_turns"] for p in length["points"]] == [0, 1, 2, 3]
    assert all(p["n"] == 2 for p in length["points"])
    assert length["single_turn_ms"]["n"] == 8  # one interleaved single-turn request per step
    assert length["ratio_at_longest"] > 0
    assert length["ratio_at_longest"] == pytest.approx(length["tail_p50_ms"] / length["single_turn_ms"]["p50"])
    assert length["single_turn_p50_ms"] == length["single_turn_ms"]["p50"]
    # the gateway's own account of the same requests: less than the client's overhead, whose ratio it mirrors
    assert 0 < length["gateway_tail_p50_ms"] <= length["tail_p50_ms"]
    assert length["gateway_ratio_at_longest"] == pytest.approx(
        length["gateway_tail_p50_ms"] / length["gateway_single_turn_p50_ms"]
    )
    # every request of the tail (history 0..3 here: the last five lengths) was paired with its single-turn twin
    assert length["paired_n"] == length["gateway_paired_n"] == 8
    assert length["paired_ratio_at_longest"] > 0 and length["gateway_paired_ratio_at_longest"] > 0
    assert all(p["paired_ratio"] > 0 and p["gateway_paired_ratio"] > 0 for p in length["points"])
    # per length, the p50 of the gateway's own times in the two stages that grow with the history
    for p in length["points"]:
        assert set(p["stage_p50_ms"]) == {"parse", "state_lookup"}
        assert all(0 <= ms for ms in p["stage_p50_ms"].values())
    assert "state_lookup p50" in tiny.proc.stdout.split("Cost against conversation length")[1]
    # the phase's FAKE upstream waited the asked TTFT before its headers, as the gateway's own stage times show
    assert length["upstream_ttft_ms"] == 30
    phase = next(s for s in tiny.result["stages"] if s["phase"] == "conversation length")
    assert next(st for st in phase["stages"] if st["stage"] == "upstream")["p50_ms"] >= 30


def test_sweep_and_rss(tiny: Run) -> None:
    levels = tiny.result["sweep"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["ok"] + lv["status_503"] + lv["errors"] == lv["requests"]
        assert lv["throughput_rps"] > 0
        assert lv["blocked"] == 0 and lv["allowed_rps"] == lv["throughput_rps"]  # the monitor policy never blocks
        _ordered(lv["latency_ms"])
    assert tiny.result["sweep"]["best_rps"] == max(lv["throughput_rps"] for lv in levels)
    procs = tiny.result["rss"]["processes"]
    assert set(procs) == {"guarded", "speculative"}
    for r in procs.values():
        assert 0 < r["first_mib"] <= r["max_mib"] and r["end_mib"] <= r["max_mib"]
        assert r["fds_end"] > 0
        assert len(r["samples"]) >= 2


def test_charts_are_written(tiny: Run) -> None:
    for name in ("latency.png", "length.png", "sweep.png", "rss.png"):
        data = (tiny.png / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


async def test_a_real_upstream_gets_the_key_and_nothing_shows_it(tmp_path: Path) -> None:
    canary = "sk-bench-canary-7c1d2e9f00aa"
    fake = FakeUpstream()
    env = {**os.environ, "GP_BENCH_TEST_KEY": canary}
    async with serve(fake) as base:
        args = ["--upstream", base + "/v1", "--upstream-model", "m", "--api-key-env", "GP_BENCH_TEST_KEY",
                "--modes", "direct,guarded",
                "--concurrency", "1", "--requests", "4", "--warmup", "1", "--policy", str(MONITOR),
                "--json", str(tmp_path / "b.json"), "--workdir", str(tmp_path / "work"), "--quiet"]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guardproxy.cli", "bench", *args,
            cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-4000:]
    seen = [r.headers.get("authorization") for r in fake.requests if r.path.endswith("/chat/completions")]
    assert len(seen) == 2 * (4 + 1) and set(seen) == {f"Bearer {canary}"}  # direct and through the gateway
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["config"]["api_key_set"] is True
    assert result["sweep"] == {} and result["length"] == {}  # not run against a real upstream unless asked
    # no upstream stamp: the targets are the gateway's own Server-Timing, and say so in the JSON and the table
    assert result["targets"] and {t["source"] for t in result["targets"]} == {"server-timing"}
    assert all("client_p50_difference" in t and 0 < t["n"] <= 4 for t in result["targets"])
    text = out.decode()
    targets_table = text.split("Issue 7 targets")[1]
    assert "Server-Timing" in targets_table and "a real upstream sends no stamp" in targets_table
    assert "No overhead here: a real upstream sends no per-request stamp" in text
    assert "FAKE upstream" not in text
    everything = out + err + (tmp_path / "b.json").read_bytes()
    for path in (tmp_path / "work").rglob("*"):
        if path.is_file():
            everything += path.read_bytes()
    assert canary.encode() not in everything


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(BenchError, match="concurrency"):
        BenchConfig(concurrency=(5000,)).validate()
    with pytest.raises(BenchError, match="modes"):
        BenchConfig(modes=("direct",)).validate()
    with pytest.raises(BenchError, match="lengths"):
        BenchConfig(lengths=(1000,)).validate()
    with pytest.raises(BenchError, match="threads"):
        BenchConfig(threads=0).validate()
    with pytest.raises(BenchError, match="length-ttft-ms"):
        BenchConfig(length_ttft_ms=-1.0).validate()
    with pytest.raises(BenchError, match="concurrent-window"):
        BenchConfig(concurrent_window=True, workers=1).validate()
    BenchConfig(length_ttft_ms=50.0, concurrent_window=True, workers=2).validate()  # in range: no error
    proc = _bench(["--upstream", "http://127.0.0.1:9/v1", "--fake-upstream"], timeout=60)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


# --- the parts ----------------------------------------------------------------------------------------------------


async def test_the_fake_upstream_stamps_its_own_time() -> None:
    # A TTFT far above any scheduling hiccup, so that the header's override reads apart from it on a loaded machine
    # (30 ms here once read 96 ms on a 2-core CI run).
    app = build(ttft_ms=1000, tokens_per_s=0, reply_words=12)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with serve(app) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.post("/v1/chat/completions", json=body)
        assert len(r.json()["choices"][0]["message"]["content"].split()) == 12
        assert 1000 <= float(r.headers[STAMP_HEADER]) < 5000
        r = await client.post("/v1/chat/completions", json={**body, "stream": True}, headers={TTFT_HEADER: "0"})
        assert r.text.rstrip().endswith("data: [DONE]")
        assert 0 <= float(r.headers[STAMP_HEADER]) < 1000


def test_turns_are_unique_and_about_64_tokens() -> None:
    import random

    from guardproxy.encoding import load_tokenizer

    rng = random.Random(0)
    turns = [user_turn(rng, i, 48) for i in range(50)]
    assert len(set(turns)) == 50
    tok = load_tokenizer(Settings().guard.model_dir / "tokenizer.json")  # the model the bench runs
    lengths = [len(tok.encode(t).ids) for t in turns]
    assert 56 <= sum(lengths) / len(lengths) <= 72


def test_conversations_grow_and_start_over() -> None:
    mix = Mix(MixSpec(max_turns=3), seed=1)
    seen = []
    for _ in range(7):
        planned = mix.next("t", stream=False, conversation=True)
        seen.append(planned.history_turns)
        body = json.loads(planned.body)
        assert len(body["messages"]) == 2 * planned.history_turns + 1
        mix.settle("t", planned, "reply")
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    single = mix.next("t", stream=True, conversation=False)
    assert single.history_turns == 0 and single.conversation is None and json.loads(single.body)["stream"] is True


def test_percentiles_and_stage_diff() -> None:
    p = percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert p is not None and p.n == 5 and p.p50 == 3.0 and p.p50 <= p.p90 <= p.p99 <= p.max == 5.0
    assert percentiles([]) is None
    inf = float("inf")
    before = Scrape({"parse": 1.0}, {"parse": 10}, {"parse": {0.001: 5, 0.01: 10, inf: 10}}, {})
    after = Scrape({"parse": 1.5}, {"parse": 20}, {"parse": {0.001: 5, 0.01: 20, inf: 20}}, {})
    (st,) = stage_diff(before, after, requests=10)
    assert st.count == 10 and st.mean_ms == pytest.approx(50.0) and st.per_request_ms == pytest.approx(50.0)
    assert st.p50_ms is not None and 1.0 <= st.p50_ms <= 10.0  # all ten new observations fell in (1, 10] ms


def test_soak_growth_is_measured_from_the_end_of_warm_up() -> None:
    from bench.soak import analyse
    from guardproxy.benchmark.procs import ProcSample

    # RSS climbs during warm-up (caches filling), then sits flat with a little noise
    samples = [
        ProcSample(i, "gateway", 100.0 + min(i, 10) * 5 + (i % 2) * 0.5, 20, "soak", i * 100) for i in range(101)
    ]
    r = analyse(samples, total=10_000, warmup=1_000, statuses={"200": 10_000}, wall=100.0, latency=None)
    assert r["rss_first_mib"] == 100.0
    assert r["rss_after_warmup_mib"] == pytest.approx(150.25, abs=0.5)
    assert r["rss_growth_after_warmup_pct"] == pytest.approx(0.0, abs=0.5)
    assert r["requests_done"] == 10_000 and r["throughput_rps"] == 100.0 and r["fds_end"] == 20


def test_litellm_comparison_says_when_litellm_is_missing(tmp_path: Path) -> None:
    from bench.litellm_compare import MASTER_KEY, litellm_config, litellm_missing

    note = litellm_missing(tmp_path / "no-venv")
    assert note is not None and "not installed" in note and "litellm[proxy]==1.108.7" in note
    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    (fake_venv / "bin" / "litellm").write_text("")
    assert litellm_missing(fake_venv) is None
    cfg = litellm_config("http://127.0.0.1:9/v1")
    assert "api_base: http://127.0.0.1:9/v1" in cfg and f"master_key: {MASTER_KEY}" in cfg and "callbacks: []" in cfg


def test_targets_are_gateway_minus_direct_in_the_same_run() -> None:
    from guardproxy.benchmark.run import evaluate_targets

    def pct(p50: float) -> dict[str, float]:
        return {"n": 10, "p50": p50, "p90": p50 + 1, "p99": p50 + 2, "mean": p50, "max": p50 + 3}

    def row(target: str, plain: float, ttft: float, conv_ttft: float, single_ttft: float) -> dict[str, Any]:
        return {"concurrency": 1, "target": target, "plain": {"overhead_ms": pct(plain), "total_ms": pct(plain + 50)},
                "stream": {"ttft_overhead_ms": pct(ttft), "ttft_ms": pct(ttft + 50)},
                "by_history": {"stream_conversation": pct(conv_ttft),
                               "stream_single_turn": pct(single_ttft)}}  # fmt: skip

    latency = [
        row("direct", 1.0, 0.5, 0.5, 0.4),
        row("guarded", 9.0, 7.5, 12.5, 6.4),
        row("speculative", 4.0, 1.0, 1.2, 0.9),
    ]
    sweep = {"target": "guarded", "levels": [{"concurrency": 16, "throughput_rps": 200.0}]}
    length = {"ratio_at_longest": 1.3, "longest": 100, "tail_history_turns": [96, 100]}
    targets = evaluate_targets(BenchConfig(), latency, length, sweep)
    got = {t["target"]: (t["value"], t["met"]) for t in targets}
    # each says where its figure comes from and over how many samples (10 here: too few for a firm verdict)
    added = [t for t in targets if t["unit"] == "ms"]
    assert added and all(t["source"] == "client" and (t["n"], t["direct_n"]) == (10, 10) for t in added)
    assert all(t["few_samples"] for t in added)
    assert got["added to TTFT, c=1, input checks only (guarded)"] == (7.0, True)
    assert got["added to TTFT, c=1, single user turn: turn check only (guarded)"] == (6.0, True)
    assert got["added to TTFT, c=1, new turn of a conversation: turn + window check (guarded)"] == (12.0, False)
    assert got["added latency, plain reply, c=1, input + output checks (guarded)"] == (8.0, True)
    assert got["added to TTFT, c=1, speculative forwarding"] == (0.5, True)
    assert got["throughput at c=16 (guarded)"] == (200.0, True)
    assert got["request N+1 of a 100-turn conversation / single turn"] == (1.3, False)


def test_replicas_share_conversation_state_in_redis_and_leave_no_keys(tmp_path: Path) -> None:
    # two gateway processes on the machine's real Redis, each conversation's requests alternating between them
    proc = _bench(["--fake-upstream", "--modes", "direct,input-only", "--concurrency", "1", "--requests", "4",
                   "--warmup", "2", "--sweep", "none", "--lengths", "0,1,2,3", "--conversations", "2",
                   "--threads", "1", "--replicas", "2", "--json", str(tmp_path / "r.json"),
                   "--workdir", str(tmp_path / "work"), "--quiet"], timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    length = result["length"]
    assert result["config"]["replicas"] == 2 and length["replicas"] == 2
    assert length["requests_per_replica"] == {"input-only": 8, "input-only-r2": 8}
    assert "round robin over 2 replicas sharing Redis" in proc.stdout
    other = length["replica_counters"]["input-only-r2"]
    # the second replica went on with conversations the first began (every request answered: no forged history
    # blocked), and read the window estimate from the turn states the first one kept
    assert other["guardproxy_exchange_outcomes_total|outcome=ok"] == 8
    assert other.get("guardproxy_conversation_window_estimated_total", 0) >= 1
    client = redis.Redis(port=6379)
    try:
        assert list(client.scan_iter(match=f"{length['redis_prefix']}*")) == []  # the run removed its keys
    finally:
        client.close()


def test_a_twin_asks_the_same_new_turn_alone_under_a_fresh_serial() -> None:
    from guardproxy.benchmark.load import Mix, MixSpec

    mix = Mix(MixSpec(turn_words=48), seed=3)
    first = mix.next("g", stream=False, conversation=True)
    mix.settle("g", first, "a reply")
    second = mix.next("g", stream=False, conversation=True)
    asked = second.conversation[-1]["content"] if second.conversation else ""
    mix.settle("g", second, "another reply")  # the bench asks for the twin after the reply came back
    twin = mix.twin(second)
    assert second.history_turns == 1 and twin.history_turns == 0 and twin.conversation is None
    (alone,) = json.loads(twin.body)["messages"]
    assert alone["role"] == "user" and alone["content"] != asked  # not a classifier cache hit
    # the same words after the serial
    assert alone["content"].split()[2:] == asked.split()[2:] and asked.startswith("Question ")


def test_paired_ratio_is_the_median_of_each_request_over_its_twin() -> None:
    from guardproxy.benchmark.run import length_ratios

    # bimodal costs: a turn exits early (5 ms) or runs the whole model (10 ms), and the history adds 10% to each;
    # the per-pair median reads that 10% whichever costs the pairs happen to have
    per_turn = {0: [5.0, 5.0], 1: [5.5, 11.0, 11.0]}
    pairs = {0: [(5.0, 5.0), (5.0, 5.0)], 1: [(5.5, 5.0), (11.0, 10.0), (11.0, 10.0)]}
    got = length_ratios(per_turn, [5.0, 5.0, 5.0, 10.0, 10.0], 1, pairs=pairs)
    assert got["paired_n"] == 5
    assert got["paired_ratio_at_longest"] == pytest.approx(1.1)  # median of (1.0, 1.0, 1.1, 1.1, 1.1)
    assert got["ratio_at_longest"] == pytest.approx(5.5 / 5.0)  # p50 of the tail (5, 5, 5.5, 11, 11) over 5
    assert length_ratios(per_turn, [5.0], 1)["paired_ratio_at_longest"] is None


def test_server_timing_is_parsed_where_a_gateway_sends_it() -> None:
    from guardproxy.benchmark.load import server_timing

    assert server_timing('parse;dur=0.12, input_check;desc="guard";dur=4.5, cache;desc=hit, bad;dur=x') == (
        ("parse", 0.12),
        ("input_check", 4.5),
    )
    assert server_timing(None) == ()


def test_gateway_config_carries_the_window_options_into_valid_settings(tmp_path: Path) -> None:
    spec = GatewaySpec(
        "guarded", workers=2, concurrent_window=True, speculative_window=True, window_max_ids=96, early_exit=True
    )
    cfg = gateway_config(
        spec, port=1, upstream="http://127.0.0.1:2/v1", workdir=tmp_path, model_dir=None, policy=None, capacity=8
    )
    guard = Settings(**cfg).guard
    assert (guard.workers, guard.concurrent_window, guard.window_max_ids) == (2, True, 96)
    assert (guard.speculative_window, guard.speculative, guard.early_exit) == (True, False, True)
    plain = Settings(**gateway_config(GatewaySpec("guarded"), port=1, upstream="http://127.0.0.1:2/v1",
                                      workdir=tmp_path, model_dir=None, policy=None, capacity=8)).guard  # fmt: skip
    assert (plain.concurrent_window, plain.speculative_window, plain.window_max_ids) == (False, False, 96)
    assert plain.early_exit == "auto"  # the gateway's own default, as guardproxy serve runs it
    assert plain.output_checks is True


def test_input_only_mode_turns_output_checks_off_and_stands_in_for_guarded_in_the_targets(tmp_path: Path) -> None:
    from guardproxy.benchmark.run import evaluate_targets

    cfg = gateway_config(GatewaySpec("input-only", output_checks=False), port=1, upstream="http://127.0.0.1:2/v1",
                         workdir=tmp_path, model_dir=None, policy=None, capacity=8)  # fmt: skip
    guard = Settings(**cfg).guard
    assert (guard.enabled, guard.output_checks) == (True, False)

    def pct(p50: float) -> dict[str, float]:
        return {"n": 10, "p50": p50, "p90": p50 + 1, "p99": p50 + 2, "mean": p50, "max": p50 + 3}

    def row(target: str, ttft: float) -> dict[str, Any]:
        return {"concurrency": 1, "target": target, "plain": {"overhead_ms": pct(ttft), "total_ms": pct(ttft + 50)},
                "stream": {"ttft_overhead_ms": pct(ttft), "ttft_ms": pct(ttft + 50)}, "by_history": {}}  # fmt: skip

    got = {
        t["target"]: t["value"]
        for t in evaluate_targets(BenchConfig(), [row("direct", 1.0), row("input-only", 5.0)], {}, {})
    }
    assert got["added to TTFT, c=1, input checks only (input-only)"] == 4.0
    assert not [k for k in got if "guarded" in k]


def test_early_exit_counts_are_read_from_the_gateways_counters() -> None:
    from guardproxy.benchmark.load import EXIT_COUNTER, WINDOW_EXIT_COUNTER, early_exits

    counters = {EXIT_COUNTER + "exited": 574.0, EXIT_COUNTER + "went_on": 279.0, "guardproxy_requests_total|x=y": 3.0}
    counters |= {WINDOW_EXIT_COUNTER + "exited": 12.0, WINDOW_EXIT_COUNTER + "went_on": 30.0}
    assert early_exits(counters) == (574, 279)
    assert early_exits(counters, windows=True) == (12, 30)
    assert early_exits({}) == (0, 0) and early_exits({}, windows=True) == (0, 0)


def test_rephrase_deferral_counts_are_read_from_the_gateways_counters() -> None:
    from guardproxy.benchmark.load import DEFERRED_COUNTER, EXIT_COUNTER, rephrase_deferred

    counters = {DEFERRED_COUNTER + "lower_bound": 41.0, DEFERRED_COUNTER + "whole_model": 2.0, EXIT_COUNTER + "x": 9}
    assert rephrase_deferred(counters) == (41, 2)
    assert rephrase_deferred({}) == (0, 0)


def test_with_early_exit_the_stage_table_counts_exits(tmp_path: Path) -> None:
    proc = _bench(["--fake-upstream", *TINY, "--policy", str(MONITOR), "--json", str(tmp_path / "b.json"),
                   "--png", str(tmp_path / "png"), "--modes", "direct,input-only", "--sweep", "none",
                   "--lengths", "none", "--early-exit", "--quiet"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from guardproxy.benchmark.load import early_exits

    result = json.loads((tmp_path / "b.json").read_text())
    assert result["config"]["early_exit"] is True and "early exit on" in proc.stdout
    rows = [st for st in result["stages"] if st["gateway"] == "input-only"]
    assert rows
    for st in rows:
        exited, went_on = early_exits(st["counters"])
        assert 0 < exited + went_on <= st["requests"]  # one per-turn check per request at most
        exited, went_on = early_exits(st["counters"], windows=True)
        assert exited + went_on <= st["requests"]  # one window pass per request at most
    assert "windows exited" in proc.stdout.split("Gateway stages", 1)[1].split("\n", 2)[1]


def test_refusals_put_the_tenants_refusals_in_memory_and_exited_turns_then_keep_a_bound(tmp_path: Path) -> None:
    proc = _bench(["--fake-upstream", *TINY, "--json", str(tmp_path / "b.json"), "--png", str(tmp_path / "png"),
                   "--modes", "direct,input-only", "--sweep", "none", "--lengths", "none", "--early-exit",
                   "--refusals", "2", "--quiet"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from guardproxy.benchmark.load import early_exits, rephrase_deferred

    result = json.loads((tmp_path / "b.json").read_text())
    assert result["config"]["refusals"] == 2
    assert "input-only: blocked 2 of 2 --refusals asks before the runs" in result["notes"]
    rows = [st for st in result["stages"] if st["gateway"] == "input-only"]
    exited = sum(early_exits(st["counters"])[0] for st in rows)
    deferred = sum(sum(rephrase_deferred(st["counters"])) for st in rows)
    # with refusals in memory, a request whose turn exited has its similarity deferred (at most once a request)
    assert 0 < exited <= deferred <= sum(st["requests"] for st in rows)


def test_replicas_without_their_redis_is_a_one_line_error() -> None:
    # nothing listens on port 1: the bench refuses before starting any gateway, rather than measure local state
    proc = _bench(["--fake-upstream", "--replicas", "2", "--redis-url", "redis://127.0.0.1:1/0"], timeout=60)
    assert proc.returncode == 2 and "--replicas needs Redis at redis://127.0.0.1:1/0" in proc.stderr
    assert "starting gateway" not in proc.stderr + proc.stdout


def test_refusals_out_of_range_is_a_one_line_error() -> None:
    proc = _bench(["--fake-upstream", "--refusals", "101"])
    assert proc.returncode == 2 and "--refusals must be 0..100" in proc.stderr


def test_history_cost_names_the_parts_and_they_add_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import history_cost

    one, three = (json.loads(history_cost.body(k))["messages"] for k in (1, 3))
    assert [m["role"] for m in three] == ["user", "assistant", "user", "assistant", "user"] and len(one) == 1
    out = tmp_path / "cost.json"
    assert history_cost.main(["--turns", "1,3", "--repeat", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"1", "3"}
    for row in rows.values():
        parts = row["parse_chat"] + row["build_chain"] + row["scored_texts"]
        assert row["total"] == pytest.approx(parts) and min(row.values()) > 0
    assert rows["3"]["body_bytes"] > rows["1"]["body_bytes"]
    assert "build_chain us" in capsys.readouterr().out
    for bad in (["--turns", "1,x"], ["--turns", "0"], ["--json", str(tmp_path / "no" / "such.json")]):
        with pytest.raises(SystemExit) as exc:
            history_cost.main(bad)
        assert exc.value.code == 2


# --- the same requests to every target; blocks and flags counted (walkthrough items 1-4, 11) --------------------


async def test_every_target_gets_the_same_planned_requests(tmp_path: Path) -> None:
    fake = FakeUpstream()
    bench = Bench(BenchConfig(progress=False, workdir=tmp_path, mix=MixSpec(stream_share=0.4, max_turns=3)))
    async with serve(fake) as base:
        targets = [Target(name, base + "/v1/chat/completions", {"x-bench-target": name}) for name in "abc"]
        try:
            samples, _, ended = await bench._mixed(targets, 3, steps=30, seconds=None, ttft_ms=None, seed=5)
        finally:
            await bench.close()
    assert len(samples) == 90 and ended == 0
    bodies: dict[str, list[str]] = {name: [] for name in "abc"}
    for r in fake.requests:
        bodies[r.headers["x-bench-target"]].append(json.dumps(r.body, sort_keys=True))
    # the same texts, turns and stream choices (the FAKE upstream's replies are the same, so whole bodies match)
    assert sorted(bodies["a"]) == sorted(bodies["b"]) == sorted(bodies["c"]) and len(bodies["a"]) == 30
    sent = [json.loads(b) for b in bodies["a"]]
    assert any(b.get("stream") for b in sent) and not all(b.get("stream") for b in sent)
    assert any(len(b["messages"]) > 1 for b in sent)  # conversation turns among them


def test_a_plan_depends_on_its_seed_and_worker_count_alone() -> None:
    def drawn(plan: Plan) -> list[tuple[int, int, Step | None]]:
        return [(w, k, plan.step(w, k)) for k in range(4) for w in (1, 0)]  # any order of the workers

    first, second = drawn(Plan(MixSpec(), 3, 2, 5)), drawn(Plan(MixSpec(), 3, 2, 5))
    assert [(w, k) for w, k, step in first if step is not None] == [(1, 0), (0, 0), (1, 1), (0, 1), (0, 2)]
    serials = [int(step.text.split()[1]) for _, _, step in first if step is not None]
    assert len(set(serials)) == 5 and max(serials) - min(serials) == 4  # reserved up front, one per step
    for (_, _, a), (_, _, b) in zip(first, second, strict=True):
        # the same draws: the same text after the serial, the same stream and conversation choices
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert (a.text.split()[2:], a.stream, a.conversation) == (b.text.split()[2:], b.stream, b.conversation)


def _sample(target: str, decision: str = "allow", *, filtered: bool = False, status: int = 200) -> Sample:
    return Sample(target, False, 0, status, 10.0, None, 5.0, decision, filtered=filtered)


def test_a_turn_one_target_blocked_ends_the_conversation_for_every_target() -> None:
    replay = Replay(MixSpec(max_turns=8), ["a", "b"])
    first = replay.requests(Step("Question 1: how do bees find home?", False, True))
    replay.settle("a", first["a"], _sample("a"), "a's reply")
    replay.settle("b", first["b"], _sample("b"), "b's reply")
    second = replay.requests(Step("Question 2: and ants?", True, True))
    # each target's copy holds its own reply, at the same depth
    assert second["a"].history_turns == second["b"].history_turns == 1
    assert json.loads(second["a"].body)["messages"][1]["content"] == "a's reply"
    assert json.loads(second["b"].body)["messages"][1]["content"] == "b's reply"
    # b blocked the turn in its stream (finish_reason content_filter, header allow): nobody goes on with it
    replay.settle("a", second["a"], _sample("a"), "a's second reply")
    replay.settle("b", second["b"], _sample("b", filtered=True), "b's cut reply + the policy's text")
    third = replay.requests(Step("Question 3: and wasps?", False, True))
    assert replay.ended == 1
    for planned in third.values():
        assert planned.history_turns == 0
        assert json.loads(planned.body)["messages"] == [{"role": "user", "content": "Question 3: and wasps?"}]
    single = replay.requests(Step("Question 4: alone", True, False))
    assert single["a"] is single["b"] and single["a"].conversation is None


async def _blocking_upstream(scope: dict[str, Any], receive: Any, send_: Any) -> None:
    """Replies as a gateway does when it blocks or flags, by the request's ``x-case`` header."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send_({"type": "lifespan.startup.complete"})
        await send_({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    case = dict(scope["headers"]).get(b"x-case", b"").decode()
    headers = [(b"x-bench-upstream-ms", b"1.0"), (b"x-guardproxy-decision", b"allow")]
    if case == "stream-output-block":  # the header is the input check's verdict; the block comes in the stream
        events = [
            {"choices": [{"index": 0, "delta": {"content": "Sure, here"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {"content": " [stopped]"}, "finish_reason": "content_filter"}]},
        ]
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        headers.append((b"content-type", b"text/event-stream"))
        status = 200
    elif case == "error-block":  # a policy that delivers blocks as errors
        error = {"message": "stopped", "type": "content_filter", "param": None, "code": "content_filter"}
        body, status = json.dumps({"error": error}).encode(), 400
        headers = [(b"x-guardproxy-decision", b"block")]
    else:  # a plain reply, flagged
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
        body, status = json.dumps(reply).encode(), 200
        headers = [(b"x-bench-upstream-ms", b"1.0"), (b"x-guardproxy-decision", b"flag")]
    await send_({"type": "http.response.start", "status": status, "headers": headers})
    await send_({"type": "http.response.body", "body": body})


async def test_an_output_block_in_a_stream_and_a_block_as_an_error_count_as_blocked() -> None:
    async with serve(_blocking_upstream) as base, client_session() as session:
        samples = []
        for case, stream in (("stream-output-block", True), ("error-block", False), ("flag", False)):
            target = Target("g", base + "/v1/chat/completions", {"x-case": case})
            planned = Planned(json.dumps({"model": "m", "messages": []}).encode(), stream, 0, None)
            sample, _ = await send(session, target, planned, want_text=False)
            samples.append(sample)
    streamed, refused, flagged = samples
    assert streamed.ok and streamed.blocked and streamed.decision == "allow" and streamed.overhead_ms is None
    assert not refused.ok and refused.blocked and not refused.failed
    assert flagged.flagged and not flagged.blocked and flagged.overhead_ms is not None
    row = summarize(samples)
    assert (row["blocked"], row["blocked_in_stream"], row["flagged"], row["failed"], row["measured"]) == (2, 1, 1, 0, 1)
    assert row["plain"]["n"] == 2 and row["plain"]["overhead_ms"]["n"] == 1  # the percentiles' n: measured only


# flags every request at the input, blocks every reply at the output: on a stream, the header says "flag" and the
# block arrives as finish_reason content_filter
FLAG_AND_BLOCK = """schema_version = 1
name = "bench-test"
version = "1"
description = "flags every request and blocks every reply"
harm_threshold = 0.5
on_classifier_failure = "fail_open"
on_state_failure = "fail_open"
flag_header = true

[[input_rules]]
id = "flag-all"
action = "flag"
when = {}

[[output_rules]]
id = "block-all"
action = "block"
when = {}

[refusals]
default = "Stopped by the bench test policy, which blocks every reply it sees."
"""


def test_blocks_and_flags_are_counted_per_target_and_sweep_level_and_shown(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(FLAG_AND_BLOCK)
    proc = _bench(["--fake-upstream", "--modes", "direct,guarded,input-only", "--concurrency", "1", "--requests", "8",
                   "--warmup", "1", "--ttft-ms", "5", "--tokens-per-s", "0", "--stream-share", "0.5",
                   "--sweep", "2", "--sweep-seconds", "0.5", "--lengths", "none", "--policy", str(policy),
                   "--threads", "1", "--json", str(tmp_path / "b.json"), "--quiet"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {r["target"]: r for r in result["latency"]}
    # the same planned requests everywhere, streams among them
    assert len({(r["plain"]["n"], r["stream"]["n"]) for r in rows.values()}) == 1 and rows["guarded"]["stream"]["n"]
    guarded, input_only, direct = rows["guarded"], rows["input-only"], rows["direct"]
    # every reply blocked: the plain ones by the header, the streams by their finish_reason (header: the input flag)
    assert guarded["blocked"] == guarded["requests"] == 8 and guarded["blocked_in_stream"] == guarded["stream"]["n"]
    assert guarded["measured"] == 0 and guarded["plain"]["overhead_ms"] is None and guarded["failed"] == 0
    assert input_only["flagged"] == 8 and input_only["blocked"] == 0 and input_only["measured"] == 8
    assert direct["blocked"] == direct["flagged"] == 0
    (level,) = result["sweep"]["levels"]
    assert level["target"] == "guarded" and level["blocked"] == level["ok"] == level["requests"] > 0
    assert level["allowed_rps"] == 0 and level["latency_ms"] is None
    # no conversation went on past a blocked turn: each ended for every target
    assert any("conversations ended early for every target" in n for n in result["notes"])
    assert result["notes"][0].startswith("the guard blocked ")
    # the terminal shows it: the latency rows (percentiles over 0 requests for guarded) and the sweep's columns
    table = {line.split()[1]: line.split() for line in proc.stdout.split("Overhead per request")[1].splitlines()[3:6]}
    assert table["guarded"][2] == "0"  # plain n: what the percentiles are over
    # sent, ok, blocked, flagged, failed
    assert table["guarded"][-5:] == ["8", "8", "8", "0", "0"] and table["input-only"][-5:] == ["8", "8", "0", "8", "0"]
    sweep = proc.stdout.split("Throughput sweep")[1].splitlines()
    assert "blocked" in sweep[1] and "allowed/s" in sweep[1]


# --- stopping, failing, bounds (walkthrough items 5-7, 9-12) ------------------------------------------------------


def _child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads children from /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT twice"])
def test_a_signal_stops_every_process_frees_their_ports_and_removes_the_temp_folder(tmp_path: Path, how: str) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the bench makes its temp folder
    argv = [sys.executable, "-m", "guardproxy.cli", "bench", "--fake-upstream", "--modes", "direct,passthrough",
            "--concurrency", "1", "--requests", "100000", "--warmup", "0", "--ttft-ms", "5", "--lengths", "none",
            "--sweep", "none", "--quiet"]  # fmt: skip
    log = tmp_path / "bench.err"
    with (
        log.open("wb") as err,
        subprocess.Popen(
            argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 90
            while not (configs := list(tmp_path.glob("guardproxy-bench-*/passthrough.toml"))):
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)
            config = tomllib.loads(configs[0].read_text())
            ports = [config["server"]["port"], int(config["upstream"]["base_url"].rsplit(":", 1)[1].split("/")[0])]
            while not all(_listening(port) for port in ports):  # the gateway is up: the bench is sending requests
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)
            time.sleep(0.5)
            children = _child_pids(proc.pid)
            assert len(children) == 2  # the FAKE upstream and the gateway
            if how == "SIGTERM":  # as kill PID, CI cancellation and timeout send it: to the bench alone
                proc.send_signal(signal.SIGTERM)
            else:  # a second Ctrl-C while the first one's cleanup runs
                proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
                proc.send_signal(signal.SIGINT)
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode in ((128 + signal.SIGTERM,) if how == "SIGTERM" else (130, -signal.SIGINT)), log.read_text()
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not [port for port in ports if _listening(port)]
    assert not list(tmp_path.glob("guardproxy-bench-*"))  # its configs (HMAC secrets), logs and drill stores


def test_max_seconds_bounds_the_warm_up(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _bench(["--fake-upstream", "--modes", "direct,passthrough", "--concurrency", "1", "--requests", "5",
                   "--warmup", "100000", "--max-seconds", "6", "--ttft-ms", "0", "--tokens-per-s", "0",
                   "--lengths", "none", "--sweep", "none", "--json", str(tmp_path / "b.json"), "--quiet"],
                  timeout=90)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.monotonic() - started < 60
    notes = json.loads((tmp_path / "b.json").read_text())["notes"]
    assert any(n.startswith("warm-up: stopped after") and "--max-seconds reached" in n for n in notes)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:9/v1?api-key=QUERYSECRETzz", "a query string"),
        ("http://user:PA55WORDzz@127.0.0.1:9/v1", "credentials in the URL"),
        ("ftp://127.0.0.1:9/v1", "http:// or https://"),
    ],
)
def test_an_upstream_url_the_bench_cannot_use_is_refused_without_echoing_it(
    tmp_path: Path, url: str, problem: str
) -> None:
    proc = _bench(["--upstream", url, "--upstream-model", "m", "--json", str(tmp_path / "b.json")], timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--upstream" in errors[0] and problem in errors[0], proc.stderr
    assert "SECRETzz" not in proc.stdout + proc.stderr and "PA55WORD" not in proc.stdout + proc.stderr
    assert "starting gateway" not in proc.stderr and not (tmp_path / "b.json").exists()


def test_the_reported_upstream_url_has_no_credentials_or_query() -> None:
    assert public_url("https://u:p@example.com:8443/v1?key=k#f") == "https://example.com:8443/v1"
    assert public_url("http://[::1]:9/v1") == "http://[::1]:9/v1"
    assert BenchConfig(upstream="http://u:p@127.0.0.1:9/v1?k=s").public()["upstream"] == "http://127.0.0.1:9/v1"


def test_a_run_where_every_request_failed_exits_non_zero_naming_the_statuses(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: the direct requests cannot connect, the gateway answers 502
    env = {**os.environ, "TMPDIR": str(tmp_path), "OPENAI_API_KEY": "sk-not-used"}
    proc = _bench(["--upstream", f"http://127.0.0.1:{port}/v1", "--upstream-model", "m", "--modes",
                   "direct,passthrough", "--concurrency", "1", "--requests", "2", "--warmup", "1",
                   "--json", str(tmp_path / "b.json")], env=env, timeout=90)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "every request failed" in error and "502 x1" in error and "conn:" in error, error
    assert not list(tmp_path.glob("guardproxy-bench-*"))  # a failed run leaves no temp folder either


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"conversations": -4}, "--conversations"),
        ({"conversations": 0}, "--conversations"),
        ({"ttft_ms": math.nan}, "--ttft-ms"),
        ({"ttft_ms": -1.0}, "--ttft-ms"),
        ({"ttft_ms": math.inf}, "--ttft-ms"),
        ({"sweep_ttft_ms": math.nan}, "--sweep-ttft-ms"),
        ({"tokens_per_s": math.nan}, "--tokens-per-s"),
        ({"reply_words": 0}, "--reply-words"),
        ({"mix": MixSpec(stream_share=5.0)}, "--stream-share"),
        ({"mix": MixSpec(stream_share=math.nan)}, "--stream-share"),
        ({"mix": MixSpec(conversation_share=-2.0)}, "--conversation-share"),
        ({"max_tokens": -7}, "--max-tokens"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"capacity": 0}, "--capacity"),
        ({"warmup": 10**9}, "--warmup"),
        ({"warmup": -1}, "--warmup"),
    ],
)
def test_out_of_range_flags_are_refused_naming_the_flag(changes: dict[str, Any], flag: str) -> None:
    with pytest.raises(BenchError, match=flag):
        BenchConfig(**changes).validate()


def test_a_nan_ttft_is_a_one_line_error_before_anything_starts() -> None:
    proc = _bench(["--fake-upstream", "--ttft-ms", "nan"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "guardproxy bench: error: --ttft-ms must be a number in 0..10000"
    ]


def test_a_conversation_of_no_turns_has_no_length_target() -> None:
    length = {"longest": 0, "ratio_at_longest": 1.0, "paired_ratio_at_longest": 1.0, "tail_history_turns": [0, 0],
              "paired_n": 3}  # fmt: skip
    assert not [t for t in evaluate_targets(BenchConfig(), [], length, {}) if t["target"].startswith("request N+1")]
