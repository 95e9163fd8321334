"""The guard: classifier + conversation tracker + policies, plugged into the gateway's pipeline.

``GuardCheck`` implements ``pipeline.Check``. Per exchange it computes the signals once (``check_input``:
the texts the guard scores, the classifier's ``PromptScore``s, the conversation tracker's escalation
signals), hands the same ``signals.Signals`` to the active policy and to every shadow policy, and returns
only the active decision to the gateway. ``check_output`` scores (prompt, reply) pairs for refusal and
reply harm, and the reply read after the assistant replies just before it (``joined_reply``, ``joined_harm``), and
asks the policies again. ``finish`` (off the request path) writes every decision of every
policy to the decision log, counts them, updates the conversation tracker and hands the exchange to the
drills recorder.

What is scored: every user message and every tool result (untrusted input that can carry injected instructions):
string content, or every string of a content-part array, whatever the part's type, less binary payloads
(``guardproxy.untrusted``); and the rest of the request the model reads (``request_texts``: message names, tool and
schema descriptions, vLLM's documents and chat template, the prediction). System messages are the operator's and
are not scored unless ``score_system`` is set. The guard scores at most ``MAX_SCORED_TEXTS`` texts itself, the user
turns and the rest in separate classifier calls; a request with texts beyond the cap, or whose scoring failed in
part, keeps the scores that came back (``_partly``): a block they earn stands, anything milder gives way to the
policy's ``on_classifier_failure``. ``Signals.harm`` is the maximum over the turns the gateway has
not already checked: the conversation tracker scores the user turns a request adds to a conversation it knows
(all of them for one it does not: a history the gateway never saw may hide a harmful turn among fake
dialogue); tool results are scored here, the new ones only once the tracker vouches for the history. Without
a tracker every scored turn counts.

Assistant turns are read too where the gateway cannot vouch for them (``Signals.history_harm``, ``history_pairs``):
a client can write harmful assistance into the assistant's mouth (a prefilled "Sure, here is how...", a many-shot
fake dialogue) and ask a harmless "continue". Every assistant turn the tracker did not find relayed
(``Observation.unverified``; every one without a tracker or when its state failed), and on a relayed turn the text
its HMAC does not bind (``integrity.unbound_text``: a ``reasoning_content`` a client added), is scored as a reply
to the user turn before it: the reply head only (one pair pass over the head of the text, not the windows the
output check reads), cached by content in the classifier, so a conversation's unverified turns cost one pass each
while they stay in its history. A verified history costs no text extraction and no scoring, however long. At most
``MAX_HISTORY_REPLIES`` texts per request, newest first; texts beyond them count as unscored, as texts beyond
``MAX_SCORED_TEXTS`` do.

Failure paths, each explicit: the classifier raising or timing out sets ``classifier_failed`` (also when it
fails inside the tracker); the state backend failing sets ``state_failed``; each policy's
``on_classifier_failure`` / ``on_state_failure`` decides. Reply scoring that failed once is not tried again in
the same exchange, so a hung classifier costs a stream at most one timeout on input and one on output.

``build_guard(settings)`` wires the parts from settings and returns a ``GuardBundle``: the pipeline, the routes
(``guardproxy.admin``: POST /guard/admin/reload, GET /guard/admin/compare; the drills review page) and
``reload()`` / ``areload()`` for SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from guardproxy.conversation.integrity import message_text, unbound_text
from guardproxy.conversation.tracker import ConversationTracker as StateTracker
from guardproxy.conversation.tracker import Observation, subkey_of
from guardproxy.decisions import DecisionLog, DecisionRecord, record_of
from guardproxy.drills.record import PolicyDecision, StageDecision
from guardproxy.errors import ClassifierPartial, StateBackendError
from guardproxy.pipeline import Action, Early, Exchange, Pipeline, Verdict
from guardproxy.policy import HEADER_DECISION, HEADER_POLICY, Decision, Policy
from guardproxy.policyset import PolicySet, ReloadResult
from guardproxy.signals import UNREADABLE, Classifier, ConversationSignals, PromptScore, ReplyScore, Signals
from guardproxy.untrusted import content_strings, request_field_texts

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from guardproxy.early_exit import ExitSpec
    from guardproxy.metrics import Metrics
    from guardproxy.settings import Settings

log = logging.getLogger(__name__)

STATE_KEY = "guardproxy.guard"
_SEVERITY = {Action.ALLOW: 0, Action.FLAG: 1, Action.BLOCK: 2}


# --- the seams to the parts written beside this one ------------------------------------------------------


@runtime_checkable
class ConversationTracker(Protocol):
    """What the guard needs from ``guardproxy.conversation`` (its ``ConversationTracker``).

    ``observe`` scores the user turns this request adds to a known conversation (all of them for an unknown one)
    and returns them with the escalation signals; it raises whatever the classifier raises, and reports a state
    backend failure as ``state_failed`` instead of raising; it adds its own stage times (``state_lookup``,
    ``state_store``) to ``timings``, the exchange's. ``record_reply`` records what the client got (the
    reply text, the policy's refusal text, or None for an error status) so the next request can verify it.
    """

    async def observe(
        self,
        tenant: str,
        subkey: str | None,
        messages: Sequence[Any],
        *,
        defer_window: bool = False,
        exact: bool = False,
        timings: dict[str, float] | None = None,
    ) -> Observation: ...

    async def record_reply(
        self,
        tenant: str,
        subkey: str | None,
        messages: Sequence[Any],
        reply_text: str | Mapping[str, Any] | None,
        *,
        refused: bool,
        observation: Observation | None = None,
    ) -> bool: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class DrillSink(Protocol):
    """What the guard needs from ``guardproxy.drills`` (``DrillRecorder``): a non-blocking hand-off of one
    finished exchange with every policy's decision; it samples, redacts and stores off the request path."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def conversation_sensitive(
        self,
        low: ConversationSignals,
        high: ConversationSignals,
        thresholds: Iterable[Mapping[str, float]] = (),
        harm: float = 1.0,
    ) -> bool:
        """Whether sampling could treat conversation signals between ``low`` and ``high`` unlike ``low``, given the
        policies' drill ``thresholds``, for an exchange of harm at most ``harm``."""
        ...

    def submit_exchange(
        self,
        exchange: Exchange,
        signals: Signals,
        active: PolicyDecision,
        shadows: Sequence[PolicyDecision] = (),
        *,
        thresholds: Mapping[str, float] | None = None,
        family: str | None = None,
    ) -> bool: ...


def drill_decision(decision: Decision, stages: Sequence[Decision] = ()) -> PolicyDecision:
    """The drill's copy of one policy's ``decision`` on an exchange, with what it decided at each of ``stages``."""
    return PolicyDecision(
        policy=decision.policy,
        version=decision.version,
        action=decision.action.value,
        rule=decision.rule,
        category=decision.category,
        stages=tuple(StageDecision(d.stage, d.action.value, d.rule) for d in stages),
    )


# --- what gets scored ------------------------------------------------------------------------------------


# the guard's event counters (name, help), registered when the guard is built
_GUARD_COUNTERS = {
    "classifier_failures": ("guardproxy_classifier_failures", "classifier calls that raised or timed out"),
    "state_failures": ("guardproxy_guard_state_failures", "conversation state calls that failed"),
    "unreadable": (
        "guardproxy_unreadable_requests",
        "requests with a scored turn mostly in scripts the guard model reads only letter by letter",
    ),
    "reply_unread": (
        "guardproxy_reply_unread",
        "replies longer than the output check reads (classifier.MAX_REPLY_WINDOWS): their rest was relayed unread",
    ),
}

