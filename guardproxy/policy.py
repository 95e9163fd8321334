"""Policies as files: TOML validated by pydantic, turned into allow / flag / block decisions.

A policy is a pure function of ``signals.Signals``: the guard computes the signals once per exchange
and every policy (the active one and any shadows) decides on the same object. Evaluation order, per
stage (documented in ``policies/README.md``):

1. the classifier failed → ``on_classifier_failure`` decides alone (the scores are meaningless);
2. otherwise the stage's rules (``input_rules`` or ``output_rules``) in file order: the first rule whose
   every condition holds decides; none matching means ``allow``;
3. on the output stage, a final plain reply that is a false refusal of a very-low-harm request may ask
   for one retry (``output.retry_on_false_refusal``, off by default) when no rule blocked;
4. the state backend failed → ``fail_closed`` blocks, ``fail_open`` raises the result to at least
   ``flag`` (the per-turn scores still count; only the conversation signals are missing).

``load_policy`` raises ``PolicyError`` (a ``ConfigError``) listing every problem as ``file:line: field:
message``; ``check_policy_file`` returns the same list without raising, ``try_load_policy`` the policy or that list.
Field errors do not hide the checks across fields (duplicate ids, a missing default text, dead rules). Which
policies are in force (active, shadows, per tenant or model, reload) is ``guardproxy.policyset``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from guardproxy.errors import PolicyError
from guardproxy.pipeline import Action, Verdict
from guardproxy.settings import PROJECT_ROOT
from guardproxy.signals import ConversationSignals, RefusalClass, Signals
from guardproxy.taxonomy import CATEGORY_IDS
from guardproxy.tomllines import KeyLines

SCHEMA_VERSION = 1

HEADER_DECISION = "x-guardproxy-decision"
HEADER_POLICY = "x-guardproxy-policy"
HEADER_FLAG = "x-guardproxy-flag"

# Rule ids the engine itself uses in decisions (never valid in a file: they are reserved).
RULE_CLASSIFIER_FAILURE = "classifier_failure"
RULE_STATE_FAILURE = "state_failure"
RULE_RETRY = "retry_on_false_refusal"
_RESERVED_RULE_IDS = {RULE_CLASSIFIER_FAILURE, RULE_STATE_FAILURE, RULE_RETRY}

Stage = Literal["input", "output"]
History = Literal["verified", "unverified", "forged", "none"]


class FailMode(StrEnum):
    FAIL_OPEN = "fail_open"  # allow, flag, count
    FAIL_CLOSED = "fail_closed"  # block with the policy's failure message


class Delivery(StrEnum):
    REPLY = "reply"  # an OpenAI-shaped assistant message carrying the refusal text
    ERROR = "error"  # an OpenAI error body with the configured status code


def _known_category(value: str) -> str:
    if value not in CATEGORY_IDS:
        raise ValueError(f"unknown category {value!r}; known: {', '.join(CATEGORY_IDS)}")
    return value


def _refusal_key(value: str) -> str:
    if value != "default" and value not in CATEGORY_IDS:
        raise ValueError(f"unknown category {value!r}; use 'default' or one of: {', '.join(CATEGORY_IDS)}")
    return value


CategoryId = Annotated[str, AfterValidator(_known_category)]
RefusalKey = Annotated[str, AfterValidator(_refusal_key)]
# Numbers and booleans are strict: a TOML string ("0.5", "true") where one is required is a mistake in the file, not
# a value to convert (and true is not the number 1).
Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
Number = Annotated[float, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]
StatusCode = Annotated[int, Field(ge=400, le=599, strict=True)]
REFUSAL_MIN_CHARS = 40


def _written(text: str) -> str:
    # Blanks are not a text: 45 spaces pass a plain min_length and a blocked user reads an empty message.
    if (n := len(text.strip())) < REFUSAL_MIN_CHARS:
        raise ValueError(
            f"String should have at least {REFUSAL_MIN_CHARS} characters, not counting blanks at either end (has {n})"
        )
    return text


# A refusal text short enough to be one canned sentence is what this product warns against.
RefusalText = Annotated[str, Field(max_length=4000), AfterValidator(_written)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputCondition(_Strict):
    """Conditions over the input-side signals; every one that is set must hold (an empty table always matches)."""

    harm_at_least: Probability | None = None
    harm_below: Probability | None = None
    category_in: tuple[CategoryId, ...] | None = None
    category_not_in: tuple[CategoryId, ...] | None = None
    jailbreak_at_least: Probability | None = None
    unreadable_at_least: Probability | None = None
    history_harm_at_least: Probability | None = None
    escalation_at_least: Probability | None = None
    window_harm_at_least: Probability | None = None
    trajectory_at_least: Annotated[float, Field(ge=0.0, strict=True)] | None = None
    trend_at_least: Number | None = None
    refusal_events_at_least: Annotated[int, Field(ge=0, strict=True)] | None = None
    rephrase_similarity_at_least: Annotated[float, Field(ge=-1.0, le=1.0, strict=True)] | None = None
    history_in: tuple[History, ...] | None = None
    turn_at_least: Annotated[int, Field(ge=0, strict=True)] | None = None

    def matches(self, s: Signals, harm_threshold: float, *, final: bool = True) -> bool:
        checks: list[bool] = [
            self.harm_at_least is None or s.harm >= self.harm_at_least,
            self.harm_below is None or s.harm < self.harm_below,
            self.category_in is None or s.category in self.category_in,
            self.category_not_in is None or s.category not in self.category_not_in,
            self.jailbreak_at_least is None or s.jailbreak >= self.jailbreak_at_least,
            self.unreadable_at_least is None or s.unreadable >= self.unreadable_at_least,
            self.history_harm_at_least is None or s.history_harm >= self.history_harm_at_least,
        ]
        return all(checks) and self.conversation_matches(s.conversation)

    def conversation_matches(self, conv: ConversationSignals) -> bool:
        """The conditions on the conversation tracker's signals alone."""
        checks: list[bool] = [
            self.escalation_at_least is None or conv.escalation >= self.escalation_at_least,
            self.window_harm_at_least is None or conv.window_harm >= self.window_harm_at_least,
            self.trajectory_at_least is None or conv.trajectory >= self.trajectory_at_least,
            self.trend_at_least is None or conv.trend >= self.trend_at_least,
            self.refusal_events_at_least is None or conv.refusal_events >= self.refusal_events_at_least,
            self.rephrase_similarity_at_least is None or conv.rephrase_similarity >= self.rephrase_similarity_at_least,
            self.history_in is None or conv.history in self.history_in,
            self.turn_at_least is None or conv.turn_index >= self.turn_at_least,
        ]
        return all(checks)


