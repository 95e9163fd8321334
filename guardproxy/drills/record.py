"""What one drill holds: a guarded exchange as a reviewer (and the next drill set) needs it.

A ``DrillRecord`` is built once per guarded exchange by the guard's ``finish`` hook (``from_exchange``),
handed to ``DrillRecorder.submit`` and, if sampled, redacted and written by the store's writer thread.
It stores no credentials: the exchange's headers are never copied, the tenant is already a hash, and the request's
own keys (``REQUEST_SECRETS``), which ride along to the store's writer thread so the redactor can cut them out of
the texts exactly, are dropped by the redactor before the write.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from guardproxy.pipeline import Exchange
from guardproxy.signals import Signals

# The key of ``Exchange.state`` under which the gateway leaves the request's own keys (``proxy.request_secrets``: the
# caller's key as sent, the gateway's upstream key): a key known exactly is cut exactly, whatever its shape.
REQUEST_SECRETS = "request_secrets"

Label = Literal["correct_refusal", "missed_harm", "false_refusal", "correct_answer", "unclear"]
LABELS: tuple[Label, ...] = ("correct_refusal", "missed_harm", "false_refusal", "correct_answer", "unclear")
LABEL_TITLES: Mapping[str, str] = {
    "correct_refusal": "Correct refusal",
    "missed_harm": "Missed harm (should have refused)",
    "false_refusal": "False refusal",
    "correct_answer": "Correct answer",
    "unclear": "Unclear",
}


@dataclass(frozen=True)
class StageDecision:
    """What one policy decided at one stage of the exchange: the input check, or the output check of a reply."""

    stage: str  # input | output
    action: str  # allow | flag | block
    rule: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"stage": self.stage, "action": self.action, "rule": self.rule}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageDecision:
        return cls(stage=str(data.get("stage", "")), action=str(data.get("action", "allow")), rule=data.get("rule"))


@dataclass(frozen=True)
class PolicyDecision:
    """One policy's decision on the exchange (the active one, or a shadow).

    ``action``, ``rule`` and ``category`` are the exchange's decision: the output check's when it was more severe
    than the input check's, else the input's (``GuardCheck._combined``). ``stages`` keeps what each stage decided,
    so an output rule that was no more severe is not lost: an input ``flag-jailbreak`` and an output
    ``flag-false-refusal`` both show, though the client's ``x-guardproxy-flag`` header names the second. Empty for
    drills recorded before stages were kept (2026-12-07)."""

    policy: str
    version: str
    action: str  # allow | flag | block
    rule: str | None = None
    category: str | None = None
    stages: tuple[StageDecision, ...] = ()

    @property
    def rules(self) -> tuple[str, ...]:
        """The rule ids every stage matched, in stage order, each once; ``rule`` alone for an older drill."""
        found = [s.rule for s in self.stages if s.rule] if self.stages else [self.rule] if self.rule else []
        return tuple(dict.fromkeys(found))

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "version": self.version,
            "action": self.action,
            "rule": self.rule,
            "category": self.category,
            "stages": [s.as_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyDecision:
        return cls(
            policy=str(data.get("policy", "")),
            version=str(data.get("version", "")),
            action=str(data.get("action", "allow")),
            rule=data.get("rule"),
            category=data.get("category"),
            stages=tuple(StageDecision.from_dict(s) for s in data.get("stages") or ()),
        )


NO_POLICY = PolicyDecision(policy="none", version="", action="allow")


@dataclass(frozen=True)
class DrillRecord:
    """One guarded exchange, as sampled for review.

    ``signals`` are numbers only (harm, jailbreak, reply_harm, escalation, ...); the refusal class is
    ``refusal``. ``thresholds`` are the active policy's thresholds for the same signal names, which the
    sampler's uncertainty rule and the review page use. ``replies`` are the upstream's reply texts per
    choice; or the policy's own text alone when the policy blocked the request (``reply_from_policy``); or,
    when the policy blocked the upstream's reply at the output check (``reply_replaced``), the upstream's
    texts per choice followed by the policy's text the client got instead. ``reasons`` is why it was sampled;
    the recorder fills it.
    """

    request_id: str
    tenant: str
    messages: tuple[Mapping[str, Any], ...]
    replies: tuple[str, ...] = ()
    signals: Mapping[str, float] = field(default_factory=dict)
    refusal: str | None = None
    category: str = "none"  # hazard category (guardproxy.taxonomy) the guard saw
    active: PolicyDecision = NO_POLICY
    shadows: tuple[PolicyDecision, ...] = ()
    reasons: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    reply_from_policy: bool = False
    model: str | None = None
    family: str | None = None  # groups rephrasings of one request, where the caller knows them
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    hashed: bool = False  # texts are sha256 digests (settings.drills.hash_only)
    # The conversation's history as the tracker read it (``ConversationSignals.history``): verified, unverified,
    # forged or none; the evidence behind a forged-history rule (with ``signals["history_harm"]``). None for drills
    # recorded before it was kept.
    history: str | None = None
    # the request's own keys, for the redactor to cut out; ``Redactor.record`` empties it, so it is never stored
    secrets: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.category == "none" and self.active.category:
            object.__setattr__(self, "category", self.active.category)

    @property
    def reply_replaced(self) -> bool:
        """Whether the active policy blocked the upstream's reply at the output check and the policy's text went to
        the client instead: then ``replies[-1]`` is that text and ``upstream_replies`` what the upstream wrote.

        Read from what is stored (no column says it): a block that is not the input's (``reply_from_policy``)
        is the output's, and a blocking policy always has a text (``policy.RefusalText``), which ``from_exchange``
        appends after the upstream's choices."""
        return not self.reply_from_policy and self.active.action == "block" and len(self.replies) >= 2

    @property
    def upstream_replies(self) -> tuple[str, ...]:
        """The upstream's reply texts per choice (none when the request was blocked before it)."""
        if self.reply_from_policy:
            return ()
        return self.replies[:-1] if self.reply_replaced else self.replies

    @property
    def delivered_status(self) -> int | None:
        """The HTTP status the policy's text went back with when its block was delivered as an error (``[block]
        delivery = "error"``): then the client got an error, not a reply. None: delivered as a reply."""
        status = self.signals.get("delivered_status")
        return int(status) if status else None

    @property
    def harm(self) -> float:
        return float(self.signals.get("harm", 0.0))

    def user_texts(self) -> list[str]:
        return [message_text(m) for m in self.messages if m.get("role") == "user"]

    def last_user_text(self) -> str:
        texts = self.user_texts()
        return texts[-1] if texts else ""


