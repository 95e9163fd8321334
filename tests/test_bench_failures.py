"""``guardproxy bench`` against an upstream that refuses every request still reports: what each target got, the
first distinct error messages (keys cut out), what to check, and ``--json`` if asked; then it exits non-zero. The
upstream is a real HTTP server on 127.0.0.1 that answers 401 and echoes the key it was sent, as some do."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.servers import serve

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-wrong-key-0123456789abcdef"


async def refuse_every_key(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An upstream that answers every request 401, the key it got in the message (OpenAI's error shape)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    auth = dict(scope["headers"]).get(b"authorization", b"").decode()
    key = auth.removeprefix("Bearer ")
    error = {"message": f"Incorrect API key provided: {key}. You can find your API key in your account settings.",
             "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}  # fmt: skip
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _bench_against_refusing_upstream(out: Path, tmp_path: Path) -> tuple[int | None, str, str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "OPENAI_API_KEY": KEY}
    async with serve(refuse_every_key) as upstream:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guardproxy.cli", "bench", "--upstream", f"{upstream}/v1", "--upstream-model", "m",
            "--modes", "direct,passthrough", "--concurrency", "1", "--requests", "2", "--warmup", "2",
            "--json", str(out), "--quiet",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        raw_out, raw_err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, raw_out.decode(), raw_err.decode()


def test_a_run_whose_every_request_got_401_prints_its_report_and_json_then_exits_non_zero(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    returncode, stdout, stderr = asyncio.run(_bench_against_refusing_upstream(out, tmp_path))
    assert returncode == 2, stdout[-2000:] + stderr[-2000:]
    (error,) = [line for line in stderr.splitlines() if "error:" in line]
    assert "every request failed" in error and "401 x2" in error, error
    # the report: per target, what came back and the upstream's own words, and what to check
    assert "Nothing measured" in stdout, stdout
    report = stdout.split("Nothing measured", 1)[1].split("\n\n", 1)[0]
    for target in ("direct", "passthrough"):
        (row,) = [line for line in report.splitlines() if line.strip().startswith(target)]
        assert row.split()[1:] == ["2", "2", "401", "x2"], row  # sent, failed, statuses
    assert "Incorrect API key provided: [REDACTED]" in report
    assert "$OPENAI_API_KEY" in report and "--api-key-env" in report
    # the JSON, with the same account
    text = out.read_text()
    failure = json.loads(text)["failure"]
    assert failure["phase"] == "warm-up"
    assert failure["targets"]["direct"]["statuses"] == {"401": 2}
    assert failure["targets"]["passthrough"]["statuses"] == {"401": 2}
    assert any("Incorrect API key provided" in e for e in failure["targets"]["direct"]["errors"])
    assert failure["checks"] and json.loads(text)["latency"] == []
    # the key is nowhere: not in the report, the error line or the JSON
    assert KEY not in stdout + stderr + text
    assert not list(tmp_path.glob("guardproxy-bench-*"))