# Which policies a replica enforces, and the reloads it refused (the policy files stay as they were).
_POLICY_INFO = (
    "guardproxy_policy_info",
    "policies loaded, 1 per role (active or shadow), name, version and digest (sha256 of the parsed policy, 8 hex)",
    ("role", "name", "version", "digest"),
)
_RELOAD_FAILURES = ("guardproxy_policy_reload_failures", "policy reloads rejected: the old policies stayed in force")

_SCORED_ROLES = frozenset({"user", "tool", "function"})
# The most texts the guard scores itself for one request (tool results, system messages with ``score_system``, user
# turns when no tracker scores them): user turns first, then the rest, newest first. Scoring is bounded by what one
# classifier call finishes within ``guard.timeout`` (a few ms a text on two CPU cores); a request with more is
# partly scored, as when part of its scoring fails (``_partly``): a block the scored texts earn stands, otherwise
# the policy's ``on_classifier_failure`` decides, so texts beyond the cap never pass silently.
MAX_SCORED_TEXTS = 64
# The guard waits this much longer for a classifier call (or the tracker's answer) than the call's own deadline
# (guard.timeout), so that a call timing out part way answers with what it read (``ClassifierPartial``) before the
# guard gives up on it: the tracker's state read comes before its call, and backend_timeout bounds it (0.05 s).
PARTIAL_MARGIN_S = 0.25
# The most assistant texts of a request's history the guard reads as replies (``history_pairs``), newest first: 32
# holds a many-shot fake dialogue of 30 pairs, and one pair pass of 32 fits ``guard.timeout`` on two CPU cores. A
# request with more is partly scored (``_partly``), so the older ones never pass silently either.
MAX_HISTORY_REPLIES = 32
_SCORED_ROLES_WITH_SYSTEM = _SCORED_ROLES | {"system", "developer"}
# How many assistant replies before a reply the output check reads together with it (``joined_reply``,
# ``Signals.joined_reply_harm``): a procedure asked for one step a turn ("and then?", "go on") comes in pieces that
# each read harmless; three turns hold a short one, and the joined text stays within a few pair passes.
JOINED_REPLY_TURNS = 2
# The joined text counts only where the earlier replies, read together without the new one, stay under the reply
# harm operating point (``joined_harm``); they are read only when the joined text reaches it (rarely: 4.5% of the
# calibration split's harmless replies), so most checks cost no extra pass.
JOINED_EARLIER_LINE = 0.5


@dataclass(frozen=True)
class ScoredText:
    index: int  # position of the message in ``messages``; -1 for a request field (``request_texts``)
    # user | tool | function | system | developer; "parts": what the tracker does not read of a user message's
    # content parts; "request": text of the request outside its messages' content; "user-run": consecutive user
    # messages joined (``user_runs``), at the index of the run's last
    role: str
    text: str
    new: bool  # after the last assistant message: not checked by an earlier request


def scored_texts(
    messages: Sequence[Any], *, score_system: bool = False, old_user_turns: bool = True
) -> list[ScoredText]:
    """Every user message and tool result (and system message if asked) with non-empty text, in order.

    A message's text is its string content or every string its content parts carry, whatever the part's declared
    type, less binary payloads (``untrusted.content_strings``): a ``thinking`` part's thinking, a ``tool_reference``'s
    name; a part the guard skipped would be a side door.
    ``old_user_turns=False`` (a tracker scores the user turns) leaves out the user messages before the last
    assistant message but the last one (the prompt of a reply when no new user turn came): the conversation tracker
    scores user turns from its own state, and their text, which grows with the history, would be extracted on every
    request for nothing. The strings of a user message's parts that the tracker does not read come as a text of
    their own (role ``parts``), which the guard scores.
    """
    roles = _SCORED_ROLES_WITH_SYSTEM if score_system else _SCORED_ROLES
    found = [m.get("role") if isinstance(m, dict) else None for m in messages]  # every request: one pass of C calls
    last_assistant = next((i for i in range(len(found) - 1, -1, -1) if found[i] == "assistant"), -1)
    last_user = next((i for i in range(len(found) - 1, -1, -1) if found[i] == "user"), -1)
    out = []
    for i, role in enumerate(found):
        if type(role) is not str or role not in roles:
            continue
        content = messages[i].get("content")
        if not old_user_turns and role == "user" and i < last_assistant and i != last_user:
            # an old turn's parts the tracker does not read are still the guard's (an unverified history's are
            # scored); a string content, the common case, has none
            other = content_strings(content)[1] if isinstance(content, list) else []
            if other:
                out.append(ScoredText(i, "parts", "\n".join(other), False))
            continue
        tracked, other = content_strings(content)
        if not old_user_turns and role == "user":
            if tracked:
                out.append(ScoredText(i, role, "\n".join(tracked), i > last_assistant))
            if other:
                out.append(ScoredText(i, "parts", "\n".join(other), i > last_assistant))
        elif tracked or other:
            out.append(ScoredText(i, role, "\n".join([*tracked, *other]), i > last_assistant))
    out.extend(user_runs(messages, found, last_assistant, old_user_turns=old_user_turns))
    return out


def user_runs(
    messages: Sequence[Any], roles: Sequence[Any], last_assistant: int, *, old_user_turns: bool = True
) -> list[ScoredText]:
    """Each run of two or more user messages with no assistant message between them, joined as one text (role
    ``user-run``). The upstream model reads such a run as one ask (a chat template sets the messages one after
    another), while the guard scores each message alone and the conversation window reads only the last few: an
    ask split into five or more short user messages passed every per-turn check and the window (a red-team
    walkthrough, 2026-12-08). ``old_user_turns=False``: only the run after the last assistant message (the tracker
    vouches for the older ones, scored when they were new)."""
    out = []
    run: list[int] = []
    for i in range(len(roles) + 1):
        role = roles[i] if i < len(roles) else "assistant"  # the end closes the last run
        if role == "user":
            run.append(i)
            continue
        if role != "assistant" or len(run) < 2:
            if role == "assistant":
                run = []
            continue
        if old_user_turns or run[-1] > last_assistant:
            texts = ["\n".join(content_strings(messages[j].get("content"))[0]) for j in run]
            joined = "\n".join(t for t in texts if t.strip())
            if joined:
                out.append(ScoredText(run[-1], "user-run", joined, run[-1] > last_assistant))
        run = []
    return out


def request_texts(
    body: Mapping[str, Any], messages: Sequence[Any], *, score_system: bool = False, score_schemas: bool = False
) -> list[ScoredText]:
    """The untrusted text of a request outside its messages' content (``untrusted.request_field_texts``: names, vLLM's
    documents and chat template, the prediction; tool and schema descriptions with ``score_schemas``), as texts the
    guard scores on every request (the classifier's cache makes a repeated tool list free)."""
    texts = request_field_texts(body, messages, with_system=score_system, with_schemas=score_schemas)
    return [ScoredText(-1, "request", t, True) for t in texts]


def capped(texts: Sequence[ScoredText], cap: int) -> list[ScoredText]:
    """At most ``cap`` of ``texts``, in order: the newest user turns (the ask), then the newest of the rest."""
    if len(texts) <= cap:
        return list(texts)
    users = [t for t in texts if t.role == "user"][-cap:] if cap > 0 else []
    others = [t for t in texts if t.role != "user"]
    room = cap - len(users)
    keep = {id(t) for t in (*users, *(others[len(others) - room :] if room > 0 else ()))}
    return [t for t in texts if id(t) in keep]