class OutputCondition(InputCondition):
    """Input conditions plus the reply's own signals. ``refusal_in`` and ``false_refusal`` only match on the
    final check of a reply: the refusal class of half a reply is not settled."""

    reply_harm_at_least: Probability | None = None
    joined_reply_harm_at_least: Probability | None = None
    refusal_in: tuple[RefusalClass, ...] | None = None
    false_refusal: Flag | None = None

    def matches(self, s: Signals, harm_threshold: float, *, final: bool = True) -> bool:
        if not super().matches(s, harm_threshold, final=final):
            return False
        if self.reply_harm_at_least is not None and (s.reply_harm is None or s.reply_harm < self.reply_harm_at_least):
            return False
        joined = self.joined_reply_harm_at_least
        if joined is not None and (s.joined_reply_harm is None or s.joined_reply_harm < joined):
            return False
        needs_final = self.refusal_in is not None or self.false_refusal is not None
        if needs_final and (not final or s.refusal is None):
            return False
        if self.refusal_in is not None and s.refusal not in self.refusal_in:
            return False
        return self.false_refusal is None or s.false_refusal(harm_threshold) == self.false_refusal


RuleId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]


class _Rule(_Strict):
    id: RuleId
    action: Action
    when: InputCondition
    description: str = ""
    reply: RefusalText | None = None  # overrides the per-category refusal text when this rule blocks
    delivery: Delivery | None = None  # None: the policy's [block] delivery
    status_code: StatusCode | None = None


