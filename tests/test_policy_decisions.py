"""The decision log: off the request path, bounded, dropping and counting when the disk does not keep up."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from guardproxy.decisions import DecisionLog, DecisionRecord, read_log, record_of, tenant_hash
from guardproxy.pipeline import Action
from guardproxy.policy import Decision
from guardproxy.signals import ConversationSignals, Signals


def _record(i: int) -> DecisionRecord:
    decision = Decision(policy="p", version="1", stage="input", action=Action.FLAG, rule="r", category="privacy")
    signals = Signals(harm=0.42, category="privacy", conversation=ConversationSignals(history="verified"))
    return record_of(decision, signals, request_id=f"req-{i}", exchange_id=f"x-{i}", tenant="tenant-a", role="active")


def test_records_are_written_as_json_lines_without_text_or_tenant(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "d.jsonl")
    log.start()
    assert log.submit(_record(i) for i in range(3)) == 0
    log.close()
    rows = list(read_log(tmp_path / "d.jsonl"))
    assert [r["request_id"] for r in rows] == ["req-0", "req-1", "req-2"]
    assert [r["exchange_id"] for r in rows] == ["x-0", "x-1", "x-2"]
    assert rows[0]["tenant"] == tenant_hash("tenant-a") != "tenant-a"
    assert rows[0]["scores"]["harm"] == 0.42 and rows[0]["scores"]["history"] == "verified"
    assert log.written == 3 and log.dropped == 0


def test_a_stuck_disk_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "stuck.jsonl"
    os.mkfifo(fifo)  # opening it for writing blocks until a reader comes: a disk that does not answer
    log = DecisionLog(fifo, queue_size=4)
    log.start()
    t0 = time.perf_counter()
    dropped = sum(log.submit([_record(i)]) for i in range(50))
    assert time.perf_counter() - t0 < 1.0, "submit never waits for the writer"
    # the writer holds one batch (at most 1 + the 4 it could drain), the queue 4 more; the rest is dropped and counted
    assert dropped == log.dropped and 50 - 4 - 5 <= dropped <= 50 - 4
    lines: list[str] = []
    stop = threading.Event()

    def read() -> None:  # the disk comes back: read every batch the writer opens the file for
        while not stop.is_set():
            with fifo.open() as fh:
                lines.extend(fh.read().splitlines())

    reader = threading.Thread(target=read)
    reader.start()
    log.close()
    stop.set()
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # wake the reader if it is waiting in open
    except OSError:  # ENXIO: no reader waiting, it already saw stop
        pass
    reader.join(5)
    assert not reader.is_alive()
    assert len(lines) == 50 - dropped
    assert all(json.loads(line)["policy"] == "p" for line in lines)


def test_an_unwritable_log_counts_drops(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "missing-dir" / "d.jsonl")
    log.start()
    log.submit(_record(i) for i in range(5))
    log.close()
    assert log.written == 0 and log.dropped == 5 and log.write_errors >= 1
    assert len(log.recent()) == 5  # the in-memory ring still answers the admin comparison


def test_read_log_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(_record(1).to_json() + "\n" + '{"request_id": "torn", "act')
    assert [r["request_id"] for r in read_log(path)] == ["req-1"]
