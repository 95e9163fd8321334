"""`guardproxy demo` runs offline end to end: with the KEYWORD stand-in, and with the shipped guard model, whose
verdicts on the FAKE upstream's canned replies are what a user running the README's first command sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardproxy.commands.demo import DEMO_ANSWERS, HARMFUL, PLAIN, STREAM
from guardproxy.fake_upstream import DEFAULT_REPLY
from guardproxy.settings import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
needs_model = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model.onnx").is_file(), reason="the shipped guard model is not installed"
)
# The line of the strictest shipped policy's stop-harmful-reply rule (policies/strict.toml).
STRICT_REPLY_HARM = 0.3


def _guardproxy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _outcomes(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith("-> ")]


def test_demo_runs_offline_and_exits_zero() -> None:
    out = _guardproxy("demo", "--keyword-guard")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAKE upstream" in out.stdout
    assert "finish_reason=content_filter" in out.stdout
    assert "ended with [DONE]" in out.stdout


@needs_model
def test_demo_with_the_shipped_model_allows_the_harmless_requests_and_blocks_the_harmful_one() -> None:
    out = _guardproxy("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the shipped guard model" in out.stdout
    assert _outcomes(out.stdout) == [
        "-> allowed (expected: allowed)",
        "-> allowed (expected: allowed)",
        "-> blocked (expected: blocked)",
    ], out.stdout
    assert f"assistant: {DEMO_ANSWERS[PLAIN]}" in out.stdout
    assert f"assistant: {DEMO_ANSWERS[STREAM]}" in out.stdout
    assert "ended with [DONE]" in out.stdout


@needs_model
def test_demo_exits_nonzero_when_a_harmless_request_is_blocked() -> None:
    # The canned reply the demo used to send: the shipped model scores it 0.73 reply harm, so the gateway blocks
    # the harmless question's answer. The demo must say so and fail rather than exit 0.
    out = _guardproxy("demo", "--reply", "A canned reply from the FAKE upstream, relayed by the gateway word by word.")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "NOT AS EXPECTED" in out.stdout
    assert "1. plain request: expected allowed, got blocked" in out.stdout


@needs_model
def test_the_fake_upstreams_canned_replies_score_low_reply_harm() -> None:
    pairs = [(PLAIN, DEMO_ANSWERS[PLAIN]), (STREAM, DEMO_ANSWERS[STREAM])]
    pairs += [(prompt, DEFAULT_REPLY) for prompt in ("hi", "hello", PLAIN, STREAM)]
    rows = "".join(json.dumps({"id": str(i), "prompt": p, "response": r}) + "\n" for i, (p, r) in enumerate(pairs))
    out = _guardproxy("score", "-", stdin=rows)
    assert out.returncode == 0, out.stderr
    scored = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(scored) == len(pairs)
    for (prompt, reply), row in zip(pairs, scored, strict=True):
        assert row["reply_harm"] < STRICT_REPLY_HARM, (prompt, reply, row)
        assert row["action"] == "allow", (prompt, reply, row)
    # and the harmful question is one the model reads as harmful on its own
    harmful = _guardproxy("score", "-", stdin=json.dumps({"id": "h", "prompt": HARMFUL}) + "\n")
    assert json.loads(harmful.stdout)["action"] == "block"
