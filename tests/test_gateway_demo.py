"""`guardproxy demo` runs offline end to end and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_offline_and_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy.cli", "demo", "--keyword-guard"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "FAKE upstream" in out.stdout
    assert "finish_reason=content_filter" in out.stdout
    assert "ended with [DONE]" in out.stdout