class InputRule(_Rule):
    pass


class OutputRule(_Rule):
    when: OutputCondition


class BlockSettings(_Strict):
    delivery: Delivery = Delivery.REPLY
    status_code: StatusCode = 400


class OutputSettings(_Strict):
    check_chars: Annotated[int, Field(ge=16, le=65536, strict=True)] = 256
    retry_on_false_refusal: Flag = False
    retry_below_harm: Probability = 0.05
    retry_note: Annotated[str, Field(min_length=20, max_length=2000)] = (
        "The previous answer declined a request that appears to be harmless. If the request is safe to help "
        "with, answer it directly and helpfully; decline only the parts that would cause real harm, and say why."
    )


class FailureMessages(_Strict):
    classifier: RefusalText = (
        "This request could not be checked by the safety service right now, and this deployment does not "
        "forward unchecked requests. Please try again in a moment; nothing about your request was judged."
    )
    state: RefusalText = (
        "The conversation could not be checked against its history right now, and this deployment does not "
        "continue unchecked conversations. Please try again in a moment."
    )


class Policy(_Strict):
    """One policy file. Decisions come from ``decide_input`` and ``decide_output``."""

    schema_version: Literal[1]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    description: str = ""
    harm_threshold: Probability  # below it a full/partial refusal is a false refusal
    on_classifier_failure: FailMode
    on_state_failure: FailMode
    flag_header: Flag = False  # add x-guardproxy-flag: <rule id> to flagged replies
    block: BlockSettings = BlockSettings()
    output: OutputSettings = OutputSettings()
    failure_messages: FailureMessages = FailureMessages()
    refusals: dict[RefusalKey, RefusalText]
    input_rules: tuple[InputRule, ...] = ()
    output_rules: tuple[OutputRule, ...] = ()

    _source: Path | None = PrivateAttr(None)
    _lines: KeyLines | None = PrivateAttr(None)
    _thresholds: dict[str, float] | None = PrivateAttr(None)
    _lowest: dict[str, float | None] = PrivateAttr(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def source(self) -> Path | None:
        return self._source

    def line_of(self, loc: Iterable[str | int]) -> int:
        """The line of a key (a pydantic-style loc) in the file this policy was loaded from; 1 when unknown."""
        return self._lines.line_of(loc) if self._lines is not None else 1

    def thresholds(self) -> dict[str, float]:
        """Per signal, the lowest threshold of a block rule that tests that signal alone (``harm`` defaults to
        ``harm_threshold``): where "near a threshold" is for drill sampling. Compound rules are left out. Computed
        once (the policy is immutable); a copy each call."""
        if self._thresholds is None:
            out: dict[str, float] = {}
            for rule in (*self.input_rules, *self.output_rules):
                conditions = rule.when.model_dump(exclude_none=True)
                if rule.action is not Action.BLOCK or len(conditions) != 1:
                    continue
                ((key, value),) = conditions.items()
                if key.endswith("_at_least") and isinstance(value, float):
                    name = key.removesuffix("_at_least")
                    out[name] = min(out.get(name, value), value)
            out.setdefault("harm", self.harm_threshold)
            self._thresholds = out
        return dict(self._thresholds)

    def lowest_line(self, signal: str) -> float | None:
        """The lowest ``{signal}_at_least`` of any rule, whatever its action or other conditions (for ``harm``, the
        policy's ``harm_threshold`` too); None when no rule reads the signal. An early exit reports estimates capped
        below some line (``guardproxy.early_exit``): a request under a policy that looks beneath it runs the whole
        model. Computed once per signal (the policy is immutable)."""
        if signal not in self._lowest:
            key = f"{signal}_at_least"
            rules = (*self.input_rules, *self.output_rules)
            lines = [v for rule in rules if (v := getattr(rule.when, key, None)) is not None]
            if signal == "harm":
                lines.append(self.harm_threshold)
            self._lowest[signal] = min(lines) if lines else None
        return self._lowest[signal]

    def conversation_sensitive(self, low: ConversationSignals, high: ConversationSignals, harm: float = 1.0) -> bool:
        """Whether some rule's conversation conditions hold on ``high`` and not on ``low``, among the rules a request
        of harm at most ``harm`` can match (a rule with ``harm_at_least`` above it cannot). Every conversation
        condition is a lower bound (``history_in`` aside, which reads a field the two share), so when this is False,
        any signals between the two (each field at least ``low``'s and at most ``high``'s) match the same rules as
        ``low``, whatever the other conditions read, for any harm up to ``harm``.
        The tracker asks this before it skips the whole model's pass that rephrase similarity needs (early exit):
        an exited turn's harm is the head's estimate, under the head's line, so a rephrase rule that also asks a
        harm at or above that line cannot match on it."""
        rules = (*self.input_rules, *self.output_rules)
        return any(
            r.when.conversation_matches(high)
            and not r.when.conversation_matches(low)
            and (r.when.harm_at_least is None or r.when.harm_at_least <= harm)
            for r in rules
        )

    def refusal_text(self, category: str) -> str:
        return self.refusals.get(category) or self.refusals["default"]

    def decide_input(self, signals: Signals) -> Decision:
        return self._decide("input", self.input_rules, signals, final=True, may_retry=False)

    def decide_output(self, signals: Signals, *, final: bool, may_retry: bool = True) -> Decision:
        """``may_retry`` is False on the streaming path and after one retry: the caller knows, the policy doesn't."""
        return self._decide("output", self.output_rules, signals, final=final, may_retry=may_retry)

    def _decide(self, stage: Stage, rules: Sequence[_Rule], s: Signals, *, final: bool, may_retry: bool) -> Decision:
        if s.classifier_failed:
            return self._failure(stage, s, RULE_CLASSIFIER_FAILURE, self.on_classifier_failure)
        decision = self._rules(stage, rules, s, final=final)
        if decision is None and stage == "output" and final and may_retry:
            decision = self._retry(s)
        if decision is None:
            decision = self._make(stage, Action.ALLOW, None, s, reason="no rule matched")
        if s.state_failed:
            if self.on_state_failure is FailMode.FAIL_CLOSED:
                return self._failure(stage, s, RULE_STATE_FAILURE, self.on_state_failure)
            if decision.action is Action.ALLOW:
                return self._make(stage, Action.FLAG, RULE_STATE_FAILURE, s, reason="state backend failed: fail_open")
        return decision

    def _rules(self, stage: Stage, rules: Sequence[_Rule], s: Signals, *, final: bool) -> Decision | None:
        for rule in rules:
            if not rule.when.matches(s, self.harm_threshold, final=final):
                continue
            if rule.action is not Action.BLOCK:
                return self._make(stage, rule.action, rule.id, s, reason=rule.description or f"rule {rule.id}")
            delivery = rule.delivery or self.block.delivery
            status = (rule.status_code or self.block.status_code) if delivery is Delivery.ERROR else None
            return self._make(
                stage,
                Action.BLOCK,
                rule.id,
                s,
                reason=rule.description or f"rule {rule.id}",
                reply_text=rule.reply or self.refusal_text(s.category),
                status_code=status,
            )
        return None

    def _retry(self, s: Signals) -> Decision | None:
        out = self.output
        # Never for anything near the threshold: retry_below_harm <= harm_threshold is checked at load time.
        if not out.retry_on_false_refusal or s.refusal not in ("partial", "full") or s.harm >= out.retry_below_harm:
            return None
        return self._make(
            "output", Action.FLAG, RULE_RETRY, s, reason="false refusal of a very-low-harm request: retry once",
            retry_note=out.retry_note,
        )  # fmt: skip

    def _failure(self, stage: Stage, s: Signals, rule: str, mode: FailMode) -> Decision:
        what = "classifier" if rule == RULE_CLASSIFIER_FAILURE else "state backend"
        if mode is FailMode.FAIL_OPEN:
            return self._make(stage, Action.FLAG, rule, s, reason=f"{what} failed: fail_open")
        text = self.failure_messages.classifier if rule == RULE_CLASSIFIER_FAILURE else self.failure_messages.state
        delivery = self.block.delivery
        return self._make(
            stage,
            Action.BLOCK,
            rule,
            s,
            reason=f"{what} failed: fail_closed",
            reply_text=text,
            status_code=self.block.status_code if delivery is Delivery.ERROR else None,
        )

    def _make(
        self,
        stage: Stage,
        action: Action,
        rule: str | None,
        s: Signals,
        *,
        reason: str,
        reply_text: str | None = None,
        status_code: int | None = None,
        retry_note: str | None = None,
    ) -> Decision:
        return Decision(
            policy=self.name,
            version=self.version,
            stage=stage,
            action=action,
            rule=rule,
            category=s.category,
            reply_text=reply_text,
            status_code=status_code,
            retry_note=retry_note,
            reason=reason,
            flag_header=self.flag_header,
        )


@dataclass(frozen=True)
class Decision:
    """What one policy decided at one stage. ``rule`` is None when no rule matched (default allow)."""

    policy: str
    version: str
    stage: Stage
    action: Action
    rule: str | None
    category: str
    reply_text: str | None = None
    status_code: int | None = None
    retry_note: str | None = None
    reason: str = ""
    flag_header: bool = False

    @property
    def policy_ref(self) -> str:
        return f"{self.policy}@{self.version}"

    def verdict(self) -> Verdict:
        """The client-facing verdict of an active decision (shadow decisions never become verdicts)."""
        notes = {HEADER_DECISION: self.action.value, HEADER_POLICY: self.policy_ref}
        if self.action is Action.FLAG and self.flag_header and self.rule:
            notes[HEADER_FLAG] = self.rule
        return Verdict(
            action=self.action,
            reason=self.reason,
            category=self.category,
            reply_text=self.reply_text,
            status_code=self.status_code,
            annotations=notes,
            retry_note=self.retry_note,
        )


# --- loading and checking ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy (or mapping) file."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        if self.line <= 0:  # no line to point at (the file cannot be read): no made-up one
            return f"{self.file}: {self.field + ': ' if self.field else ''}{self.message}"
        return f"{self.file}:{self.line}: {self.field or '(file)'}: {self.message}"


def field_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
}