def label_conflict(record: DrillRecord, label: str) -> str | None:
    """Why ``label`` contradicts what ``record`` holds, or None. Decided only where the record settles it: a request
    the active policy blocked at the input check was neither answered nor let through ("correct answer", "missed
    harm"); an allowed exchange whose reply the guard read as no refusal refused nothing ("correct refusal",
    "false refusal"). The guard's refusal class can be wrong, so that message points to "unclear" and a note."""
    if record.reply_from_policy and label in ("correct_answer", "missed_harm"):
        return (
            "The policy blocked this request before the upstream saw it: nothing was answered. Label whether the "
            "block was right: correct refusal or false refusal."
        )
    if record.active.action != "block" and record.refusal == "none" and label in ("correct_refusal", "false_refusal"):
        return (
            "Nothing was refused here: the policy let the request through and the guard read the reply as an answer. "
            "Pick correct answer or missed harm; if the reply does refuse, pick unclear and say so in the note."
        )
    return None


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a chat message: a string, or the text parts of a content-part array."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(parts)
    return ""


def signals_dict(signals: Signals) -> dict[str, float]:
    """Flatten ``Signals`` into the numbers a drill keeps (the refusal class travels separately)."""
    conv = signals.conversation
    out = {
        "harm": signals.harm,
        "jailbreak": signals.jailbreak,
        "unreadable": signals.unreadable,
        "window_harm": conv.window_harm,
        "trajectory": conv.trajectory,
        "trend": conv.trend,
        "escalation": conv.escalation,
        "refusal_events": float(conv.refusal_events),
        "rephrase_similarity": conv.rephrase_similarity,
        "history_harm": signals.history_harm,
        "turn_index": float(conv.turn_index),
        "classifier_failed": float(signals.classifier_failed),
        "state_failed": float(signals.state_failed),
        "estimated": float(signals.estimated),
    }
    if signals.reply_harm is not None:
        out["reply_harm"] = signals.reply_harm
    if signals.joined_reply_harm is not None:
        out["joined_reply_harm"] = signals.joined_reply_harm
    return out


def from_exchange(
    exchange: Exchange,
    signals: Signals,
    active: PolicyDecision,
    shadows: Sequence[PolicyDecision] = (),
    *,
    thresholds: Mapping[str, float] | None = None,
    family: str | None = None,
) -> DrillRecord:
    """Build the record of a finished exchange (cheap: no copying of text beyond references)."""
    blocked = exchange.input_verdict is not None and exchange.input_verdict.blocks
    out_blocked = exchange.output_verdict is not None and exchange.output_verdict.blocks
    if blocked and exchange.input_verdict is not None and exchange.input_verdict.reply_text is not None:
        replies: tuple[str, ...] = (exchange.input_verdict.reply_text,)
        from_policy = True
    else:
        replies = tuple(exchange.reply_texts[k] for k in sorted(exchange.reply_texts))
        from_policy = False
        if out_blocked and exchange.output_verdict is not None and exchange.output_verdict.reply_text:
            # the reviewer sees what the upstream wrote and what the client got instead
            replies = (*replies, exchange.output_verdict.reply_text)
    model = exchange.body.get("model")
    numbers = signals_dict(signals)
    verdict = exchange.input_verdict if blocked else exchange.output_verdict if out_blocked else None
    if verdict is not None and verdict.status_code is not None and (blocked or not exchange.stream):
        # the policy's text went back as an HTTP error (a stream's output block is always text in the stream)
        numbers["delivered_status"] = float(verdict.status_code)
    if out_blocked and exchange.stream and replies and not from_policy:
        # the start of the reply reached the client before the check that blocked it (the review page shows it)
        numbers["relayed_chars"] = float(exchange.relayed_chars.get(min(exchange.reply_texts, default=0), 0))
    return DrillRecord(
        request_id=exchange.request_id,
        tenant=exchange.tenant,
        messages=tuple(m for m in exchange.messages if isinstance(m, dict)),
        replies=replies,
        signals=numbers,
        refusal=signals.refusal,
        category=active.category or signals.category or "none",
        active=active,
        shadows=tuple(shadows),
        thresholds=dict(thresholds or {}),
        reply_from_policy=from_policy,
        model=model if isinstance(model, str) else None,
        family=family,
        history=signals.conversation.history,
        secrets=tuple(exchange.state.get(REQUEST_SECRETS, ())),
    )
