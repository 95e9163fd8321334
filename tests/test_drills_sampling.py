"""Sampling rules, table-driven: which exchanges become drills, and why."""

from __future__ import annotations

import dataclasses

import pytest

from guardproxy.drills.record import DrillRecord, PolicyDecision
from guardproxy.drills.sampling import Sampler, SamplingConfig, conversation_sensitive, keyed_fraction, reasons_for
from guardproxy.signals import ConversationSignals

ALLOW = PolicyDecision("default", "1", "allow")
BLOCK = PolicyDecision("default", "1", "block", rule="harm", category="violent_crimes")
FLAG = PolicyDecision("default", "1", "flag")
SHADOW_BLOCK = PolicyDecision("strict", "1", "block")
SHADOW_ALLOW = PolicyDecision("strict", "1", "allow")


def rec(**kw: object) -> DrillRecord:
    base: dict[str, object] = {
        "request_id": "req-1",
        "tenant": "t1",
        "messages": ({"role": "user", "content": "hello"},),
        "signals": {"harm": 0.01},
        "thresholds": {"harm": 0.5},
    }
    base.update(kw)
    return DrillRecord(**base)  # type: ignore[arg-type]


NO_BASE = SamplingConfig(rate=0.0)
CASES = [
    ("plain allow, no base rate", rec(), NO_BASE, ()),
    ("base rate 1 samples everything", rec(), SamplingConfig(rate=1.0), ("base_rate",)),
    ("blocked always", rec(active=BLOCK, signals={"harm": 0.99}), NO_BASE, ("blocked",)),
    ("flagged always", rec(active=FLAG, signals={"harm": 0.2}), NO_BASE, ("flagged",)),
    ("harm just under threshold", rec(signals={"harm": 0.45}), NO_BASE, ("uncertain",)),
    ("harm just over threshold, allowed", rec(signals={"harm": 0.55}), NO_BASE, ("uncertain",)),
    ("harm far from threshold", rec(signals={"harm": 0.3}), NO_BASE, ()),
    ("other thresholds count too", rec(signals={"harm": 0.0, "escalation": 0.62}, thresholds={"escalation": 0.6}),
     NO_BASE, ("uncertain", "escalation")),
    ("shadow would block", rec(shadows=(SHADOW_BLOCK,)), NO_BASE, ("disagreement",)),
    ("shadow agrees", rec(shadows=(SHADOW_ALLOW,)), NO_BASE, ()),
    ("active blocks, shadow allows", rec(active=BLOCK, signals={"harm": 0.9}, shadows=(SHADOW_ALLOW,)), NO_BASE,
     ("blocked", "disagreement")),
    ("upstream refused a benign request", rec(refusal="full"), NO_BASE, ("false_refusal",)),
    ("partial refusal of a benign request", rec(refusal="partial"), NO_BASE, ("false_refusal",)),
    ("refusal of a harmful request is not false", rec(refusal="full", signals={"harm": 0.9}), NO_BASE, ()),
    ("policy's own refusal is not a false refusal",
     rec(refusal="full", reply_from_policy=True, active=BLOCK, signals={"harm": 0.9}), NO_BASE, ("blocked",)),
    ("escalating conversation", rec(signals={"harm": 0.1, "escalation": 0.7}), NO_BASE, ("escalation",)),
    ("rephrase after refusal", rec(signals={"harm": 0.3, "rephrase_similarity": 0.9, "refusal_events": 1.0}),
     NO_BASE, ("rephrase",)),
    ("a harmless request near a refused one", rec(signals={"harm": 0.1, "rephrase_similarity": 0.9,
     "refusal_events": 1.0}), NO_BASE, ()),
    # the similarity is to the tenant's refusals in any conversation: a fresh conversation that rewords one counts
    ("similar to a refusal in another conversation",
     rec(signals={"harm": 0.3, "rephrase_similarity": 0.9, "refusal_events": 0.0}), NO_BASE, ("rephrase",)),
    ("not similar enough", rec(signals={"harm": 0.3, "rephrase_similarity": 0.3, "refusal_events": 1.0}),
     NO_BASE, ()),
    ("no thresholds: harm 0.5 assumed", rec(signals={"harm": 0.5}, thresholds={}), NO_BASE, ("uncertain",)),
    ("classifier failed, fail-open allowed it", rec(signals={"harm": 0.0, "classifier_failed": 1.0}), NO_BASE,
     ("guard_failed",)),
    ("state backend failed", rec(signals={"harm": 0.0, "state_failed": 1.0}), NO_BASE, ("guard_failed",)),
    ("a turn the model cannot read", rec(signals={"harm": 0.1, "unreadable": 0.9}),
     SamplingConfig(rate=0.0, unreadable_rate=1.0), ("unreadable",)),
    ("one it cannot read, unreadable rate 0", rec(signals={"harm": 0.1, "unreadable": 0.9}),
     SamplingConfig(rate=0.0, unreadable_rate=0.0), ()),
    ("one it can read", rec(signals={"harm": 0.1, "unreadable": 0.2}),
     SamplingConfig(rate=0.0, unreadable_rate=1.0), ()),
]  # fmt: skip


@pytest.mark.parametrize(("name", "record", "config", "expected"), CASES, ids=[c[0] for c in CASES])
def test_reasons(name: str, record: DrillRecord, config: SamplingConfig, expected: tuple[str, ...]) -> None:
    sampler = Sampler(config, secret=b"k")
    decision = sampler.decide(record)
    assert decision.reasons == expected
    assert decision.sampled == bool(expected)


