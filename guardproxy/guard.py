"""The guard: classifier + conversation tracker + policies, plugged into the gateway's pipeline.

``GuardCheck`` implements ``pipeline.Check``. Per exchange it computes the signals once (``check_input``:
the texts the guard scores, the classifier's ``PromptScore``s, the conversation tracker's escalation
signals), hands the same ``signals.Signals`` to the active policy and to every shadow policy, and returns
only the active decision to the gateway. ``check_output`` scores (prompt, reply) pairs for refusal and
reply harm and asks the policies again. ``finish`` (off the request path) writes every decision of every
policy to the decision log, counts them, updates the conversation tracker and hands the exchange to the
drills recorder.

What is scored: every user message (string content, or the text parts of a content-part array) and every
tool result (untrusted input that can carry injected instructions). System messages are the operator's and
are not scored unless ``score_system`` is set. ``Signals.harm`` is the maximum over the turns the gateway has
not already checked: the turns after the last assistant message when the tracker vouches for the history
(``history == "verified"``), and every scored turn otherwise (a history the gateway never saw may hide a
harmful turn among fake dialogue).

Failure paths, each explicit: the classifier raising or timing out sets ``classifier_failed``; the tracker
raising sets ``state_failed``; each policy's ``on_classifier_failure`` / ``on_state_failure`` decides.

``build_guard(settings)`` wires the parts from settings and returns a ``GuardBundle``: the pipeline, the admin
routes (POST /guard/admin/reload, GET /guard/admin/compare, token-protected) and ``reload()`` for SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from guardproxy.decisions import DecisionLog, DecisionRecord, compare, read_log, record_of
from guardproxy.pipeline import Action, Exchange, Pipeline, Verdict
from guardproxy.policy import Decision, Policy, PolicySet, ReloadResult
from guardproxy.signals import Classifier, ConversationSignals, PromptScore, ReplyScore, Signals

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from guardproxy.metrics import Metrics
    from guardproxy.settings import Settings

log = logging.getLogger(__name__)

STATE_KEY = "guardproxy.guard"
_SEVERITY = {Action.ALLOW: 0, Action.FLAG: 1, Action.BLOCK: 2}


# --- the seams to the parts written beside this one ------------------------------------------------------


@runtime_checkable
class ConversationTracker(Protocol):
    """What the guard needs from ``guardproxy.conversation``.

    ``observe`` sees the exchange and the scores of the texts ``scored_texts`` returned (same order) and
    returns the conversation's escalation signals; it raises ``StateBackendError`` when its backend fails.
    ``record`` runs in ``finish`` with the outcome (was the request or reply refused, by the policy or by the
    upstream) and the assistant text relayed, so the next request can verify its history.
    """

    async def observe(
        self, exchange: Exchange, texts: Sequence[ScoredText], scores: Sequence[PromptScore]
    ) -> ConversationSignals: ...

    async def record(self, exchange: Exchange, *, refused: bool) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class DrillSink(Protocol):
    """What the guard needs from ``guardproxy.drills``: a non-blocking hand-off of one finished exchange."""

    def submit_exchange(
        self,
        exchange: Exchange,
        signals: Signals,
        active: Decision,
        shadows: Sequence[Decision],
        thresholds: dict[str, float],
    ) -> None: ...


# --- what gets scored ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredText:
    index: int  # position of the message in ``messages``
    role: str  # user | tool
    text: str
    new: bool  # after the last assistant message: not checked by an earlier request


def message_text(message: dict[str, Any]) -> str:
    """The text of a message: a string, or the text parts of a content-part array joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        return "\n".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    return ""


