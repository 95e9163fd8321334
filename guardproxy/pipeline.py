"""The hook points a guarded exchange passes through.

The gateway owns the HTTP side; guard parts fill three hook points:

- ``check_input(exchange)``: before the upstream call, or in parallel with it when speculative
  forwarding is on (the reply is released only once the input verdict allows it). With
  ``guard.speculative_window`` the upstream call starts once a provisional verdict on the request's own
  turns allows it, while a conversation's window is still scored (``early``, below).
- ``check_output(exchange, choice, text, final=...)``: on the assistant text of one choice. On the
  plain path it runs once with ``final=True``; on the streaming path it runs every time the
  accumulated text grows by ``output_check_chars`` and once more at the end, so both paths run
  the same checks.
- ``start()`` / ``aclose()``: once at app startup and shutdown.
- ``finish(exchange)``: once after the exchange ends, whatever the outcome, off the request path
  (state updates, decision log, drill sampling). It must not raise.

A check returns a ``Verdict``: allow, flag (annotate and let through) or block (the client gets the
policy's reply text, as an assistant message or as an error status). An output verdict may instead
ask for one retry of a plain reply (``retry_note``). With no checks the pipeline is a passthrough.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

# ``check_input``'s ``early`` callback: given the provisional verdict, optionally a future "the upstream request
# is on the wire".
Early = Callable[["Verdict"], "asyncio.Future[None] | None"]


class Action(StrEnum):
    ALLOW = "allow"
    FLAG = "flag"
    BLOCK = "block"


_SEVERITY = {Action.ALLOW: 0, Action.FLAG: 1, Action.BLOCK: 2}


@dataclass(frozen=True)
class Verdict:
    """What one check decided.

    ``reply_text`` is the text the client sees instead of the upstream reply when ``action`` is
    ``block``; with ``status_code`` set it is sent as an OpenAI error body with that status instead
    of an assistant message. ``annotations`` become ``x-guardproxy-*`` response headers (only on
    replies whose headers have not been sent yet). ``retry_note`` (output checks, plain replies only)
    asks the gateway to re-ask the upstream once with this note added as a system message.
    """

    action: Action = Action.ALLOW
    reason: str = ""
    category: str | None = None
    reply_text: str | None = None
    status_code: int | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    retry_note: str | None = None

    @property
    def blocks(self) -> bool:
        return self.action is Action.BLOCK


ALLOW = Verdict()


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """The most severe verdict wins; annotations of all verdicts are merged (later ones win on a clash)."""
    if not verdicts:
        return ALLOW
    worst = max(verdicts, key=lambda v: _SEVERITY[v.action])
    merged: dict[str, str] = {}
    for v in verdicts:
        merged.update(v.annotations)
    retry = next((v.retry_note for v in verdicts if v.retry_note), None)
    return Verdict(
        action=worst.action,
        reason=worst.reason,
        category=worst.category,
        reply_text=worst.reply_text,
        status_code=worst.status_code,
        annotations=merged,
        retry_note=retry if worst.action is not Action.BLOCK else None,
    )


@dataclass
class Exchange:
    """One guarded request and its reply, as the checks see it.

    ``headers`` never holds ``authorization`` or other credentials. ``state`` is scratch space
    for checks (signals computed once and shared by every policy). ``timings`` collects the
    gateway's own time per stage in seconds (parse, state, tokenize, inference, policy, store...).
    """

    request_id: str
    tenant: str
    route: str
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    reply_texts: dict[int, str] = field(default_factory=dict)
    # a reasoning model's thoughts per choice (``reasoning_content`` / ``reasoning``): relayed to the client, so
    # checked with the reply, but not part of the reply text a client sends back in its history
    reply_reasoning: dict[int, str] = field(default_factory=dict)
    # a stream: characters of each choice's content that reached the client (all of it unless a check blocked)
    relayed_chars: dict[int, int] = field(default_factory=dict)
    input_verdict: Verdict | None = None
    output_verdict: Verdict | None = None
    outcome: str = "pending"
    upstream_status: int | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs = self.body.get("messages")
        return msgs if isinstance(msgs, list) else []

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0


@runtime_checkable
class Check(Protocol):
    """One guard part plugged into the pipeline."""

    name: str

    async def start(self) -> None: ...

    async def check_input(self, exchange: Exchange) -> Verdict: ...

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict: ...

    async def finish(self, exchange: Exchange) -> None: ...

    async def aclose(self) -> None: ...


class Pipeline:
    """Runs every check at each hook point and combines their verdicts."""

    def __init__(self, checks: Sequence[Check] = (), *, output_check_chars: int = 256) -> None:
        self.checks = list(checks)
        self.output_check_chars = output_check_chars

    @property
    def passthrough(self) -> bool:
        return not self.checks

    async def start(self) -> None:
        for c in self.checks:
            await c.start()

    async def check_input(self, exchange: Exchange, *, early: Early | None = None) -> Verdict:
        """The checks' combined verdict. ``early``: with a single check that supports it (``accepts_early``), it is
        called at most once, before the verdict, with a provisional verdict on the request's own turns while the
        check still waits on a conversation's window; the caller may start the upstream call if that verdict does
        not block, and must still honour the final one. It may return a future that resolves once that call's
        request is on the wire: the window pass waits for it (briefly), so as not to slow the send."""
        if early is not None and len(self.checks) == 1 and getattr(self.checks[0], "accepts_early", False):
            return combine([await self.checks[0].check_input(exchange, early=early)])  # type: ignore[call-arg]
        verdicts = [await c.check_input(exchange) for c in self.checks]
        return combine(verdicts)

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict:
        verdicts = [await c.check_output(exchange, choice, text, final=final) for c in self.checks]
        return combine(verdicts)

    async def finish(self, exchange: Exchange) -> None:
        for c in self.checks:
            await c.finish(exchange)

    async def aclose(self) -> None:
        for c in self.checks:
            await c.aclose()
