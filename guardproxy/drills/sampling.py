"""Which guarded exchanges become drills.

Decided per exchange, in microseconds, on the event loop (no I/O):

- ``base_rate``: a keyed hash of the request id (HMAC-SHA256 with ``settings.drills.sample_secret``,
  random per process if empty) below ``rate``. Keyed so a client cannot pick request ids that escape
  review; deterministic so the same id gets the same answer on every replica sharing the secret.
- ``blocked`` / ``flagged``: always, when the active policy blocked or flagged.
- ``uncertain``: a signal within ``margin`` of its threshold in the active policy.
- ``disagreement``: a shadow policy decided a different action than the active one.
- ``false_refusal``: the upstream refused (partial or full) a request below the harm threshold.
- ``escalation``: the conversation's escalation score at or above ``escalation_min``.
- ``rephrase``: a request close to one refused earlier for its tenant, in this conversation or another
  (``rephrase_similarity`` at or above ``rephrase_min``; it is 0 while the tenant has no refusal in memory), with
  harm at least ``rephrase_harm_min``.
- ``guard_failed``: the classifier or the state backend failed, so the policy's fail mode decided
  (a fail-open exchange went through unjudged: a person should see some of them).
- ``unreadable``: a scored turn was mostly in scripts the guard model reads only letter by letter
  (``unreadable`` at or above ``signals.UNREADABLE``), for ``unreadable_rate`` of them (the same keyed
  hash): the model's verdict there is close to a guess, so people's labels are worth the most, and a
  labelled set of them is what a model that reads those scripts would be judged on.

Every reason is subject to the caps: at most ``per_tenant_hourly_cap`` drills per tenant and
``hourly_budget`` in all per clock hour, so one noisy client (even one that gets blocked a lot) cannot
flood the review queue. Caps are per process; with several replicas each keeps its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from guardproxy.drills.record import DrillRecord
from guardproxy.signals import UNREADABLE, ConversationSignals

REASONS: tuple[str, ...] = (
    "base_rate",
    "blocked",
    "flagged",
    "uncertain",
    "disagreement",
    "false_refusal",
    "escalation",
    "rephrase",
    "guard_failed",
    "unreadable",
)
DEFAULT_THRESHOLDS: Mapping[str, float] = {"harm": 0.5}


@dataclass(frozen=True)
class SamplingConfig:
    rate: float = 0.01
    margin: float = 0.1
    escalation_min: float = 0.5
    rephrase_min: float = 0.45  # projected space (guardproxy.embedding_projection): the raw space's 0.8
    # and at least this harm: a harmless request near a refused one is no probe worth a reviewer, and an exited turn
    # (whose estimate stays under the early-exit head's line, 0.15) then needs no whole-model pass for its similarity
    rephrase_harm_min: float = 0.15
    unreadable_rate: float = 0.1
    per_tenant_hourly_cap: int = 200
    hourly_budget: int = 2000


@dataclass(frozen=True)
class SampleDecision:
    sampled: bool
    reasons: tuple[str, ...]
    capped: str | None = None  # "tenant_cap" or "hourly_budget" when a cap turned it down


def keyed_fraction(secret: bytes, request_id: str) -> float:
    """A uniform number in [0, 1) from the request id, unpredictable without the secret."""
    digest = hmac.new(secret, request_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def reasons_for(record: DrillRecord, config: SamplingConfig, fraction: float) -> tuple[str, ...]:
    """The sampling rules that fire for ``record`` (pure; no caps)."""
    s = record.signals
    thresholds = record.thresholds or DEFAULT_THRESHOLDS
    harm_threshold = thresholds.get("harm", DEFAULT_THRESHOLDS["harm"])
    out: list[str] = []
    if fraction < config.rate:
        out.append("base_rate")
    if record.active.action == "block":
        out.append("blocked")
    elif record.active.action == "flag":
        out.append("flagged")
    if any(name in s and abs(s[name] - thr) <= config.margin for name, thr in thresholds.items()):
        out.append("uncertain")
    if any(d.action != record.active.action for d in record.shadows):
        out.append("disagreement")
    if not record.reply_from_policy and record.refusal in ("partial", "full") and record.harm < harm_threshold:
        out.append("false_refusal")
    if s.get("escalation", 0.0) >= config.escalation_min:
        out.append("escalation")
    # the tenant's refusals, in any conversation
    if s.get("rephrase_similarity", 0.0) >= config.rephrase_min and record.harm >= config.rephrase_harm_min:
        out.append("rephrase")
    if s.get("classifier_failed", 0.0) or s.get("state_failed", 0.0):
        out.append("guard_failed")
    if s.get("unreadable", 0.0) >= UNREADABLE and fraction < config.unreadable_rate:
        out.append("unreadable")
    return tuple(out)


def conversation_sensitive(
    config: SamplingConfig,
    low: ConversationSignals,
    high: ConversationSignals,
    thresholds: Iterable[Mapping[str, float]] = (),
    harm: float = 1.0,
) -> bool:
    """Whether sampling could treat an exchange whose conversation signals lie between ``low`` and ``high`` (each
    field) unlike one at ``low``, its harm at most ``harm``: the ``escalation`` and ``rephrase`` strata, and
    ``uncertain`` for escalation or rephrase similarity near one of ``thresholds`` (each a policy's
    ``Policy.thresholds()``). The question ``Policy.conversation_sensitive`` answers for a policy's rules."""
    rephrase_possible = harm >= config.rephrase_harm_min

    def strata(c: ConversationSignals) -> tuple[bool, bool]:
        return (
            c.escalation >= config.escalation_min,
            rephrase_possible and c.rephrase_similarity >= config.rephrase_min,
        )

    if strata(low) != strata(high):
        return True
    for th in thresholds:
        for name, a, b in (
            ("escalation", low.escalation, high.escalation),
            ("rephrase_similarity", low.rephrase_similarity, high.rephrase_similarity),
        ):
            if name not in th:
                continue
            lo, hi = th[name] - config.margin, th[name] + config.margin
            inside, outside = lo <= a and b <= hi, b < lo or a > hi
            if not (inside or outside):  # some value between a and b is near the threshold and some is not
                return True
    return False