def scored_texts(messages: Sequence[Any], *, score_system: bool = False) -> list[ScoredText]:
    """Every user message and tool result (and system message if asked) with non-empty text, in order."""
    roles = {"user", "tool", "function"} | ({"system", "developer"} if score_system else set())
    assistant = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    last_assistant = assistant[-1] if assistant else -1
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles:
            continue
        text = message_text(m)
        if text.strip():
            out.append(ScoredText(i, str(m["role"]), text, i > last_assistant))
    return out


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
        watch_interval: float | None = None,
    ) -> None:
        self.classifier = classifier
        self.policies = policies
        self.tracker = tracker
        self.decision_log = decision_log or DecisionLog(None)
        self.drills = drills
        self.metrics = metrics
        self.timeout = timeout
        self.score_system = score_system
        self.watch_interval = watch_interval
        self._watcher: asyncio.Task[None] | None = None
        self.failures = {"classifier": 0, "state": 0, "finish": 0}

    # --- lifecycle ---

    async def start(self) -> None:
        await asyncio.to_thread(self.decision_log.start)
        if self.watch_interval and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(self.watch_interval), name="guardproxy-policy-watch")

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await asyncio.to_thread(self.decision_log.close)
        if self.tracker is not None:
            await self.tracker.aclose()
        await self.classifier.aclose()

    def reload(self) -> ReloadResult:
        """Reload every policy file; a file that fails validation leaves the old set in force."""
        result = self.policies.reload()
        if result.ok:
            log.info("policies reloaded: %s", ", ".join(result.policies))
        else:
            log.error("policy reload rejected, keeping %s: %s", ", ".join(result.policies), result.error)
        return result

    async def areload(self) -> ReloadResult:
        return await asyncio.to_thread(self.reload)

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.policies.changed):
                    await self.areload()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("policy file watch failed")

    # --- hook points ---

    async def check_input(self, exchange: Exchange) -> Verdict:
        model = exchange.body.get("model")
        active, shadows = self.policies.select(exchange.tenant, model if isinstance(model, str) else None)
        texts = scored_texts(exchange.messages, score_system=self.score_system)
        scores: list[PromptScore] | None = None
        if texts:
            with exchange.timed("inference"):
                scores = await self._score_prompts([t.text for t in texts])
        else:
            scores = []
        conv = ConversationSignals()
        state_failed = False
        if self.tracker is not None and scores is not None:
            with exchange.timed("state"):
                try:
                    conv = await asyncio.wait_for(self.tracker.observe(exchange, texts, scores), self.timeout)
                except Exception as exc:  # any tracker failure is a state failure: the policy decides
                    self.failures["state"] += 1
                    log.warning("conversation state failed for %s: %r", exchange.request_id, exc)
                    state_failed = True
        signals = _input_signals(texts, scores, conv, state_failed)
        state = _ExchangeState(active, shadows, texts, signals)
        exchange.state[STATE_KEY] = state
        with exchange.timed("policy"):
            for policy in state.policies():
                state.input[policy.ref] = policy.decide_input(signals)
        return state.input[active.ref].verdict()

    async def check_output(self, exchange: Exchange, choice: int, text: str, *, final: bool) -> Verdict:
        state = exchange.state.get(STATE_KEY)
        if not isinstance(state, _ExchangeState):
            return Verdict()  # no input check ran (guard added mid-flight): nothing to compare against
        prompt = _prompt_for_reply(state.texts)
        with exchange.timed("inference"):
            replies = await self._score_replies([(prompt, text)])
        signals = _output_signals(state.signals, replies[0] if replies else None)
        state.output_signals = signals
        n = exchange.body.get("n", 1)
        may_retry = not exchange.stream and not state.retried and (n is None or n == 1)
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
        return current.verdict()

    async def finish(self, exchange: Exchange) -> None:
        state = exchange.state.get(STATE_KEY)
        if not isinstance(state, _ExchangeState):
            return
        try:
            self._log_decisions(exchange, state)
            refused = self._refused(state)
            if self.tracker is not None and not state.signals.classifier_failed:
                try:
                    await asyncio.wait_for(self.tracker.record(exchange, refused=refused), self.timeout)
                except Exception as exc:
                    self.failures["state"] += 1
                    log.warning("conversation state record failed for %s: %r", exchange.request_id, exc)
            if self.drills is not None:
                active = state.output.get(state.active.ref) or state.input[state.active.ref]
                if _SEVERITY[state.input[state.active.ref].action] >= _SEVERITY[active.action]:
                    active = state.input[state.active.ref]
                shadows = [self._combined(state, p) for p in state.shadows]
                self.drills.submit_exchange(
                    exchange, state.output_signals or state.signals, active, shadows, state.active.thresholds()
                )
        except Exception:  # finish must not raise: count and log
            self.failures["finish"] += 1
            log.exception("guard finish failed for %s", exchange.request_id)

    # --- internals ---

    @staticmethod
    def _combined(state: _ExchangeState, policy: Policy) -> Decision:
        first = state.input[policy.ref]
        out = state.output.get(policy.ref)
        return out if out is not None and _SEVERITY[out.action] > _SEVERITY[first.action] else first

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
            ids = {"request_id": exchange.request_id, "tenant": exchange.tenant, "role": role}
            records.append(record_of(state.input[policy.ref], state.signals, **ids))
            out = state.output.get(policy.ref)
            if out is not None:
                records.append(record_of(out, state.output_signals or state.signals, **ids))
            if self.metrics is not None:
                worst = self._combined(state, policy)
                self.metrics.observe_decision(policy.name, worst.action.value, shadow=role == "shadow")
        dropped = self.decision_log.submit(records)
        if dropped and self.metrics is not None:
            self.metrics.counter("guardproxy_decision_log_dropped", "decision log records dropped").inc(dropped)

    async def _score_prompts(self, texts: list[str]) -> list[PromptScore] | None:
        try:
            scores = await asyncio.wait_for(self.classifier.score_prompts(texts), self.timeout)
        except Exception as exc:  # raised, timed out, or broken: the policy's on_classifier_failure decides
            self._classifier_failed(exc)
            return None
        if len(scores) != len(texts):
            self._classifier_failed(RuntimeError(f"{len(scores)} scores for {len(texts)} texts"))
            return None
        return scores

    async def _score_replies(self, pairs: list[tuple[str, str]]) -> list[ReplyScore] | None:
        try:
            scores = await asyncio.wait_for(self.classifier.score_replies(pairs), self.timeout)
        except Exception as exc:
            self._classifier_failed(exc)
            return None
        return scores if len(scores) == len(pairs) else None

    def _classifier_failed(self, exc: BaseException) -> None:
        self.failures["classifier"] += 1
        if self.metrics is not None:
            self.metrics.counter("guardproxy_classifier_failures", "classifier calls that raised or timed out").inc()
        log.warning("classifier failed: %r", exc)