def history_pairs(
    messages: Sequence[Any], unverified: Sequence[int] | None, limit: int
) -> tuple[list[tuple[str, str]], bool]:
    """The (prompt, reply) pairs of a request's history that the guard reads, newest first, at most ``limit``, and
    whether there were more: each assistant message at a position in ``unverified`` (every one when None: no
    tracker vouches for any) as the guard model reads it, and of every assistant message the text its position's
    HMAC does not bind (``integrity.unbound_text``), each with the user turn before it as the prompt; a text with no
    letter or digit is left out. A relayed message of role and string content costs a look at its keys: a verified
    history's text is not extracted."""
    suspect = None if unverified is None else frozenset(unverified)
    out: list[tuple[str, str]] = []
    # every request: one pass of C calls over the roles (the gateway rejects a message that is not an object)
    assistant = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    for i in reversed(assistant):
        m = messages[i]
        whole = suspect is None or i in suspect
        if not whole and m.keys() <= _PLAIN_KEYS and type(m.get("content")) is str:
            continue  # the common relayed turn: nothing the HMAC does not bind
        # a text without a letter or digit (a tool call's "{}") carries no assistance to read
        texts = [t for t in ([message_text(m)] if whole else []) + [unbound_text(m)] if _has_words(t)]
        if not texts:
            continue
        if len(out) + len(texts) > limit:
            return out, True
        prompt = _user_before(messages, i)
        out += [(prompt, t) for t in texts]
    return out, False


_PLAIN_KEYS = frozenset({"role", "content"})


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _user_before(messages: Sequence[Any], i: int) -> str:
    """The text of the last user message before message ``i`` ("" when there is none)."""
    for j in range(i - 1, -1, -1):
        m = messages[j]
        if isinstance(m, Mapping) and m.get("role") == "user":
            return message_text(m)
    return ""


@dataclass(frozen=True)
class JoinedReply:
    """The assistant replies just before a reply, read with it for ``Signals.joined_reply_harm`` (``joined_reply``)."""

    prompt: str  # the user turn before the oldest of them: the ask the pieces answer
    earlier: str  # their texts, oldest first, joined by blank lines

    def pair(self, reply: str) -> tuple[str, str]:
        """The (prompt, text) pair of ``reply`` read after the earlier replies."""
        return self.prompt, f"{self.earlier}\n\n{reply}"

    def earlier_pair(self) -> tuple[str, str]:
        """The earlier replies read together without the new one."""
        return self.prompt, self.earlier


def joined_reply(messages: Sequence[Any], turns: int = JOINED_REPLY_TURNS) -> JoinedReply | None:
    """The last ``turns`` assistant messages of ``messages`` with text, oldest first, and the user turn before the
    oldest of them as the prompt. That is the ask the pieces answer ("how do I make X?"); the follow-ups after it
    ("and then?") say nothing the model can use, and joining them would put them at the prompt's tail, the part a
    pair pass reads. It also stays the same while a stream grows and across the first turns of a conversation, so
    the classifier's cache answers the windows of the earlier text. None when ``messages`` has no assistant text (the
    reply alone is what the output check already scores). Reads the messages from the end: a long history costs a
    look at its last few."""
    earlier: list[tuple[int, str]] = []
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if len(earlier) == turns:
            break
        if isinstance(m, Mapping) and m.get("role") == "assistant" and _has_words(text := message_text(m)):
            earlier.append((i, text))
    if not earlier:
        return None
    earlier.reverse()
    return JoinedReply(_user_before(messages, earlier[0][0]), "\n\n".join(t for _, t in earlier))


def reads_joined(policies: Sequence[Policy]) -> bool:
    """Whether one of ``policies`` has a rule on ``joined_reply_harm``. Only then is it scored: it costs about 1.5
    pair passes a reply, and at c=1 it took the output check's p90 from 25 to 67 ms (bench/RESULTS.md)."""
    return any(rule.when.joined_reply_harm_at_least is not None for p in policies for rule in p.output_rules)


def joined_harm(joined: ReplyScore | None, earlier: ReplyScore | None) -> float | None:
    """``Signals.joined_reply_harm`` from the joined text's score (None: no earlier reply) and the earlier replies'
    read together without the new one (None: not read, because the joined text reads under ``JOINED_EARLIER_LINE``).
    None where there is nothing the new reply completes: no earlier reply (the reply alone is ``reply_harm``'s), or
    earlier replies that already read harmful. Those were relayed (each judged when it went out, a stream's up to the
    cut) or written by the client (``history_harm`` reads those, with its own lines), and a harmless "thanks, that's
    all" after them must not be stopped for them; a harmful reply after them is ``reply_harm``'s."""
    if joined is None or (earlier is not None and earlier.reply_harm >= JOINED_EARLIER_LINE):
        return None
    return joined.reply_harm


@dataclass(frozen=True)
class _HistoryHarm:
    """What reading a request's history gave: the max reply harm of the pairs that came back (``scored``: some
    did), and whether some pair went unscored (the classifier call failed or timed out, or it lay beyond
    ``MAX_HISTORY_REPLIES``)."""

    harm: float = 0.0
    scored: bool = False
    failed: bool = False


def _with_history(signals: Signals, past: _HistoryHarm, *, scored: bool) -> Signals:
    """``signals`` with the history's reply harm. A history read in part makes the request partly scored
    (``_partly``): a block that what came back earns stands, anything milder gives way to
    ``on_classifier_failure``. ``scored``: the request's other texts (or its window) came back."""
    signals = dataclasses.replace(signals, history_harm=past.harm)
    if not past.failed:
        return dataclasses.replace(
            signals, partly_scored=signals.partly_scored or (signals.classifier_failed and past.scored)
        )
    return dataclasses.replace(signals, classifier_failed=True, partly_scored=scored or past.scored)


@dataclass(frozen=True)
class _Scored:
    """What one request's own scoring gave: the scores that came back, and whether some text went unscored (a
    classifier call failed or timed out, or the text lay beyond ``MAX_SCORED_TEXTS``)."""

    scores: tuple[PromptScore, ...] = ()
    failed: bool = False


def _prompt_for_reply(texts: Sequence[ScoredText]) -> str:
    """The prompt a reply answers: the new user turns together (consecutive user turns are one ask)."""
    new = [t.text for t in texts if t.new and t.role == "user"] or [t.text for t in texts if t.role == "user"][-1:]
    return "\n\n".join(new)


# --- per-exchange state ----------------------------------------------------------------------------------


@dataclass
class _ExchangeState:
    active: Policy
    shadows: tuple[Policy, ...]
    texts: list[ScoredText]
    signals: Signals
    input: dict[str, Decision] = field(default_factory=dict)  # policy ref -> decision
    output: dict[str, Decision] = field(default_factory=dict)  # policy ref -> most severe output decision
    output_signals: Signals | None = None
    retried: bool = False
    subkey: str | None = None
    recorded: bool = False  # the conversation tracker has this exchange's reply
    # What the tracker said about the request: handed back to record_reply, which then neither re-hashes the
    # history nor re-reads the state (at 100 turns the chain alone is a few ms of CPU).
    observation: Observation | None = None
    # Reply scoring failed once in this exchange: later output checks reuse the failure instead of waiting out
    # the timeout again (a stream is checked every few hundred characters: a hung classifier would otherwise
    # cost one timeout per check, a delay that grows with the reply).
    output_failed: bool = False
    # The gateway's own id of the exchange in the decision log: exchange.request_id is the client's x-request-id when
    # it sent one, which clients reuse, so it cannot tell exchanges apart.
    exchange_id: str = field(default_factory=DecisionRecord.new_exchange_id)

    def policies(self) -> tuple[Policy, ...]:
        return (self.active, *self.shadows)


