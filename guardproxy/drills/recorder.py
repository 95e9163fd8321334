"""The guard's entry point to drills: sample an exchange and queue it, without ever waiting."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence

from guardproxy.drills.record import DrillRecord, PolicyDecision, from_exchange
from guardproxy.drills.redaction import Redactor
from guardproxy.drills.sampling import REASONS, Sampler, SamplingConfig, conversation_sensitive
from guardproxy.drills.store import DrillStore, open_store
from guardproxy.drills.store.base import MetricsLike
from guardproxy.pipeline import Exchange
from guardproxy.settings import Settings
from guardproxy.signals import ConversationSignals, Signals

log = logging.getLogger(__name__)

_SAMPLED, _SAMPLED_DOC = "guardproxy_drill_samples", "exchanges sampled as drills, by reason"
_CAPPED, _CAPPED_DOC = "guardproxy_drill_samples_capped", "drill samples turned down by a cap"


class DrillRecorder:
    """Samples guarded exchanges into the drill store.

    ``submit`` runs on the event loop from the guard's ``finish`` hook: a keyed hash, a few comparisons,
    a counter and a non-blocking ``put`` on the store's bounded queue. Redaction and the database write
    happen on the store's writer thread. It returns whether the record was queued and never raises.
    """

    def __init__(self, store: DrillStore, sampler: Sampler, *, metrics: MetricsLike | None = None) -> None:
        self.store = store
        self.sampler = sampler
        self.sampled: Tally[str] = Tally()  # reason -> exchanges sampled for it
        self.capped: Tally[str] = Tally()  # cap -> exchanges a cap turned down
        self._metrics = metrics
        if metrics is not None:
            store.bind_metrics(metrics)
            for reason in REASONS:  # at 0 from the start, so rate() and absent() alerts work before a first sample
                metrics.counter(_SAMPLED, _SAMPLED_DOC, ["reason"]).labels(reason)
            for cap in ("tenant_cap", "hourly_budget"):
                metrics.counter(_CAPPED, _CAPPED_DOC, ["reason"]).labels(cap)

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: MetricsLike | None = None) -> DrillRecorder:
        d = settings.drills
        store = open_store(
            d.store,
            redactor=Redactor(d.redact_patterns, hash_only=d.hash_only),
            queue_size=d.queue_size,
            retention_days=d.retention_days,
            metrics=metrics,
        )
        config = SamplingConfig(
            rate=d.sample_rate,
            unreadable_rate=d.unreadable_sample_rate,
            per_tenant_hourly_cap=d.per_tenant_hourly_cap,
            hourly_budget=d.hourly_budget,
        )
        return cls(store, Sampler(config, secret=d.sample_secret.get_secret_value()), metrics=metrics)

    async def start(self) -> None:
        await self.store.start()

    def conversation_sensitive(
        self,
        low: ConversationSignals,
        high: ConversationSignals,
        thresholds: Iterable[Mapping[str, float]] = (),
        harm: float = 1.0,
    ) -> bool:
        """``sampling.conversation_sensitive`` with this recorder's sampling rules."""
        return conversation_sensitive(self.sampler.config, low, high, thresholds, harm)

    async def aclose(self) -> None:
        await self.store.aclose()

    def submit(self, record: DrillRecord) -> bool:
        """Sample ``record`` (its ``reasons`` are filled here) and queue it. Never blocks, never raises."""
        try:
            decision = self.sampler.decide(record)
            if decision.capped:
                self.capped[decision.capped] += 1
                self._count(_CAPPED, _CAPPED_DOC, decision.capped)
            if not decision.sampled:
                return False
            for reason in decision.reasons:
                self.sampled[reason] += 1
                self._count(_SAMPLED, _SAMPLED_DOC, reason)
            return self.store.submit(dataclasses.replace(record, reasons=decision.reasons))
        except Exception:  # the request path must never fail for drills
            log.exception("drill recorder: submit failed")
            return False

    def submit_exchange(
        self,
        exchange: Exchange,
        signals: Signals,
        active: PolicyDecision,
        shadows: Sequence[PolicyDecision] = (),
        *,
        thresholds: Mapping[str, float] | None = None,
        family: str | None = None,
    ) -> bool:
        """Build the record of a finished exchange and ``submit`` it."""
        try:
            record = from_exchange(exchange, signals, active, shadows, thresholds=thresholds, family=family)
        except Exception:
            log.exception("drill recorder: could not build the record of %s", exchange.request_id)
            return False
        return self.submit(record)

    def _count(self, name: str, doc: str, label: str) -> None:
        if self._metrics is not None:
            self._metrics.counter(name, doc, ["reason"]).labels(label).inc()