def _input_signals(
    texts: Sequence[ScoredText], scores: Sequence[PromptScore] | None, conv: ConversationSignals, state_failed: bool
) -> Signals:
    if scores is None:
        return Signals(conversation=conv, classifier_failed=True, state_failed=state_failed)
    if not scores:
        return Signals(conversation=conv, state_failed=state_failed)
    # Turns an earlier request already checked (when the tracker vouches for the history) do not count again.
    pool = [s for t, s in zip(texts, scores, strict=True) if t.new] if conv.history == "verified" else list(scores)
    pool = pool or list(scores)
    top = max(pool, key=lambda s: s.harm)
    return Signals(
        harm=top.harm,
        category=top.category if top.harm > 0 else "none",
        jailbreak=max(s.jailbreak for s in pool),
        conversation=conv,
        state_failed=state_failed,
    )


def _output_signals(inp: Signals, reply: ReplyScore | None) -> Signals:
    if reply is None:
        return dataclasses.replace(inp, classifier_failed=True)
    if inp.classifier_failed:
        # The reply was scored but the prompt was not: reply harm counts, refusal conditions (which need the
        # prompt's harm to tell a false refusal) must not match.
        return dataclasses.replace(inp, classifier_failed=False, reply_harm=reply.reply_harm, refusal=None)
    return dataclasses.replace(inp, reply_harm=reply.reply_harm, refusal=reply.refusal)


# --- wiring ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardBundle:
    """What the gateway mounts: the pipeline, the guard's HTTP routes, and ``reload`` for SIGHUP."""

    pipeline: Pipeline
    routes: tuple[BaseRoute, ...] = ()
    guard: GuardCheck | None = None

    def reload(self) -> ReloadResult | None:
        return self.guard.reload() if self.guard is not None else None


def build_guard(
    settings: Settings,
    *,
    classifier: Classifier | None = None,
    tracker: ConversationTracker | None = None,
    drills: DrillSink | None = None,
    metrics: Metrics | None = None,
) -> GuardBundle:
    """Wire the guard from settings; the keyword arguments replace a part (tests inject fakes here).

    Raises ``PolicyError`` for a broken policy or mapping file and ``ClassifierError`` for a missing model:
    a gateway that cannot enforce its policy does not start.
    """
    if not settings.guard.enabled:
        return GuardBundle(pipeline=Pipeline())
    policies = PolicySet(settings.policy.active, settings.policy.shadows, mapping=settings.policy.mapping)
    if classifier is None:
        from guardproxy.classifier import OnnxClassifier

        classifier = OnnxClassifier.from_settings(settings.guard)
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
        watch_interval=1.0 if settings.policy.watch else None,
    )
    pipeline = Pipeline([guard], output_check_chars=policies.default.output.check_chars)
    token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    return GuardBundle(pipeline=pipeline, routes=admin_routes(guard, token, path), guard=guard)


# --- admin endpoints (the HTTP edge of the guard: kept here so domain code stays free of it) -----------


def admin_routes(guard: GuardCheck, token: str | None, decision_log: Path | None) -> tuple[BaseRoute, ...]:
    """POST /guard/admin/reload and GET /guard/admin/compare, behind the admin token (Bearer or
    ``x-guardproxy-admin-token``), compared in constant time. Without a configured token they answer 404."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def _error(status: int, message: str, code: str) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=status)

    def _authorized(request: Request) -> JSONResponse | None:
        if not token:
            return _error(404, "admin endpoints are disabled (no admin token configured)", "not_found")
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-guardproxy-admin-token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "admin token missing or wrong", "invalid_admin_token")
        return None

    async def reload_endpoint(request: Request) -> JSONResponse:
        if (denied := _authorized(request)) is not None:
            return denied
        result = await guard.areload()
        body = {"ok": result.ok, "policies": list(result.policies), "error": result.error}
        return JSONResponse(body, status_code=200 if result.ok else 422)

    async def compare_endpoint(request: Request) -> JSONResponse:
        if (denied := _authorized(request)) is not None:
            return denied

        def build() -> dict[str, Any]:
            if decision_log is not None and decision_log.is_file():
                return compare(read_log(decision_log)).to_dict()
            return compare(dataclasses.asdict(r) for r in guard.decision_log.recent()).to_dict()

        return JSONResponse(await asyncio.to_thread(build))

    routes: tuple[BaseRoute, ...] = (
        Route("/guard/admin/reload", reload_endpoint, methods=["POST"]),
        Route("/guard/admin/compare", compare_endpoint, methods=["GET"]),
    )
    return routes