def _worse(old: Decision | None, new: Decision) -> Decision:
    return new if old is None or _SEVERITY[new.action] >= _SEVERITY[old.action] else old


class GuardCheck:
    """The guard as one ``pipeline.Check``."""

    name = "guard"

    def __init__(
        self,
        classifier: Classifier,
        policies: PolicySet,
        *,
        tracker: ConversationTracker | None = None,
        decision_log: DecisionLog | None = None,
        drills: DrillSink | None = None,
        metrics: Metrics | None = None,
        timeout: float = 2.0,
        score_system: bool = False,
        score_schemas: bool = False,
        output_checks: bool = True,
        watch_interval: float | None = None,
        max_scored_texts: int = MAX_SCORED_TEXTS,
        max_history_replies: int = MAX_HISTORY_REPLIES,
    ) -> None:
        self.classifier = classifier
        self.policies = policies
        self.tracker = tracker
        self.decision_log = decision_log or DecisionLog(None)
        if metrics is not None:
            dropped = metrics.counter(
                "guardproxy_decision_log_dropped", "decision log records dropped (queue full, disk)"
            )
            self.decision_log.on_drop = dropped.inc
        self.drills = drills
        self.metrics = metrics
        if metrics is not None:  # exported at 0 from the start, so rate() and absent() alerts work before a first event
            for name, doc in _GUARD_COUNTERS.values():
                metrics.counter(name, doc)
        self._reload_lock = threading.Lock()
        self._policy_series: set[tuple[str, str, str, str]] = set()  # guardproxy_policy_info's label sets
        self._publish_policies()
        self.timeout = timeout
        self.score_system = score_system
        self.score_schemas = score_schemas
        self.max_scored_texts = max_scored_texts
        self.max_history_replies = max_history_replies
        self.output_checks = output_checks
        self.watch_interval = watch_interval
        self._watcher: asyncio.Task[None] | None = None
        self.failures = {"classifier": 0, "state": 0, "finish": 0}

    def _whole_model(self, active: Policy, shadows: Sequence[Policy]) -> bool:
        """Whether a request judged by these policies must not exit early: one of them reads harm or jailbreak
        below the lines the early-exit head was fitted for (``below_exit_lines``)."""
        spec = getattr(self.classifier, "early_exit", None)
        return spec is not None and any(below_exit_lines(spec, p) for p in (active, *shadows))

    def conversation_sensitive(self, low: ConversationSignals, high: ConversationSignals, harm: float = 1.0) -> bool:
        """Whether any loaded policy (active or shadow, of any tenant) or drill sampling could treat conversation
        signals lying between ``low`` and ``high`` unlike ``low``, for a request of harm at most ``harm``: the
        tracker's ``rephrase_check``, asked before it settles for a lower bound of rephrase similarity instead of
        running the whole model on an exited turn."""
        policies = self.policies.all()
        if any(p.conversation_sensitive(low, high, harm) for p in policies):
            return True
        return self.drills is not None and self.drills.conversation_sensitive(
            low, high, [p.thresholds() for p in policies], harm
        )

    # --- lifecycle ---

    async def start(self) -> None:
        await asyncio.to_thread(self.decision_log.start)
        if self.drills is not None:
            await self.drills.start()
        if self.watch_interval and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(self.watch_interval), name="guardproxy-policy-watch")

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await asyncio.to_thread(self.decision_log.close)
        if self.drills is not None:
            await self.drills.aclose()
        if self.tracker is not None:
            await self.tracker.aclose()
        await self.classifier.aclose()

    def reload(self) -> ReloadResult:
        """Reload every policy file; a file that fails validation leaves the old set in force (logged and counted in
        ``guardproxy_policy_reload_failures_total``). A policy whose content changed under the name@version it had
        is reloaded with a warning: its decisions would otherwise be told apart from the old rules' by nothing."""
        with self._reload_lock:  # SIGHUP, the admin endpoint and the watcher may reload at once, each in a thread
            return self._reload()

    def _reload(self) -> ReloadResult:
        result = self.policies.reload()
        if result.ok:
            for u in result.unbumped:
                log.warning(
                    "policy %s: its content changed but its version was not bumped (%s, digest %s -> %s): the decision "
                    "log, drills, metrics and `policy compare` now count two rule sets as %s; give it a new version",
                    u.path, u.ref, u.old, u.new, u.ref,
                )  # fmt: skip
            log.info("policies reloaded: %s", ", ".join(result.described()))
            log_exit_readers(getattr(self.classifier, "early_exit", None), self.policies.all())
            self._publish_policies()
        else:
            log.error("policy reload rejected, keeping %s: %s", ", ".join(result.policies), result.error)
            if self.metrics is not None:
                self.metrics.counter(*_RELOAD_FAILURES).inc()
        return result

    def _publish_policies(self) -> None:
        """``guardproxy_policy_info{role,name,version,digest}`` = 1 for each loaded policy in each role; the label
        sets of policies no longer loaded are removed (after the new ones are set: a scrape never sees none)."""
        if self.metrics is None:
            return
        self.metrics.counter(*_RELOAD_FAILURES)  # at 0 from the start
        info = self.metrics.gauge(*_POLICY_INFO)
        series: set[tuple[str, str, str, str]] = {
            (p.role, p.name, p.version, p.digest) for p in self.policies.in_force()
        }
        for labels in series:
            info.labels(*labels).set(1)
        for labels in self._policy_series - series:
            with contextlib.suppress(KeyError):
                info.remove(*labels)
        self._policy_series = series

    async def areload(self) -> ReloadResult:
        return await asyncio.to_thread(self.reload)

    async def _watch(self, interval: float) -> None:
        # Reload once per change of the files' mtimes: a broken file is reported once, not every poll.
        seen = await asyncio.to_thread(self.policies.fingerprint)
        while True:
            await asyncio.sleep(interval)
            try:
                now = await asyncio.to_thread(self.policies.fingerprint)
                if now != seen:
                    await self.areload()
                    seen = await asyncio.to_thread(self.policies.fingerprint)  # the set may watch new files
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("policy file watch failed")

    # --- hook points ---

    accepts_early = True  # check_input takes ``early`` (pipeline.Pipeline.check_input)

    async def check_input(self, exchange: Exchange, *, early: Early | None = None) -> Verdict:
        model = exchange.body.get("model")
        active, shadows = self.policies.select(exchange.tenant, model if isinstance(model, str) else None)
        # with a tracker, old user turns are its business (scored and kept in its state), and read again only if
        # it fails (``_signals``)
        texts = self._texts(exchange, old_user_turns=self.tracker is None)
        subkey = subkey_of(exchange.body, exchange.headers) if self.tracker is not None else None
        exact = self._whole_model(active, shadows)
        signals, obs = await self._signals(exchange, texts, subkey, active=active, early=early, exact=exact)
        if signals.unreadable >= UNREADABLE and self.metrics is not None:
            self.metrics.counter(*_GUARD_COUNTERS["unreadable"]).inc()
        state = _ExchangeState(active, shadows, texts, signals, subkey=subkey, observation=obs)
        exchange.state[STATE_KEY] = state
        with exchange.timed("policy"):
            for policy in state.policies():
                state.input[policy.ref] = _decide_input(policy, signals)
        decision = state.input[active.ref]
        if decision.action is Action.BLOCK:
            # Record the refusal now, before the client can send its next turn: finish runs after the response, and
            # a prober that rewords at once would otherwise find no refusal in the tenant's memory.
            await self._record(exchange, state, decision.reply_text if decision.status_code is None else None,
                               refused=True)  # fmt: skip
        return decision.verdict()

    async def _signals(
        self,
        exchange: Exchange,
        texts: list[ScoredText],
        subkey: str | None,
        *,
        active: Policy,
        early: Early | None = None,
        exact: bool = False,
    ) -> tuple[Signals, Observation | None]:
        """The request's signals, computed once for every policy, and the tracker's observation if it answered.

        ``early``: when the tracker defers a window pass, called with the active policy's verdict on the provisional
        signals (the request's own turns) before the window is awaited. ``exact``: no turn exits early."""
        obs: Observation | None = None
        state_failed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout  # the tracker's whole answer, a deferred window included
        if self.tracker is not None:
            with exchange.timed("state"):
                try:
                    obs = await asyncio.wait_for(
                        self.tracker.observe(
                            exchange.tenant,
                            subkey,
                            exchange.messages,
                            defer_window=early is not None,
                            exact=exact,
                            timings=exchange.timings,
                        ),
                        self.timeout + PARTIAL_MARGIN_S,
                    )
                    state_failed = obs.state_failed
                except StateBackendError as exc:
                    self._state_failed(exchange, exc)
                    state_failed = True
                except ClassifierPartial as exc:  # the new turns it read (the newest first) still count
                    self._classifier_failed(exc)
                    return _partly([s for s in exc.scores if s is not None], ConversationSignals(), False), None
                except Exception as exc:  # the tracker's only other dependency is the classifier
                    self._classifier_failed(exc)
                    return Signals(classifier_failed=True), None
        if obs is not None:
            # The tracker scored the user turns the gateway has not seen; score the rest (tool results, system
            # messages if configured) here, new ones only when the tracker vouches for the history.
            verified = obs.signals.history == "verified"
            rest = [t for t in texts if t.role != "user" and (t.new or not verified)]
            try:
                extra, past = await asyncio.gather(
                    self._score_texts(exchange, rest, exact=exact), self._score_history(exchange, obs.unverified)
                )
            except BaseException:
                if obs.pending is not None:
                    obs.pending.cancel()  # cancelled mid-request: the deferred window must not run on alone
                raise
            scored = [*obs.new_user_scores, *extra.scores]
            if obs.pending is not None:
                done = await self._final_observation(exchange, obs, extra, past, active, early, deadline - loop.time())
                if done is None:  # the window pass failed: the turns scored before it still count
                    return _with_history(_partly(scored, obs.signals, state_failed), past, scored=bool(scored)), None
                obs = done
                state_failed = state_failed or obs.state_failed
            came_back = bool(scored) or obs.window is not None
            if extra.failed:  # keep what was scored: a harmful ask still blocks when its tool results time out
                partly = _partly(scored, obs.signals, state_failed, obs.window, obs.window_estimated)
                return _with_history(partly, past, scored=came_back), obs
            signals = _combine_scores(scored, obs.signals, state_failed, obs.window, obs.window_estimated)
            return _with_history(signals, past, scored=came_back), obs
        # No tracker, or its state failed: no earlier request vouches for the history, so every scored turn counts,
        # and every assistant turn is read.
        if self.tracker is not None:
            texts = self._texts(exchange)
        own, past = await asyncio.gather(self._score_texts(exchange, texts, exact=exact), self._score_history(exchange))
        if own.failed:
            partly = _partly(own.scores, ConversationSignals(), state_failed)
            return _with_history(partly, past, scored=bool(own.scores)), None
        signals = _combine_scores(own.scores, ConversationSignals(), state_failed)
        return _with_history(signals, past, scored=bool(own.scores)), None

    async def _final_observation(
        self,
        exchange: Exchange,
        obs: Observation,
        extra: _Scored,
        past: _HistoryHarm,
        active: Policy,
        early: Early | None,
        remaining: float,
    ) -> Observation | None:
        """A deferred window's observation, once ``early`` has the provisional verdict (the history's reply harm in
        it: the upstream must not get a primed history on a provisional allow); None if the pass failed."""
        assert obs.pending is not None
        sent: asyncio.Future[None] | None = None
        try:
            if early is not None and not extra.failed and not past.failed:
                provisional = _combine_scores([*obs.new_user_scores, *extra.scores], obs.signals, obs.state_failed)
                provisional = dataclasses.replace(provisional, history_harm=past.harm)
                with exchange.timed("policy"):
                    sent = early(_decide_input(active, provisional).verdict())
                if sent is not None:  # the window waits for the upstream request to go out (at most briefly)
                    sent.add_done_callback(lambda _: obs.start_window())
            if sent is None:
                obs.start_window()
            with exchange.timed("state"):
                return await asyncio.wait_for(obs.pending, max(remaining, 0.0))
        except Exception as exc:  # the window pass is the classifier's
            self._classifier_failed(exc)
            return None
        finally:
            obs.pending.cancel()  # a no-op once it finished; the caller's cancellation must not leave it running

    def _texts(self, exchange: Exchange, *, old_user_turns: bool = True) -> list[ScoredText]:
        """What the guard scores of a request (``scored_texts``), then its text outside the messages
        (``request_texts``)."""
        texts = scored_texts(exchange.messages, score_system=self.score_system, old_user_turns=old_user_turns)
        fields = request_texts(
            exchange.body, exchange.messages, score_system=self.score_system, score_schemas=self.score_schemas
        )
        return texts + fields

    async def _score_texts(self, exchange: Exchange, texts: Sequence[ScoredText], *, exact: bool = False) -> _Scored:
        """Scores of at most ``max_scored_texts`` of ``texts`` (``capped``): the user turns in one classifier call,
        the rest in another, so a call that fails or times out (tool results a client padded) leaves the other's
        scores standing. ``failed``: some text went unscored."""
        if not texts:
            return _Scored()
        kept = capped(texts, self.max_scored_texts)
        if len(kept) < len(texts):
            log.info(
                "request %s: %d texts to score, over the cap of %d: the %d oldest count as unscored",
                exchange.request_id,
                len(texts),
                self.max_scored_texts,
                len(texts) - len(kept),
            )
        groups = [g for g in ([t for t in kept if t.role == "user"], [t for t in kept if t.role != "user"]) if g]
        with exchange.timed("inference"):
            results = await asyncio.gather(*(self._score_prompts([t.text for t in g], exact=exact) for g in groups))
        scores = tuple(s for r, _ in results for s in r)
        return _Scored(scores, failed=len(kept) < len(texts) or not all(whole for _, whole in results))

    async def _score_history(self, exchange: Exchange, unverified: Sequence[int] | None = None) -> _HistoryHarm:
        """The reply harm of the history the guard cannot vouch for (``history_pairs``; ``unverified`` None: no
        tracker vouches for any turn), at most ``max_history_replies`` pairs, newest first, in one pair pass over
        each head (``Classifier.score_replies``, cached by content). A failure or timeout is the classifier's
        (``_classifier_failed``) and leaves the pairs unscored."""
        kept, over = history_pairs(exchange.messages, unverified, self.max_history_replies)
        if over:
            log.info(
                "request %s: more assistant texts to read than the cap of %d: the oldest count as unscored",
                exchange.request_id,
                self.max_history_replies,
            )
        if not kept:
            return _HistoryHarm(failed=over)
        # its own stage: it runs beside the request's other texts' scoring ("inference"), and the two walls overlap
        with exchange.timed("history"):
            try:
                scores = await asyncio.wait_for(self.classifier.score_replies(kept), self.timeout)
            except Exception as exc:  # raised, timed out, or broken: the policy's on_classifier_failure decides
                self._classifier_failed(exc)
                return _HistoryHarm(failed=True)
        if len(scores) != len(kept):
            self._classifier_failed(RuntimeError(f"{len(scores)} reply scores for {len(kept)} pairs"))
            return _HistoryHarm(failed=True)
        return _HistoryHarm(max(s.reply_harm for s in scores), scored=True, failed=over)

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict:
        state = exchange.state.get(STATE_KEY)
        if not isinstance(state, _ExchangeState):
            return Verdict()  # no input check ran (guard added mid-flight): nothing to compare against
        if not self.output_checks:
            # Input checks only: the reply is neither scored nor judged, but it is recorded (history integrity).
            if final and choice == 0 and not state.recorded:
                await self._record(exchange, state, text, refused=False)
            return Verdict()
        reply = _scored_reply(prefill(exchange.messages) + text, exchange.reply_reasoning.get(choice))
        joined = joined_reply(exchange.messages) if reads_joined(state.policies()) else None
        scored: tuple[ReplyScore, float | None] | None = None
        if not state.output_failed:
            with exchange.timed("inference"):
                scored = await self._score_output(_prompt_for_reply(state.texts), reply, joined)
            state.output_failed = scored is None
        if final and scored is not None and scored[0].unread:
            self._reply_unread(exchange)
        signals = _output_signals(state.signals, *(scored or (None, None)))
        state.output_signals = signals
        n = exchange.body.get("n", 1)
        retried = state.retried or bool(exchange.state.get("retried"))  # the gateway marks its re-ask too
        may_retry = not exchange.stream and not retried and (n is None or n == 1)
        current: Decision | None = None
        with exchange.timed("policy"):
            for policy in state.policies():
                decision = policy.decide_output(signals, final=final, may_retry=may_retry)
                state.output[policy.ref] = _worse(state.output.get(policy.ref), decision)
                if policy is state.active:
                    current = decision
        assert current is not None
        if current.retry_note:
            state.retried = True  # one retry per exchange; the re-asked reply is checked without one
        elif final and choice == 0 and not state.recorded:
            # Record the reply now, before the client can send its next turn (finish may run a moment later).
            if current.action is not Action.BLOCK:
                await self._record(exchange, state, text, refused=signals.refusal in ("partial", "full"))
            elif not exchange.stream:
                await self._record(exchange, state, current.reply_text if current.status_code is None else None,
                                   refused=True)  # fmt: skip
        verdict = current.verdict()
        # The input verdict already set the decision and policy headers; the output adds one only when it makes
        # the exchange's decision more severe (the gateway appends headers, and a client reads the last value).
        first = state.input[state.active.ref].action
        overall = _worse(state.input[state.active.ref], state.output[state.active.ref]).action
        notes = {k: v for k, v in verdict.annotations.items() if k not in (HEADER_DECISION, HEADER_POLICY)}
        if overall is not first:
            notes[HEADER_DECISION] = overall.value
        return dataclasses.replace(verdict, annotations=notes)

    async def finish(self, exchange: Exchange) -> None:
        state = exchange.state.get(STATE_KEY)
        if not isinstance(state, _ExchangeState):
            return
        try:
            self._log_decisions(exchange, state)
            if not state.recorded:
                first = state.input[state.active.ref]
                if first.action is Action.BLOCK:
                    await self._record(exchange, state, first.reply_text if first.status_code is None else None,
                                       refused=True)  # fmt: skip
                elif self._refused(state):
                    # a stream cut mid-way: the client holds what went out before the cut, then the policy's text
                    await self._record(exchange, state, self._relayed_reply(exchange, state), refused=True)
            if self.drills is not None:
                self.drills.submit_exchange(
                    exchange,
                    state.output_signals or state.signals,
                    self._drill_decision(state, state.active),
                    [self._drill_decision(state, p) for p in state.shadows],
                    thresholds=state.active.thresholds(),
                    family=self._family(state),
                )
        except Exception:  # finish must not raise: count and log
            self.failures["finish"] += 1
            log.exception("guard finish failed for %s", exchange.request_id)

    # --- internals ---

    async def _record(self, exchange: Exchange, state: _ExchangeState, reply: str | None, *, refused: bool) -> None:
        state.recorded = True
        if self.tracker is None or state.signals.classifier_failed:
            return
        try:
            await asyncio.wait_for(
                self.tracker.record_reply(
                    exchange.tenant,
                    state.subkey,
                    exchange.messages,
                    reply,
                    refused=refused,
                    observation=state.observation,
                ),
                self.timeout,
            )
        except Exception as exc:  # state never fails a request; the next one sees it as unverified
            self._state_failed(exchange, exc)

    def _state_failed(self, exchange: Exchange, exc: BaseException) -> None:
        self.failures["state"] += 1
        if self.metrics is not None:
            self.metrics.counter(*_GUARD_COUNTERS["state_failures"]).inc()
        log.warning("conversation state failed for %s: %r", exchange.request_id, exc)

    @staticmethod
    def _combined(state: _ExchangeState, policy: Policy) -> Decision:
        first = state.input[policy.ref]
        out = state.output.get(policy.ref)
        return out if out is not None and _SEVERITY[out.action] > _SEVERITY[first.action] else first

    @classmethod
    def _drill_decision(cls, state: _ExchangeState, policy: Policy) -> PolicyDecision:
        """``policy``'s decision as a drill keeps it: the combined one (``_combined``: the output's replaces the
        input's only when more severe, as the headers do) and each stage's, so the one it did not replace shows too."""
        out = state.output.get(policy.ref)
        stages = (state.input[policy.ref],) if out is None else (state.input[policy.ref], out)
        return drill_decision(cls._combined(state, policy), stages)

    @staticmethod
    def _relayed_reply(exchange: Exchange, state: _ExchangeState) -> str | None:
        """The assistant text a client holds after a stream the output check cut (one choice): the content relayed
        before the cut, then the policy's text, so its next request carrying that text reads verified. None (only
        the refusal is recorded) for several choices or an error status."""
        out = state.output.get(state.active.ref)
        n = exchange.body.get("n")
        if not exchange.stream or out is None or out.action is not Action.BLOCK or out.status_code is not None:
            return None
        if n not in (None, 1):
            return None
        if 0 not in exchange.relayed_chars or 0 not in exchange.reply_texts:
            return None
        return exchange.reply_texts[0][: exchange.relayed_chars[0]] + (out.reply_text or "")

    @classmethod
    def _family(cls, state: _ExchangeState) -> str | None:
        """The drill's family: the refused request this one rewords (the tracker's match), or its own when it was
        refused, so the drill report finds a refusal and the rewordings that followed it together."""
        obs = state.observation
        if obs is None:
            return None
        return obs.rephrase_family or (obs.family if cls._refused(state) else None)

    @staticmethod
    def _refused(state: _ExchangeState) -> bool:
        if state.input[state.active.ref].action is Action.BLOCK:
            return True
        out = state.output.get(state.active.ref)
        if out is not None and out.action is Action.BLOCK:
            return True
        return state.output_signals is not None and state.output_signals.refusal in ("partial", "full")

    def _log_decisions(self, exchange: Exchange, state: _ExchangeState) -> None:
        records: list[DecisionRecord] = []
        for policy in state.policies():
            role: Any = "active" if policy is state.active else "shadow"
            ids = {
                "request_id": exchange.request_id,
                "exchange_id": state.exchange_id,
                "tenant": exchange.tenant,
                "role": role,
            }
            records.append(record_of(state.input[policy.ref], state.signals, **ids))
            out = state.output.get(policy.ref)
            if out is not None:
                records.append(record_of(out, state.output_signals or state.signals, **ids))
            if self.metrics is not None:
                worst = self._combined(state, policy)
                self.metrics.observe_decision(policy.name, worst.action.value, shadow=role == "shadow")
        self.decision_log.submit(records)

    async def _score_prompts(self, texts: list[str], *, exact: bool = False) -> tuple[list[PromptScore], bool]:
        """The scores that came back, and whether every text's did. A call that timed out part way
        (``ClassifierPartial``: it reads the newest text first) brings the texts it finished."""
        try:
            scores = await asyncio.wait_for(
                self.classifier.score_prompts(texts, exact=exact), self.timeout + PARTIAL_MARGIN_S
            )
        except ClassifierPartial as exc:
            self._classifier_failed(exc)
            return [s for s in exc.scores if s is not None], False
        except Exception as exc:  # raised, timed out, or broken: the policy's on_classifier_failure decides
            self._classifier_failed(exc)
            return [], False
        if len(scores) != len(texts):
            self._classifier_failed(RuntimeError(f"{len(scores)} scores for {len(texts)} texts"))
            return [], False
        return scores, True

    async def _score_output(
        self, prompt: str, reply: str, joined: JoinedReply | None
    ) -> tuple[ReplyScore, float | None] | None:
        """The reply's score and its joined reply harm (``joined_harm``); None when scoring failed. The reply and the
        joined text go in one call (a stream's check waits out one timeout, not two); the earlier replies alone in a
        second one, only when the joined text reaches ``JOINED_EARLIER_LINE``."""
        pairs = [(prompt, reply)] if joined is None else [(prompt, reply), joined.pair(reply)]
        scores = await self._score_replies(pairs)
        if scores is None:
            return None
        if joined is None or scores[1].reply_harm < JOINED_EARLIER_LINE:
            return scores[0], joined_harm(scores[1] if joined else None, None)
        earlier = await self._score_replies([joined.earlier_pair()])
        if earlier is None:
            return None
        return scores[0], joined_harm(scores[1], earlier[0])

    async def _score_replies(self, pairs: list[tuple[str, str]]) -> list[ReplyScore] | None:
        """Each reply over its whole length where the classifier can (``OnnxClassifier.score_whole_replies``: a
        harmful passage after a long harmless opening is read too), else as one pair pass."""
        from guardproxy.classifier import whole_reply_allowance

        whole = getattr(self.classifier, "score_whole_replies", None)
        try:
            job = whole(pairs) if whole is not None else self.classifier.score_replies(pairs)
            # a long reply's windows may take longer (``classifier.whole_reply_allowance``)
            scores = await asyncio.wait_for(job, self.timeout + (whole_reply_allowance(pairs) if whole else 0.0))
        except Exception as exc:
            self._classifier_failed(exc)
            return None
        return scores if len(scores) == len(pairs) else None

    def _reply_unread(self, exchange: Exchange) -> None:
        if self.metrics is not None:
            self.metrics.counter(*_GUARD_COUNTERS["reply_unread"]).inc()
        log.info("request %s: the reply runs past what the output check reads", exchange.request_id)

    def _classifier_failed(self, exc: BaseException) -> None:
        self.failures["classifier"] += 1
        if self.metrics is not None:
            self.metrics.counter(*_GUARD_COUNTERS["classifier_failures"]).inc()
        log.warning("classifier failed: %r", exc)


