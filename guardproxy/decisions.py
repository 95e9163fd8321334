"""The decision log: every decision of every policy (active and shadow), unsampled, with no text.

Records are handed to ``DecisionLog.submit`` from the guard's ``finish`` hook and written as JSON lines by
one writer thread, so the request path never touches the disk. The queue is bounded: when it is full (the
disk is slow or failing) records are dropped and counted, never waited for. A ring of recent records stays
in memory for the admin comparison endpoint when no file is configured.

``compare`` turns records into the active-vs-shadow report: a confusion matrix of actions per shadow
policy, the disagreement rate by category, and example request ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from guardproxy.pipeline import Action
from guardproxy.policy import Decision
from guardproxy.signals import Signals

log = logging.getLogger(__name__)

Role = Literal["active", "shadow"]
_SEVERITY = {"allow": 0, "flag": 1, "block": 2}
ACTIONS = ("allow", "flag", "block")


def tenant_hash(tenant: str) -> str:
    """A stable, non-reversible tenant id for logs (tenants may be key hashes already; hash again anyway)."""
    return hashlib.sha256(b"guardproxy-tenant\x00" + tenant.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DecisionRecord:
    """One line of the decision log."""

    request_id: str
    tenant: str  # tenant_hash(), never the tenant itself
    policy: str
    version: str
    role: Role
    stage: Literal["input", "output"]
    action: str
    rule: str | None
    category: str
    scores: Mapping[str, float | str | None]
    ts: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=float)


def scores_of(signals: Signals) -> dict[str, float | str | None]:
    """The numbers of ``signals`` that a decision log keeps (no text, no embeddings)."""
    conv = signals.conversation
    return {
        "harm": round(signals.harm, 4),
        "jailbreak": round(signals.jailbreak, 4),
        "reply_harm": None if signals.reply_harm is None else round(signals.reply_harm, 4),
        "refusal": signals.refusal,
        "escalation": round(conv.escalation, 4),
        "window_harm": round(conv.window_harm, 4),
        "trajectory": round(conv.trajectory, 4),
        "refusal_events": float(conv.refusal_events),
        "rephrase_similarity": round(conv.rephrase_similarity, 4),
        "history": conv.history,
        "classifier_failed": float(signals.classifier_failed),
        "state_failed": float(signals.state_failed),
        "estimated": float(signals.estimated),
    }


def record_of(decision: Decision, signals: Signals, *, request_id: str, tenant: str, role: Role) -> DecisionRecord:
    return DecisionRecord(
        request_id=request_id,
        tenant=tenant_hash(tenant),
        policy=decision.policy,
        version=decision.version,
        role=role,
        stage=decision.stage,
        action=decision.action.value,
        rule=decision.rule,
        category=decision.category,
        scores=scores_of(signals),
    )


class DecisionLog:
    """Bounded queue → one writer thread → JSONL file (``path``), plus an in-memory ring of recent records."""

    def __init__(self, path: Path | None, *, queue_size: int = 10_000, ring_size: int = 10_000) -> None:
        self.path = path
        self._queue: queue.Queue[DecisionRecord | None] = queue.Queue(maxsize=queue_size)
        self._ring: deque[DecisionRecord] = deque(maxlen=ring_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self._warned = False
        self.on_drop: Callable[[int], None] | None = None  # e.g. a Prometheus counter's inc (thread-safe)

    def start(self) -> None:
        if self._thread is None and self.path is not None:
            self._thread = threading.Thread(target=self._run, name="guardproxy-decision-log", daemon=True)
            self._thread.start()

    def submit(self, records: Iterable[DecisionRecord]) -> int:
        """Queue records for writing without ever blocking; returns how many were dropped."""
        dropped = 0
        for rec in records:
            self._ring.append(rec)
            if self._thread is None:
                continue
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                dropped += 1
        if dropped:
            self._count_drops(dropped)
            with self._lock:
                first = not self._warned
                self._warned = True
            if first:
                log.warning("decision log queue full: dropping records (counted in guardproxy_decision_log_dropped)")
        return dropped

    def _count_drops(self, n: int) -> None:
        with self._lock:
            self.dropped += n
        if self.on_drop is not None:
            self.on_drop(n)

    def recent(self) -> list[DecisionRecord]:
        return list(self._ring)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued and stop the writer (called from a thread, or at shutdown)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("decision log writer did not drain in %.1f s; remaining records dropped", timeout)
        thread.join(timeout)

    def _run(self) -> None:
        assert self.path is not None
        while True:
            batch: list[DecisionRecord] = []
            item = self._queue.get()
            stop = item is None
            if item is not None:
                batch.append(item)
            while not stop and len(batch) < 1000:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                self._write(batch)
            if stop:
                return

    def _write(self, batch: list[DecisionRecord]) -> None:
        assert self.path is not None
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(rec.to_json() + "\n" for rec in batch))
            self.written += len(batch)
        except OSError as exc:
            self._count_drops(len(batch))
            with self._lock:
                self.write_errors += 1
                first = not self._warned
                self._warned = True
            if first:
                log.warning("decision log %s not writable (%s): dropping records", self.path, exc)


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL decision log; unreadable lines (a torn last write) are skipped."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and "request_id" in item and "action" in item:
                yield item


# --- comparison ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowComparison:
    """Active vs one shadow policy over the requests both decided."""

    shadow: str  # name@version
    requests: int
    agreement: float
    confusion: Mapping[str, Mapping[str, int]]  # active action -> shadow action -> count
    by_category: Mapping[str, Mapping[str, float]]  # category -> {requests, disagreements, rate}
    examples: Mapping[str, tuple[str, ...]]  # "active->shadow" -> request ids (disagreements only)
    # "active->shadow" -> "active rule -> shadow rule" -> requests: which rules each disagreement comes from (the rule
    # of the stage that set each side's action; "-" where no rule matched)
    rules: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ComparisonReport:
    active: tuple[str, ...]  # name@version of the active policies seen
    requests: int
    shadows: tuple[ShadowComparison, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        lines = [f"requests: {self.requests}   active: {', '.join(self.active) or '-'}"]
        if not self.shadows:
            lines.append("no shadow decisions in the log")
        for sc in self.shadows:
            lines += ["", f"shadow {sc.shadow}: {sc.requests} requests, agreement {sc.agreement:.1%}"]
            lines.append("  active \\ shadow " + "".join(f"{a:>8}" for a in ACTIONS))
            for a in ACTIONS:
                row = sc.confusion.get(a, {})
                lines.append(f"  {a:<16}" + "".join(f"{row.get(b, 0):>8}" for b in ACTIONS))
            lines.append("  disagreement by category:")
            for cat, st in sorted(sc.by_category.items(), key=lambda kv: -kv[1]["rate"]):
                lines.append(f"    {cat:<28}{int(st['disagreements']):>6}/{int(st['requests']):<6}{st['rate']:>8.1%}")
            for cell, ids in sc.examples.items():
                lines.append(f"  e.g. {cell}: {', '.join(ids)}")
                for pair, count in sorted(sc.rules.get(cell, {}).items(), key=lambda kv: -kv[1]):
                    lines.append(f"      {count:>6}  rules {pair}")
        return "\n".join(lines)


def _worst(a: str | None, b: str) -> str:
    return b if a is None or _SEVERITY.get(b, 0) > _SEVERITY.get(a, 0) else a


def compare(records: Iterable[Mapping[str, Any]], *, examples: int = 5) -> ComparisonReport:
    """Compare each shadow policy with the active one, request by request.

    A policy's action on a request is its most severe action over the request's stages (input, output), as
    the client would have experienced it; the category is the active policy's input category.
    """
    active: dict[str, tuple[str, str]] = {}  # request id -> (policy ref, action)
    category: dict[str, str] = {}
    shadow: dict[str, dict[str, str]] = defaultdict(dict)  # shadow ref -> request id -> action
    rule_of: dict[tuple[str, str], str] = {}  # (policy ref or "active", request id) -> the rule behind its action
    for rec in records:
        rid = str(rec["request_id"])
        ref = f"{rec.get('policy', '?')}@{rec.get('version', '?')}"
        action = str(rec["action"])
        rule = str(rec.get("rule") or "-")
        if rec.get("role") == "shadow":
            worse = _worst(shadow[ref].get(rid), action)
            if worse != shadow[ref].get(rid):
                rule_of[ref, rid] = rule
            shadow[ref][rid] = worse
        else:
            prev = active.get(rid)
            worse = _worst(prev[1] if prev else None, action)
            if prev is None or worse != prev[1]:
                rule_of["active", rid] = rule
            active[rid] = (ref, worse)
            if rec.get("stage") == "input" or rid not in category:
                category[rid] = str(rec.get("category") or "none")
    comparisons = []
    for ref in sorted(shadow):
        confusion: dict[str, Counter[str]] = {a: Counter() for a in ACTIONS}
        per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        cells: dict[str, list[str]] = defaultdict(list)
        rules: dict[str, Counter[str]] = defaultdict(Counter)
        n = agree = 0
        for rid, s_action in shadow[ref].items():
            if rid not in active:
                continue
            a_action = active[rid][1]
            n += 1
            confusion.setdefault(a_action, Counter())[s_action] += 1
            stats = per_cat[category.get(rid, "none")]
            stats[0] += 1
            if a_action == s_action:
                agree += 1
            else:
                stats[1] += 1
                cell = cells[f"{a_action}->{s_action}"]
                if len(cell) < examples:
                    cell.append(rid)
                rules[f"{a_action}->{s_action}"][f"{rule_of['active', rid]} -> {rule_of[ref, rid]}"] += 1
        comparisons.append(
            ShadowComparison(
                shadow=ref,
                requests=n,
                agreement=agree / n if n else 1.0,
                confusion={a: dict(c) for a, c in confusion.items()},
                by_category={
                    c: {"requests": float(t), "disagreements": float(d), "rate": d / t if t else 0.0}
                    for c, (t, d) in sorted(per_cat.items())
                },
                examples={k: tuple(v) for k, v in sorted(cells.items())},
                rules={k: dict(v) for k, v in sorted(rules.items())},
            )
        )
    return ComparisonReport(
        active=tuple(sorted({ref for ref, _ in active.values()})),
        requests=len(active),
        shadows=tuple(comparisons),
    )


def worst_action(actions: Iterable[Action]) -> Action:
    out = Action.ALLOW
    for a in actions:
        if _SEVERITY[a.value] > _SEVERITY[out.value]:
            out = a
    return out
