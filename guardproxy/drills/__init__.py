"""Shadow drills: sample live guarded exchanges for human review, and turn reviews into drill sets.

- ``record``: ``DrillRecord`` (one exchange as a reviewer needs it), ``PolicyDecision``, ``from_exchange``.
- ``sampling``: which exchanges are sampled and why (keyed hash, rules, hourly caps).
- ``redaction``: credentials always, PII by setting, or hashes only; applied before anything is written.
- ``store``: SQLite / PostgreSQL behind one writer thread (``open_store(url)``).
- ``recorder``: ``DrillRecorder.submit`` for the guard's finish hook: never blocks, never raises.
- ``review``: the review web page (``review_routes``); ``export`` and ``report`` for the CLI.
"""

from __future__ import annotations

from guardproxy.drills.record import LABELS, DrillRecord, PolicyDecision, from_exchange
from guardproxy.drills.recorder import DrillRecorder
from guardproxy.drills.redaction import Redactor
from guardproxy.drills.sampling import Sampler, SamplingConfig
from guardproxy.drills.store import DrillFilter, DrillStore, StoredDrill, open_store

__all__ = [
    "LABELS",
    "DrillFilter",
    "DrillRecord",
    "DrillRecorder",
    "DrillStore",
    "PolicyDecision",
    "Redactor",
    "Sampler",
    "SamplingConfig",
    "StoredDrill",
    "from_exchange",
    "open_store",
]