def _message(err: Mapping[str, Any]) -> str:
    msg = _MESSAGES.get(str(err["type"]), str(err["msg"]))
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if err["type"] in _STRICT_TYPES and isinstance(err.get("input"), str):
        msg += f", not the string {err['input']!r}: numbers and true/false are written without quotes"
    last = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "extra_forbidden" and last in _OUTPUT_ONLY:
        msg += f" here: {last} is an output condition and belongs in output_rules"
    if err["type"] == "missing" and last.startswith("on_") and last.endswith("_failure"):
        msg += ": every policy states 'fail_open' or 'fail_closed'"
    return msg


_STRICT_TYPES = frozenset({"float_type", "int_type", "bool_type"})
_OUTPUT_ONLY = frozenset(OutputCondition.model_fields) - frozenset(InputCondition.model_fields)


_Loc = tuple[str | int, ...]


def _valid(adapter: TypeAdapter[Any], value: Any) -> Any:
    """``value`` validated on its own, or None where it fails (field validation reports that failure)."""
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


_PROBABILITY: TypeAdapter[float] = TypeAdapter(Probability)
_RULE_ID: TypeAdapter[str] = TypeAdapter(RuleId)
_ACTION: TypeAdapter[Action] = TypeAdapter(Action)
_CONDITIONS: dict[str, TypeAdapter[InputCondition]] = {
    "input_rules": TypeAdapter(InputCondition),
    "output_rules": TypeAdapter(OutputCondition),
}
_BLOCK_ONLY = ("reply", "delivery", "status_code")


