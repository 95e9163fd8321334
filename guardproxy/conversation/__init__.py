"""Conversation state: slow multi-turn escalation and refusal probing, caught at constant cost per request.

Chat APIs are stateless: every request carries the whole history. The tracker keys state by tenant (the gateway
key's tenant or the hash of the client's API key: never chosen by the client), optionally subdivided by the
request's ``user`` field and the ``x-guardproxy-conversation`` header (``subkey_of``), and by a keyed hash chain
over the messages (``integrity``), so a request that extends a known conversation finds the state of its longest
known prefix with one read, and scores only what it adds.

API (stable; used by ``guardproxy.guard`` and ``guardproxy score``)::

    tracker = build_tracker(settings, classifier, metrics=app.state.metrics)   # or ConversationTracker(...)
    obs = await tracker.observe(tenant, subkey, messages)      # before the upstream call
    obs.signals            # ConversationSignals: window_harm, trajectory, trend, escalation, refusal_events,
                           #   rephrase_similarity, history, turn_index
    obs.new_user_scores    # PromptScores of the user turns this request added and of those after its last assistant
                           #   turn (the ask the upstream answers now; cached when known; don't score them again);
    obs.new_user_indices   #   their positions in messages
    obs.state_failed       # the shared backend failed: local state answered, earlier turns may be missing
    await tracker.record_reply(tenant, subkey, messages, reply_text, refused=..., observation=obs)
                           # after relaying a reply: the reply (the text the gateway accumulated: content, then
                           # tool-call arguments) joins the keyed history, a refusal counts, the refused request's
                           # embedding joins the tenant's refusal memory. ``observation`` (optional) spares hashing
                           # the history again. reply_text=None: the client got an error status (refusal only).
                           # Call it before the client can send its next turn (on the final output check), or
                           # that turn waits ``reply_grace`` once before its last assistant turn counts as forged.
    results = await tracker.replay(messages)                   # list[TurnResult], one per user turn
    await tracker.aclose()

Signals (formulas in ``escalation``): the guard model on a window of the last four turns joined as
``"user: …\\nassistant: …"``; a decaying cumulative risk and its trend; refusals earlier in the conversation;
the highest cosine between this request and the last 32 refused requests of the tenant (any conversation, int8
embeddings); history integrity: ``verified`` (every assistant turn is one this gateway relayed, checked by
HMAC over a whitespace-free canonical form), ``forged`` (an assistant turn this gateway never relayed in a
conversation it knows), ``unverified`` (a conversation it never saw arrives with assistant turns), ``none`` (no
assistant turns). ``escalation >= FLAG_THRESHOLD`` (0.5) is the tracker's flag.

Cost: one state read (Redis: one pipelined round trip) and one append per request, one guard-model call with the
new user turns and the window, and hashing the history (a few microseconds per message); nothing grows with the
number of earlier turns except that hashing. State: 20 bytes per position, two positions per turn, and the last
three user turns' projected states for the window estimate (one blob of ~140 bytes per conversation, replaced).

Failure behaviour: state backend failures never raise and never hang a request: each call is bounded by
``settings.state.backend_timeout``, local state answers instead, ``state_failed`` says so, the outage is logged
once (naming the server and Redis's error, never the password) and counted in
``guardproxy_state_fallbacks_total``; writes made locally are replayed to Redis when it returns, and a history
verdict reached without them reads again as the replayed entries show (``ConversationTracker._history``). The
policy decides what ``state_failed`` means. Replicas whose ``state.hmac_secret`` differ on one prefix are reported
(``RedisBackend.check_secret``), not refused: a secret rotation runs both for a while.
A failing guard model raises ``ClassifierError`` from ``observe`` (the guard's classifier-failure path).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from guardproxy.conversation.escalation import FLAG_THRESHOLD, EscalationParams, window_text
from guardproxy.conversation.memory import MemoryBackend
from guardproxy.conversation.tracker import ConversationTracker, Observation, TurnResult, subkey_of
from guardproxy.errors import ConfigError
from guardproxy.settings import Settings
from guardproxy.signals import Classifier

__all__ = [
    "FLAG_THRESHOLD",
    "ConversationTracker",
    "EscalationParams",
    "MemoryBackend",
    "Observation",
    "TurnResult",
    "build_tracker",
    "subkey_of",
    "window_text",
]

logger = logging.getLogger(__name__)


def build_tracker(settings: Settings, classifier: Classifier, *, metrics: Any = None) -> ConversationTracker:
    """The tracker that ``settings.state`` describes: ``memory://`` (default) or ``redis://host:port/db``.

    ``metrics``: the gateway's ``Metrics`` (``app.state.metrics``) for the fallback counter; None keeps the
    counter in a private registry.
    """
    state = settings.state
    secret = state.hmac_secret.get_secret_value().encode()
    # one worker would run the two passes one after the other anyway: concurrency would only add wasted passes
    concurrent = settings.guard.concurrent_window and settings.guard.workers >= 2
    if settings.guard.concurrent_window and not concurrent:
        logger.warning("guard.concurrent_window needs guard.workers >= 2; the window pass stays after the turn pass")
    local = MemoryBackend(max_records=state.max_conversations, max_bytes=state.max_bytes, ttl_seconds=state.ttl_seconds)
    if state.url.startswith("memory://"):
        if not secret:
            secret = secrets.token_bytes(32)
            logger.warning(
                "state.hmac_secret is empty: using a random per-process secret; conversation history verified by "
                "this process will read as unverified after a restart"
            )
        return ConversationTracker(
            local,
            classifier,
            hmac_secret=secret,
            window_max_ids=settings.guard.window_max_ids,
            concurrent_window=concurrent,
        )
    if state.url.startswith(("redis://", "rediss://", "unix://")):
        if not secret:
            raise ConfigError("state.hmac_secret is required with a redis:// state backend (shared by all replicas)")
        from guardproxy.conversation.integrity import secret_fingerprint
        from guardproxy.conversation.redis_backend import RedisBackend, ResilientBackend

        try:
            primary = RedisBackend(
                state.url,
                prefix=state.prefix,
                ttl_seconds=state.ttl_seconds,
                secret_fingerprint=secret_fingerprint(secret),
            )
        except ValueError as exc:  # redis-py's own URL parsing: "Invalid value for 'db' in connection URL."
            raise ConfigError(f"state.url {_redacted(state.url)!r}: {exc}") from None
        backend = ResilientBackend(primary, local, timeout=state.backend_timeout, metrics=metrics)
        return ConversationTracker(
            backend,
            classifier,
            hmac_secret=secret,
            shared=True,
            reply_grace=min(0.25, 4 * state.backend_timeout),
            window_max_ids=settings.guard.window_max_ids,
            concurrent_window=concurrent,
        )
    raise ConfigError(f"state.url: unsupported scheme in {_redacted(state.url)!r} (memory:// or redis://host:port/db)")


def _redacted(url: str) -> str:
    """The URL without its password, as the drill store's errors show theirs: settings may carry one in it."""
    from guardproxy.drills.store import redact_url

    try:
        return redact_url(url)
    except ValueError:  # too broken to split: its scheme alone
        return url.partition(":")[0] + ":..."