class Sampler:
    """Sampling rules plus per-hour caps. Thread-safe; cheap enough to call on the event loop."""

    def __init__(
        self,
        config: SamplingConfig = SamplingConfig(),
        *,
        secret: bytes | str = b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        if isinstance(secret, str):
            secret = secret.encode()
        # An empty secret would make sampling predictable from outside: use a random one per process.
        self._secret = secret or secrets.token_bytes(32)
        self._mac = hmac.new(self._secret, digestmod=hashlib.sha256)  # keyed once; copied per request id
        self._clock = clock
        self._lock = threading.Lock()
        self._hour = -1
        self._total = 0
        self._per_tenant: dict[str, int] = {}

    def decide(self, record: DrillRecord) -> SampleDecision:
        mac = self._mac.copy()
        mac.update(record.request_id.encode("utf-8", "surrogatepass"))
        fraction = int.from_bytes(mac.digest()[:8], "big") / 2.0**64
        reasons = reasons_for(record, self.config, fraction)
        if not reasons:
            return SampleDecision(False, ())
        with self._lock:
            hour = int(self._clock() // 3600)
            if hour != self._hour:
                self._hour, self._total, self._per_tenant = hour, 0, {}
            used = self._per_tenant.get(record.tenant, 0)
            if used >= self.config.per_tenant_hourly_cap:
                return SampleDecision(False, reasons, capped="tenant_cap")
            if self._total >= self.config.hourly_budget:
                return SampleDecision(False, reasons, capped="hourly_budget")
            self._per_tenant[record.tenant] = used + 1
            self._total += 1
        return SampleDecision(True, reasons)