def _semantic_issues(data: Mapping[str, Any]) -> list[tuple[_Loc, str]]:
    """Cross-field checks pydantic's per-field validation cannot express, with the loc they belong to.

    They read the file's data with each part they need validated on its own, so a field error elsewhere (a typo in
    one rule) does not hide them; a check whose own fields are broken is skipped, field validation has said why."""
    issues: list[tuple[_Loc, str]] = []
    refusals = data.get("refusals")
    if isinstance(refusals, dict) and "default" not in refusals:
        issues.append((("refusals",), "a 'default' refusal text is required (used for categories without one)"))
    threshold: float | None = _valid(_PROBABILITY, data.get("harm_threshold"))
    output = data.get("output")
    output = output if isinstance(output, dict) else {}
    retry_below: float | None = _valid(_PROBABILITY, output.get("retry_below_harm", OutputSettings().retry_below_harm))
    if threshold is not None and retry_below is not None and retry_below > threshold:
        issues.append((("output", "retry_below_harm"), f"must not exceed harm_threshold ({threshold})"))
    seen: dict[str, _Loc] = {}
    for stage, condition in _CONDITIONS.items():
        raw = data.get(stage, [])
        rules = [r if isinstance(r, dict) else {} for r in raw] if isinstance(raw, list) else []
        live: list[tuple[str, InputCondition]] = []  # (id, when) of the earlier rules that can match
        for i, rule in enumerate(rules):
            loc: _Loc = (stage, i, "id")
            rule_id: str | None = _valid(_RULE_ID, rule.get("id"))
            if rule_id in _RESERVED_RULE_IDS:
                issues.append((loc, f"rule id {rule_id!r} is reserved for the engine"))
            elif rule_id is not None and rule_id in seen:
                issues.append((loc, f"duplicate rule id {rule_id!r}"))
            if rule_id is not None:
                seen.setdefault(rule_id, loc)
            action: Action | None = _valid(_ACTION, rule.get("action"))
            if action not in (None, Action.BLOCK) and any(rule.get(k) is not None for k in _BLOCK_ONLY):
                issues.append(((stage, i, "action"), "reply, delivery and status_code only apply to block rules"))
            when: InputCondition | None = _valid(condition, rule.get("when"))
            if when is None:
                continue
            dead = _never_matches(when, threshold)
            issues += [((stage, i, "when", name), why) for name, why in dead]
            # First match wins, so a rule that an earlier, broader rule always pre-empts is dead: almost always a
            # flag rule written above the block rule it was meant to back up.
            earlier = next((rid for rid, w in live if _covers(w, when)), None)
            if earlier is not None:
                issues.append(
                    ((stage, i, "when"), f"can never match: rule {earlier!r} comes first and matches whenever "
                     "this one would (first match wins; put the narrower rule first)")
                )  # fmt: skip
            if not dead:
                live.append((str(rule.get("id")), when))
    return issues