def prefill(messages: Sequence[Any]) -> str:
    """The text of the assistant messages that end a request: a prefill, which the upstream continues (vLLM's
    ``continue_final_message``, Mistral's and DeepSeek's ``prefix``, llama.cpp), so the reply the client reads is this
    text and then the upstream's. The output check reads the two together: judged alone, the continuation of "Sure,
    here is how to build a pipe bomb. Step 1:" answered a harmless "Continue." (a red-team walkthrough, 2026-12-08).
    Every assistant message after the last other turn counts (system and developer messages between are skipped: a
    template puts them before the generation prompt), each with the text its fields carry beside the content
    (``integrity.unbound_text``: a ``reasoning_content``), in order; "" when there is none or it has no letter or
    digit."""
    run: list[Mapping[str, Any]] = []
    for m in reversed(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role == "assistant":
            run.append(m)
        elif role not in ("system", "developer"):
            break
    texts = [t for m in reversed(run) for t in (unbound_text(m), message_text(m)) if _has_words(t)]
    return "\n".join(texts)


def _scored_reply(text: str, reasoning: str | None) -> str:
    """What the output check reads of a choice: its reply, then the reasoning a reasoning model sent with it (which
    the client gets too, so harm in it counts; the reply first, so the refusal class is the reply's)."""
    return f"{text}\n\n{reasoning}" if reasoning and text else reasoning or text


def _combine_scores(
    scores: Sequence[PromptScore],
    conv: ConversationSignals,
    state_failed: bool,
    window: PromptScore | None = None,
    window_estimated: bool = False,
) -> Signals:
    """Request-level signals: the most harmful scored turn decides harm and category; jailbreak and unreadable are
    the max over the scored turns. ``estimated``: a scored turn or the conversation ``window`` exited early, or the
    window pass did not run and its harm is the tracker's estimate (``window_estimated``)."""
    window_exited = (window is not None and window.exited) or window_estimated
    if not scores:
        return Signals(conversation=conv, state_failed=state_failed, estimated=window_exited)
    top = max(scores, key=lambda s: s.harm)
    return Signals(
        harm=top.harm,
        category=top.category,
        jailbreak=max(s.jailbreak for s in scores),
        unreadable=max(s.unreadable for s in scores),
        conversation=conv,
        state_failed=state_failed,
        estimated=window_exited or any(s.exited for s in scores),
    )


def _partly(
    scores: Sequence[PromptScore],
    conv: ConversationSignals,
    state_failed: bool,
    window: PromptScore | None = None,
    window_estimated: bool = False,
) -> Signals:
    """Signals of a request whose scoring failed in part: ``classifier_failed``, with the scores that came back
    (``partly_scored`` when there are any: ``_decide_input`` lets a block they earn stand)."""
    signals = _combine_scores(scores, conv, state_failed, window, window_estimated)
    return dataclasses.replace(signals, classifier_failed=True, partly_scored=bool(scores) or window is not None)


def _decide_input(policy: Policy, signals: Signals) -> Decision:
    """``policy.decide_input``; for a request scored in part (``Signals.partly_scored``), the policy's rules on the
    scores that came back first: a block stands (a 0.99 ask padded with tool results until their scoring timed out
    is still blocked), anything milder gives way to ``on_classifier_failure`` (the unscored texts may be worse)."""
    if signals.partly_scored:
        scored = policy.decide_input(dataclasses.replace(signals, classifier_failed=False, partly_scored=False))
        if scored.action is Action.BLOCK:
            return scored
    return policy.decide_input(signals)


def _output_signals(inp: Signals, reply: ReplyScore | None, joined: float | None = None) -> Signals:
    """``inp`` with the reply's scores and its joined reply harm (``joined_harm``)."""
    if reply is None:
        return dataclasses.replace(inp, classifier_failed=True)
    if inp.classifier_failed:
        # The reply was scored but the prompt was not: reply harm counts, refusal conditions (which need the
        # prompt's harm to tell a false refusal) must not match.
        return dataclasses.replace(
            inp,
            classifier_failed=False,
            partly_scored=False,
            reply_harm=reply.reply_harm,
            joined_reply_harm=joined,
            refusal=None,
        )
    return dataclasses.replace(inp, reply_harm=reply.reply_harm, joined_reply_harm=joined, refusal=reply.refusal)


# --- wiring ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardBundle:
    """What the gateway mounts: the pipeline, the guard's HTTP routes, and ``reload`` for SIGHUP."""

    pipeline: Pipeline
    routes: tuple[BaseRoute, ...] = ()
    guard: GuardCheck | None = None

    def reload(self) -> ReloadResult | None:
        """Reload the policy files now (small files, read on the calling thread); None without a guard."""
        return self.guard.reload() if self.guard is not None else None

    async def areload(self) -> ReloadResult | None:
        """``reload`` off the event loop: what a SIGHUP handler should schedule."""
        return await self.guard.areload() if self.guard is not None else None


def below_exit_lines(spec: ExitSpec, policy: Policy) -> list[str]:
    """What ``policy`` reads below the lines the early-exit heads were fitted for, one phrase per signal ("harm from
    0.1, below 0.15"). An exited turn or window reports estimates capped just below those lines (a window the
    tracker only estimated, below the estimate's gate), so a request under such a policy (active or shadow) runs
    the whole model; other requests may still exit."""
    below = []
    lines = [("harm", spec.harm_line), ("jailbreak", spec.jailbreak_line)]
    # a window read by its head, or only estimated below the estimate's gate, reports at most that line
    window_lines = [w.harm_line for w in (spec.window,) if w is not None]
    window_lines += [e.gate for e in (spec.window_estimate,) if e is not None]
    if window_lines:
        lines.append(("window_harm", max(window_lines)))
    for signal, fitted in lines:
        line = policy.lowest_line(signal)
        if line is not None and line < fitted:
            below.append(f"{signal} from {line:g}, below {fitted:g}")
    return below


def log_exit_readers(spec: ExitSpec | None, policies: Sequence[Policy]) -> None:
    """One warning per loaded policy whose requests run the whole model because of ``below_exit_lines``."""
    if spec is None:
        return
    for policy in policies:
        if below := below_exit_lines(spec, policy):
            log.warning(
                "guard.early_exit: %s reads %s, the lines the early-exit head was fitted for: requests under it run "
                "the whole model (refit the head with python -m guardproxy.training.early_exit --harm-line/"
                "--jailbreak-line for the lowest lines to let them exit)",
                policy.source or policy.ref,
                "; ".join(below),
            )


def build_guard(
    settings: Settings,
    *,
    classifier: Classifier | None = None,
    tracker: ConversationTracker | None = None,
    drills: DrillSink | None = None,
    metrics: Metrics | None = None,
    with_drills: bool = True,
    with_tracker: bool = True,
) -> GuardBundle:
    """Wire the guard from settings; the keyword arguments replace a part (tests inject fakes here).
    ``with_drills=False`` leaves drill sampling out, ``with_tracker=False`` the conversation tracker (the decision
    log is always kept).

    Raises ``PolicyError`` for a broken policy or mapping file and ``ClassifierError`` for a missing model:
    a gateway that cannot enforce its policy does not start.
    """
    if not settings.guard.enabled:
        return GuardBundle(pipeline=Pipeline())
    policies = PolicySet(settings.policy.active, settings.policy.shadows, mapping=settings.policy.mapping)
    if classifier is None:
        from guardproxy.classifier import OnnxClassifier

        classifier = OnnxClassifier.from_settings(settings.guard)
        if metrics is not None:
            classifier.observe_timing = metrics.observe_stage  # "inference" splits into tokenize + model
            transitions = metrics.counter(
                "guardproxy_classifier_circuit_total", "guard model circuit breaker transitions", ["to"]
            )
            transitions.labels("open"), transitions.labels("closed")  # at 0 from the start
            classifier.breaker.on_change = lambda state: transitions.labels(state).inc()
            if classifier.early_exit is not None:
                exits = metrics.counter(
                    "guardproxy_classifier_early_exit_total",
                    "per-turn checks with early exit on, by outcome (exited, went_on)",
                    ["outcome"],
                )
                window_exits = metrics.counter(
                    "guardproxy_classifier_window_early_exit_total",
                    "conversation window passes with early exit on, by outcome (exited, went_on)",
                    ["outcome"],
                )
                counts = {
                    "turn": (exits.labels("exited"), exits.labels("went_on")),
                    "window": (window_exits.labels("exited"), window_exits.labels("went_on")),
                }

                def count_exits(exited: int, went_on: int, kind: str) -> None:
                    exited_count, went_on_count = counts[kind]
                    exited_count.inc(exited)
                    went_on_count.inc(went_on)

                classifier.observe_exit = count_exits
    spec = getattr(classifier, "early_exit", None)
    log_exit_readers(spec, policies.all())
    if spec is not None and spec.window is not None and spec.window.max_ids != settings.guard.window_max_ids:
        log.warning(
            "guard.early_exit: the window head was fitted on %d-id windows and guard.window_max_ids is %d: every "
            "window runs the whole model (refit it with python -m guardproxy.training.early_exit --windows "
            "--window-ids %d)",
            spec.window.max_ids,
            settings.guard.window_max_ids,
            settings.guard.window_max_ids,
        )
    if tracker is None and with_tracker:
        from guardproxy.conversation import build_tracker

        tracker = build_tracker(settings, classifier, metrics=metrics)
    if drills is None and with_drills:
        from guardproxy.drills.recorder import DrillRecorder

        drills = DrillRecorder.from_settings(settings, metrics=metrics)
    path = settings.policy.decision_log
    guard = GuardCheck(
        classifier,
        policies,
        tracker=tracker,
        decision_log=DecisionLog(Path(path) if path is not None else None),
        drills=drills,
        metrics=metrics,
        # The classifier enforces its own deadline; this one catches a classifier that ignores it.
        timeout=settings.guard.timeout * 1.5,
        output_checks=settings.guard.output_checks,
        score_system=settings.guard.score_system,
        score_schemas=settings.guard.score_schemas,
        watch_interval=1.0 if settings.policy.watch else None,
    )
    if isinstance(tracker, StateTracker):
        tracker.rephrase_check = guard.conversation_sensitive
        if metrics is not None:
            tracker.observe_timing = metrics.observe_stage  # "state" splits into state_lookup + inference + state_store
        if metrics is not None and spec is not None:
            settled = metrics.counter(
                "guardproxy_conversation_rephrase_deferred_total",
                "requests whose turns exited early with refusals in memory, by what settled their rephrase "
                "similarity: whole_model (it could matter) or lower_bound",
                ["outcome"],
            )
            whole_model, lower_bound = settled.labels("whole_model"), settled.labels("lower_bound")
            tracker.observe_rephrase = lambda resolved: (whole_model if resolved else lower_bound).inc()
            if spec.window_estimate is not None:
                estimated = metrics.counter(
                    "guardproxy_conversation_window_estimated_total",
                    "requests whose conversation window pass was skipped: its estimate from the user turns' own "
                    "states stayed below the estimate's gate",
                )
                tracker.observe_estimate = estimated.inc
    pipeline = Pipeline([guard], output_check_chars=policies.default.output.check_chars)
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    from guardproxy.admin import admin_routes

    routes = admin_routes(guard, token, path)
    store = getattr(drills, "store", None)  # the DrillRecorder's store: mount its review page beside the admin API
    if store is not None:
        from guardproxy.drills.review import review_routes
        from guardproxy.drills.store import DrillStore

        if isinstance(store, DrillStore):
            routes = (*routes, *review_routes(store, settings))
    return GuardBundle(pipeline=pipeline, routes=routes, guard=guard)