def test_keyed_hash_is_deterministic_and_secret_dependent() -> None:
    ids = [f"req-{i}" for i in range(2000)]
    a = [keyed_fraction(b"secret-a", i) for i in ids]
    assert a == [keyed_fraction(b"secret-a", i) for i in ids]
    b = [keyed_fraction(b"secret-b", i) for i in ids]
    assert a != b
    # without the secret a client cannot tell which ids escape review: the rate is what it says
    rate = sum(x < 0.1 for x in a) / len(a)
    assert 0.07 < rate < 0.13


def test_base_rate_agrees_across_replicas_sharing_the_secret() -> None:
    config = SamplingConfig(rate=0.3)
    r1, r2 = Sampler(config, secret="shared"), Sampler(config, secret="shared")
    ids = [f"id-{i}" for i in range(300)]
    picks1 = [r1.decide(rec(request_id=i)).sampled for i in ids]
    picks2 = [r2.decide(rec(request_id=i)).sampled for i in ids]
    assert picks1 == picks2 and any(picks1) and not all(picks1)


def test_empty_secret_is_random_per_process() -> None:
    config = SamplingConfig(rate=0.5)
    ids = [f"id-{i}" for i in range(200)]
    picks1 = [reasons_for(rec(request_id=i), config, keyed_fraction(Sampler(config)._secret, i)) for i in ids]
    picks2 = [reasons_for(rec(request_id=i), config, keyed_fraction(Sampler(config)._secret, i)) for i in ids]
    assert picks1 != picks2


@pytest.mark.parametrize(
    ("tenant_cap", "budget", "tenants", "expected_sampled", "expected_capped"),
    [
        (3, 100, ["a"] * 10, 3, {"tenant_cap": 7}),
        (3, 100, ["a"] * 5 + ["b"] * 5, 6, {"tenant_cap": 4}),
        (100, 4, ["a", "b", "c"] * 3, 4, {"hourly_budget": 5}),
        (0, 100, ["a"], 0, {"tenant_cap": 1}),
    ],
)
def test_caps(tenant_cap: int, budget: int, tenants: list[str], expected_sampled: int, expected_capped: dict[str, int]):
    now = [1000.0 * 3600]
    sampler = Sampler(
        SamplingConfig(rate=0.0, per_tenant_hourly_cap=tenant_cap, hourly_budget=budget), clock=lambda: now[0]
    )
    sampled = 0
    capped: dict[str, int] = {}
    for i, tenant in enumerate(tenants):
        d = sampler.decide(rec(request_id=str(i), tenant=tenant, active=BLOCK, signals={"harm": 0.9}))
        sampled += d.sampled
        if d.capped:
            capped[d.capped] = capped.get(d.capped, 0) + 1
    assert sampled == expected_sampled
    assert capped == expected_capped


def test_caps_reset_on_the_next_hour() -> None:
    now = [10 * 3600 + 10.0]
    sampler = Sampler(SamplingConfig(rate=0.0, per_tenant_hourly_cap=1), clock=lambda: now[0])
    blocked = rec(active=BLOCK, signals={"harm": 0.9})
    assert sampler.decide(blocked).sampled
    assert not sampler.decide(dataclasses.replace(blocked, request_id="x")).sampled
    now[0] += 3600
    assert sampler.decide(dataclasses.replace(blocked, request_id="y")).sampled


# --- conversation_sensitive: may a lower bound of the conversation signals stand in for the value? ---------------

LOW = ConversationSignals(escalation=0.1, refusal_events=1, rephrase_similarity=0.0)
SENSITIVE = [
    ("nothing between the two", LOW, (), False),
    ("escalation could reach the stratum", dataclasses.replace(LOW, escalation=0.6), (), True),
    ("escalation stays under it", dataclasses.replace(LOW, escalation=0.45), (), False),
    ("similarity could reach the rephrase stratum", dataclasses.replace(LOW, rephrase_similarity=1.0), (), True),
    ("similarity after a refusal in another conversation",
     ConversationSignals(escalation=0.1, rephrase_similarity=1.0), (), True),
    ("escalation could come near a policy's threshold", dataclasses.replace(LOW, escalation=0.45),
     ({"escalation": 0.5},), True),
    ("escalation stays far under it", dataclasses.replace(LOW, escalation=0.25), ({"escalation": 0.5},), False),
]  # fmt: skip


@pytest.mark.parametrize(("name", "high", "thresholds", "expected"), SENSITIVE, ids=[c[0] for c in SENSITIVE])
def test_conversation_sensitive(
    name: str, high: ConversationSignals, thresholds: tuple[dict[str, float], ...], expected: bool
) -> None:
    assert conversation_sensitive(SamplingConfig(), LOW, high, thresholds) is expected


def test_an_exchange_under_the_rephrase_harm_cannot_enter_the_rephrase_stratum() -> None:
    high = dataclasses.replace(LOW, rephrase_similarity=1.0)
    config = SamplingConfig()
    assert conversation_sensitive(config, LOW, high, (), harm=config.rephrase_harm_min)
    assert not conversation_sensitive(config, LOW, high, (), harm=config.rephrase_harm_min - 0.01)


def test_conversation_sensitive_inside_a_band_is_not() -> None:
    near = ConversationSignals(escalation=0.45)
    assert not conversation_sensitive(
        SamplingConfig(escalation_min=0.9), near, dataclasses.replace(near, escalation=0.55), [{"escalation": 0.5}]
    )