def _never_matches(when: InputCondition, harm_threshold: float | None) -> list[tuple[str, str]]:
    """The conditions of one ``when`` that no signals satisfy, as (condition, why): a rule with any is dead wherever
    it stands (a typo must not silently disable a rule)."""
    out: list[tuple[str, str]] = []
    values = when.model_dump(exclude_none=True)
    for name, value in values.items():
        if name.endswith("_in") and not name.endswith("_not_in") and not value:
            out.append((name, "can never match: an empty list matches no value (leave the condition out to match any)"))
        elif name.endswith("_below") and (low := values.get(name.removesuffix("_below") + "_at_least")) is not None:
            if low >= value:
                out.append((name, f"can never match: no value is at least {low:g} and below {value:g}"))
        elif name.endswith("_not_in") and (wanted := values.get(name.removesuffix("_not_in") + "_in")):
            both = [v for v in wanted if v in value]
            if len(both) == len(wanted):
                out.append((name, f"can never match: it excludes every value {name.replace('_not_in', '_in')} allows"))
            elif both:
                out.append((name, f"{', '.join(map(repr, both))} is in both {name.replace('_not_in', '_in')} and "
                            f"{name}: one of them is a mistake"))  # fmt: skip
    if values.get("false_refusal") is True:
        # a false refusal is a partial or full refusal of a request whose harm is below harm_threshold
        refusals = values.get("refusal_in")
        if refusals is not None and not {"partial", "full"} & set(refusals):
            out.append(("false_refusal", "can never match: a false refusal is a partial or full refusal, and "
                        f"refusal_in allows only {', '.join(map(repr, refusals)) or 'nothing'}"))  # fmt: skip
        low = values.get("harm_at_least")
        if harm_threshold is not None and low is not None and low >= harm_threshold:
            out.append(("false_refusal", f"can never match: a false refusal needs harm below harm_threshold "
                        f"({harm_threshold:g}), and harm_at_least is {low:g}"))  # fmt: skip
    return out


