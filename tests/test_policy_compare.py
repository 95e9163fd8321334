"""``policy compare`` counts exchanges, not client request ids, and says which shadow decisions saw the input only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from guardproxy.cli import main
from guardproxy.decisions import INPUT_ONLY, compare, read_log
from tests.test_guard import POLICIES, gateway


def rec(xid: str | None, role: str, stage: str, action: str, rule: str | None = None, **extra: Any) -> dict[str, Any]:
    out = {"request_id": "dup-1", "policy": "default" if role == "active" else "walk", "version": "1", "role": role,
           "stage": stage, "action": action, "category": "none", "rule": rule, **extra}  # fmt: skip
    if xid is not None:
        out["exchange_id"] = xid
    return out


def test_exchanges_that_share_a_request_id_are_compared_one_by_one() -> None:
    records = [
        rec("x1", "active", "input", "allow"), rec("x1", "shadow", "input", "allow"),
        rec("x2", "active", "input", "allow"), rec("x2", "shadow", "input", "block", "block-ip"),
        rec("x3", "active", "input", "block", "block-harm"), rec("x3", "shadow", "input", "block", "block-harm"),
    ]  # fmt: skip
    report = compare(records)
    (walk,) = report.shadows
    assert report.requests == walk.requests == 3
    assert walk.confusion["allow"] == {"allow": 1, "block": 1} and walk.confusion["block"] == {"block": 1}
    # a request id that names several exchanges is shown with the exchange's own id
    assert walk.examples == {"allow->block": ("dup-1 (exchange x2)",)}
    assert walk.rules == {"allow->block": {"- -> block-ip": 1}}
    # a log written before records had an exchange id: the request id is all there is to group by
    assert compare([{k: v for k, v in r.items() if k != "exchange_id"} for r in records]).requests == 1


def test_a_shadow_decision_without_a_reply_stage_is_marked_input_only() -> None:
    records = [
        # the active policy blocked at input: no reply, so the shadow's flag is its input decision alone
        rec("x1", "active", "input", "block", "block-harm"), rec("x1", "shadow", "input", "flag", "flag-advice"),
        # the active policy blocked the reply: the shadow saw the reply too, and its flag is its whole outcome
        rec("x2", "active", "input", "allow"), rec("x2", "shadow", "input", "allow"),
        rec("x2", "active", "output", "block", "stop-reply"), rec("x2", "shadow", "output", "flag", "flag-reply"),
        # both blocked at input: nothing is missing
        rec("x3", "active", "input", "block", "block-harm"), rec("x3", "shadow", "input", "block", "block-harm"),
    ]  # fmt: skip
    (walk,) = compare(records).shadows
    assert walk.confusion["block"] == {"flag": 2, "block": 1}
    assert walk.input_only == 1 and walk.input_only_cells == {"block->flag": 1}
    assert walk.rules == {"block->flag": {"block-harm -> flag-advice": 1, "stop-reply -> flag-reply": 1}}
    text = compare(records).format_text()
    assert f"1 input-only ({INPUT_ONLY})" in text
    assert (
        f"e.g. block->flag: dup-1 (exchange x1), dup-1 (exchange x2)\n      input-only: 1 of 2 ({INPUT_ONLY})" in text
    )
    # the existing keys stay as they were; the marker is a field beside them
    shadow_json = compare(records).to_dict()["shadows"][0]
    assert {"shadow", "requests", "agreement", "confusion", "by_category", "examples", "rules"} < set(shadow_json)
    assert shadow_json["input_only"] == 1 and shadow_json["input_only_cells"] == {"block->flag": 1}


async def test_the_gateway_logs_one_exchange_id_per_exchange_whatever_the_client_sends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "decisions.jsonl"
    async with gateway(tmp_path, POLICIES / "default.toml", [POLICIES / "monitor.toml"]) as gw:
        for prompt in ("harmful", "ask for reply harmful", "uncertain"):
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            headers = {"authorization": "Bearer sk-client-key-123456", "x-request-id": "dup-1"}
            resp = await gw.client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200
        for _ in range(100):  # written off the request path: 2 input records per exchange, 2 output records for two
            if log.is_file() and len(list(read_log(log))) == 10:
                break
            await asyncio.sleep(0.05)
    records = list(read_log(log))
    assert {r["request_id"] for r in records} == {"dup-1"}
    by_exchange: dict[str, set[str]] = {}
    for r in records:
        by_exchange.setdefault(r["exchange_id"], set()).add(r["policy"])
    assert len(by_exchange) == 3 and all(p == {"default", "monitor"} for p in by_exchange.values())

    assert main(["policy", "compare", "--log", str(log)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("requests: 3 ")
    # default blocked "harmful" at input (monitor's flag is input-only) and the harmful reply at output (monitor's
    # flag is its whole outcome); both flagged "uncertain"
    assert "shadow monitor@2026.12.07.1: 3 requests, agreement 33.3%" in text
    assert f"      input-only: 1 of 2 ({INPUT_ONLY})" in text
    assert "block-harm -> flag-harm" in text and "stop-harmful-reply -> flag-harmful-reply" in text


async def test_compare_over_the_drill_store_counts_drills_and_marks_input_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with gateway(tmp_path, POLICIES / "default.toml", [POLICIES / "monitor.toml"], with_drills=True) as gw:
        for prompt in ("harmful", "ask for reply harmful", "uncertain"):
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            headers = {"authorization": "Bearer sk-client-key-123456", "x-request-id": "dup-1"}
            resp = await gw.client.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200
    # the gateway's close flushed every sampled drill (sample_rate 1.0)
    store = f"sqlite:///{tmp_path / 'drills.db'}"
    assert await asyncio.to_thread(main, ["policy", "compare", "--store", store, "--json"]) == 0  # its own loop
    report = json.loads(capsys.readouterr().out)
    (monitor,) = report["shadows"]
    assert report["requests"] == monitor["requests"] == 3
    assert monitor["confusion"]["block"] == {"flag": 2} and monitor["input_only_cells"] == {"block->flag": 1}


async def test_compare_reads_the_decision_logs_of_several_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = []
    for replica, prompts in (("r1", ("harmful", "uncertain")), ("r2", ("benign",))):
        (tmp_path / replica).mkdir()
        log = tmp_path / replica / "decisions.jsonl"
        async with gateway(tmp_path / replica, POLICIES / "default.toml", [POLICIES / "monitor.toml"]) as gw:
            for prompt in prompts:
                body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
                resp = await gw.client.post(f"{gw.url}/v1/chat/completions", json=body)
                assert resp.status_code == 200
        assert len({r["exchange_id"] for r in read_log(log)}) == len(prompts)  # flushed on close
        logs.append(str(log))

    def requests(args: list[str]) -> int:
        assert main(["policy", "compare", "--json", *args]) == 0
        return int(json.loads(capsys.readouterr().out)["requests"])

    assert requests(["--log", logs[0], "--log", logs[1]]) == 3  # not the last one alone
    assert requests(["--log", *logs]) == 3
    assert requests(["--log", logs[0]]) == 2
    assert requests(["--log", logs[0], "--log", logs[0]]) == 2  # a file given twice is read once
    with pytest.raises(SystemExit):
        main(["policy", "compare", "--help"])
    assert "several" in capsys.readouterr().out
    missing = tmp_path / "r3" / "decisions.jsonl"
    assert main(["policy", "compare", "--log", logs[0], "--log", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
