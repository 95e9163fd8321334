"""The decision log: every decision of every policy (active and shadow), unsampled, with no text.

Records are handed to ``DecisionLog.submit`` from the guard's ``finish`` hook and written as JSON lines by
one writer thread, so the request path never touches the disk. The queue is bounded: when it is full (the
disk is slow or failing) records are dropped and counted, never waited for. A ring of recent records stays
in memory for the admin comparison endpoint when no file is configured.

``compare`` turns records into the active-vs-shadow report: a confusion matrix of actions per shadow
policy, the disagreement rate by category, and example request ids. Each record carries the gateway's own
``exchange_id``, unique per exchange, and the comparison counts exchanges by it: the ``request_id`` is the
client's ``x-request-id`` when it sent one, and clients reuse those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import uuid
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
    """One line of the decision log: one policy's decision at one stage of one exchange."""

    request_id: str  # the client's x-request-id when it sent one, else the gateway's: not unique
    exchange_id: str  # the gateway's own id of the exchange (``new_exchange_id``): the records of one exchange share it
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

    @staticmethod
    def new_exchange_id() -> str:
        """An id for one exchange's records, unique to it whatever the client sends."""
        return uuid.uuid4().hex


def scores_of(signals: Signals) -> dict[str, float | str | None]:
    """The numbers of ``signals`` that a decision log keeps (no text, no embeddings)."""
    conv = signals.conversation
    return {
        "harm": round(signals.harm, 4),
        "jailbreak": round(signals.jailbreak, 4),
        "reply_harm": None if signals.reply_harm is None else round(signals.reply_harm, 4),
        "joined_reply_harm": None if signals.joined_reply_harm is None else round(signals.joined_reply_harm, 4),
        "history_harm": round(signals.history_harm, 4),
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


def record_of(
    decision: Decision, signals: Signals, *, request_id: str, exchange_id: str, tenant: str, role: Role
) -> DecisionRecord:
    return DecisionRecord(
        request_id=request_id,
        exchange_id=exchange_id,
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


INPUT_ONLY = "shadow's reply stage not run: the active policy blocked at input"


@dataclass(frozen=True)
class ShadowComparison:
    """Active vs one shadow policy over the exchanges both decided."""

    shadow: str  # name@version
    requests: int  # exchanges
    agreement: float
    confusion: Mapping[str, Mapping[str, int]]  # active action -> shadow action -> count
    by_category: Mapping[str, Mapping[str, float]]  # category -> {requests, disagreements, rate}
    examples: Mapping[str, tuple[str, ...]]  # "active->shadow" -> request ids (disagreements only)
    # "active->shadow" -> "active rule -> shadow rule" -> requests: which rules each disagreement comes from (the rule
    # of the stage that set each side's action; "-" where no rule matched)
    rules: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # Exchanges the active policy blocked at input and this shadow did not: no reply existed, so the shadow's output
    # rules never ran and its action there is its input decision alone (INPUT_ONLY), not what the client would have
    # got. In total, and per "active->shadow" cell.
    input_only: int = 0
    input_only_cells: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ComparisonReport:
    active: tuple[str, ...]  # name@version of the active policies seen
    requests: int  # exchanges
    shadows: tuple[ShadowComparison, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        lines = [f"requests: {self.requests}   active: {', '.join(self.active) or '-'}"]
        if not self.shadows:
            lines.append("no shadow decisions in the log")
        for sc in self.shadows:
            lines += ["", f"shadow {sc.shadow}: {sc.requests} requests, agreement {sc.agreement:.1%}"]
            if sc.input_only:
                lines.append(f"  {sc.input_only} input-only ({INPUT_ONLY}): the shadow's action there is its input "
                             "decision alone")  # fmt: skip
            lines.append("  active \\ shadow " + "".join(f"{a:>8}" for a in ACTIONS))
            for a in ACTIONS:
                row = sc.confusion.get(a, {})
                lines.append(f"  {a:<16}" + "".join(f"{row.get(b, 0):>8}" for b in ACTIONS))
            lines.append("  disagreement by category:")
            for cat, st in sorted(sc.by_category.items(), key=lambda kv: -kv[1]["rate"]):
                lines.append(f"    {cat:<28}{int(st['disagreements']):>6}/{int(st['requests']):<6}{st['rate']:>8.1%}")
            for cell, ids in sc.examples.items():
                lines.append(f"  e.g. {cell}: {', '.join(ids)}")
                if n := sc.input_only_cells.get(cell, 0):
                    total = sum(sc.rules.get(cell, {}).values())
                    lines.append(f"      input-only: {n} of {total} ({INPUT_ONLY})")
                for pair, count in sorted(sc.rules.get(cell, {}).items(), key=lambda kv: -kv[1]):
                    lines.append(f"      {count:>6}  rules {pair}")
        return "\n".join(lines)


def _worst(a: str | None, b: str) -> str:
    return b if a is None or _SEVERITY.get(b, 0) > _SEVERITY.get(a, 0) else a


def compare(records: Iterable[Mapping[str, Any]], *, examples: int = 5) -> ComparisonReport:
    """Compare each shadow policy with the active one, exchange by exchange.

    An exchange is the records that share an ``exchange_id`` (a log written before records had one: a
    ``request_id``, so exchanges that share a client's x-request-id count as one). A policy's action on an exchange
    is its most severe action over the exchange's stages (input, output), as the client would have experienced it;
    the category is the active policy's input category. Where the active policy blocked at input, a shadow that did
    not has no output stage to go by: such exchanges are counted as ``input_only``. Examples are request ids, with
    the exchange id where the log holds more than one exchange under that request id.
    """
    active: dict[str, tuple[str, str]] = {}  # exchange -> (policy ref, action)
    category: dict[str, str] = {}
    shadow: dict[str, dict[str, str]] = defaultdict(dict)  # shadow ref -> exchange -> action
    rule_of: dict[tuple[str, str], str] = {}  # (policy ref or "active", exchange) -> the rule behind its action
    request_of: dict[str, str] = {}  # exchange -> request id
    blocked_at_input: set[str] = set()  # exchanges the active policy blocked at input
    replied: set[tuple[str, str]] = set()  # (shadow ref, exchange) with a decision past the input stage
    for rec in records:
        xid = str(rec.get("exchange_id") or rec["request_id"])
        request_of[xid] = str(rec["request_id"])
        ref = f"{rec.get('policy', '?')}@{rec.get('version', '?')}"
        action = str(rec["action"])
        rule = str(rec.get("rule") or "-")
        if rec.get("role") == "shadow":
            worse = _worst(shadow[ref].get(xid), action)
            if worse != shadow[ref].get(xid):
                rule_of[ref, xid] = rule
            shadow[ref][xid] = worse
            if rec.get("stage") != "input":
                replied.add((ref, xid))
        else:
            prev = active.get(xid)
            worse = _worst(prev[1] if prev else None, action)
            if prev is None or worse != prev[1]:
                rule_of["active", xid] = rule
            active[xid] = (ref, worse)
            if rec.get("stage") == "input" or xid not in category:
                category[xid] = str(rec.get("category") or "none")
            if rec.get("stage") == "input" and action == "block":
                blocked_at_input.add(xid)
    shared = Counter(request_of.values())
    comparisons = []
    for ref in sorted(shadow):
        confusion: dict[str, Counter[str]] = {a: Counter() for a in ACTIONS}
        per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        cells: dict[str, list[str]] = defaultdict(list)
        rules: dict[str, Counter[str]] = defaultdict(Counter)
        input_only: Counter[str] = Counter()
        n = agree = 0
        for xid, s_action in shadow[ref].items():
            if xid not in active:
                continue
            a_action = active[xid][1]
            n += 1
            confusion.setdefault(a_action, Counter())[s_action] += 1
            stats = per_cat[category.get(xid, "none")]
            stats[0] += 1
            if a_action == s_action:
                agree += 1
                continue
            stats[1] += 1
            key = f"{a_action}->{s_action}"
            if len(cells[key]) < examples:
                rid = request_of[xid]
                cells[key].append(rid if shared[rid] == 1 else f"{rid} (exchange {xid})")
            rules[key][f"{rule_of['active', xid]} -> {rule_of[ref, xid]}"] += 1
            if xid in blocked_at_input and (ref, xid) not in replied:
                input_only[key] += 1
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
                input_only=sum(input_only.values()),
                input_only_cells=dict(sorted(input_only.items())),
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