def _covers(a: InputCondition, b: InputCondition) -> bool:
    """Whether every signal set that satisfies ``b`` also satisfies ``a`` (so ``a`` listed first shadows ``b``)."""
    mine, theirs = a.model_dump(exclude_none=True), b.model_dump(exclude_none=True)
    for name, value in mine.items():
        other = theirs.get(name)
        if other is None:
            return False
        if name.endswith("_at_least"):
            ok = other >= value
        elif name == "harm_below":
            ok = other <= value
        elif name == "category_not_in":
            ok = set(other) >= set(value)
        elif name.endswith("_in"):
            ok = set(other) <= set(value)
        else:  # false_refusal
            ok = other == value
        if not ok:
            return False
    return True


def resolve_policy_path(path: str | Path) -> Path:
    """Where an explicit policy path points: as given when that exists (a relative path from the current directory);
    else a relative path from the project root, where the default ``policies/default.toml`` comes from, when there
    is such a file; else as given (and reading it fails naming it)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    shipped = PROJECT_ROOT / path
    return shipped if shipped.is_file() else path


def read_toml(path: Path) -> tuple[dict[str, Any] | None, str, list[PolicyIssue]]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, "", [PolicyIssue(name, 0, "", f"cannot read file: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        return None, "", [PolicyIssue(name, 0, "", f"cannot read file: not UTF-8: {exc.reason} at byte {exc.start}")]
    try:
        return tomllib.loads(text), text, []
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(m.group(1)) if m else 0
        return None, text, [PolicyIssue(name, line, "", f"TOML syntax error: {exc}")]


def validation_issues(name: str, lines: KeyLines, exc: ValidationError) -> list[PolicyIssue]:
    return [
        PolicyIssue(name, lines.line_of(err["loc"]), field_path(err["loc"]), _message(err))
        for err in exc.errors(include_url=False)
    ]


def check_policy_file(path: str | Path) -> list[PolicyIssue]:
    """Every problem in a policy file, each with file, line and field; an empty list means it is valid. A relative
    path is found as ``resolve_policy_path`` says."""
    return try_load_policy(path)[1]


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy file; raises ``PolicyError`` listing every problem. A relative path is found as
    ``resolve_policy_path`` says."""
    policy, issues = try_load_policy(path)
    if issues or policy is None:
        raise PolicyError([str(i) for i in issues], where=str(path))
    return policy


def try_load_policy(path: str | Path) -> tuple[Policy | None, list[PolicyIssue]]:
    """The policy in a file and no issues, or None and every problem (a file that cannot be read: one issue at line
    0). A relative path is found as ``resolve_policy_path`` says."""
    path = resolve_policy_path(path)
    data, text, issues = read_toml(path)
    if data is None:
        if not path.is_absolute() and not path.exists():
            issues = [replace(i, message=f"{i.message} (nor under {PROJECT_ROOT})") for i in issues]
        return None, issues
    lines = KeyLines(text)
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        issues = validation_issues(str(path), lines, exc)
    # also after field errors: a typo in one rule must not hide a duplicate id or a missing default text
    issues += [PolicyIssue(str(path), lines.line_of(loc), field_path(loc), msg) for loc, msg in _semantic_issues(data)]
    if issues or policy is None:
        return None, issues
    policy._source = path.resolve()
    policy._lines = lines
    return policy, []
