"""The conversation tracker: state per conversation, escalation signals per request, at constant cost.

See ``guardproxy.conversation`` for the API and the guarantees.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from guardproxy.conversation import escalation as esc
from guardproxy.conversation.integrity import (
    TAG_BYTES,
    Chain,
    History,
    better_history,
    build_chain,
    message_text,
    position_tag,
    reply_hash,
    tenant_key,
    worse_history,
)
from guardproxy.conversation.memory import MemoryBackend
from guardproxy.conversation.state import (
    ENTRY_BYTES,
    FAMILY_BYTES,
    NO_FAMILY,
    NO_SPACE,
    RISKS_KEPT,
    Loaded,
    Snapshot,
    StateBackend,
    TurnState,
    find_entry,
    pack_embedding,
    pack_turn_states,
    refused_risks,
    unpack_embeddings,
    unpack_turn_states,
)
from guardproxy.signals import Classifier, ConversationSignals, PromptScore

if TYPE_CHECKING:
    from guardproxy.early_exit import WindowEstimate

__all__ = ["ConversationTracker", "Observation", "RephraseCheck", "TurnResult", "subkey_of"]

logger = logging.getLogger(__name__)

CONVERSATION_HEADER = "x-guardproxy-conversation"
_TAIL_ENTRIES = 64  # entries read first: the last ~32 turns of a conversation and its recent branches
_LOOKBACK = 256  # positions searched for a known prefix; an older branch point counts as an unknown conversation
# A deferred window pass waits this long at most for ``Observation.start_window`` (the caller's upstream request on
# the wire); scoring during the send would slow it: tokenizing holds the GIL.
WINDOW_HOLD_S = 0.005


# (low, high) conversation signals -> could anything that reads them treat a value between the two unlike ``low``?
# (low, high, the highest harm the request can report): ``GuardCheck.conversation_sensitive``
RephraseCheck = Callable[[ConversationSignals, ConversationSignals, float], bool]


@dataclass(frozen=True)
class _Handle:
    """Where ``observe`` left a request: lets ``record_reply`` skip re-hashing the history and re-reading state."""

    tenant: str
    subkey: str | None
    root: bytes
    last_hash: bytes
    snapshot: Snapshot
    embedding: npt.NDArray[np.float32] | None
    family: bytes  # what a refusal of this request files it under in the tenant's refusal memory


@dataclass(frozen=True)
class Observation:
    """What ``observe`` found for one request.

    ``new_user_scores`` are the guard model's scores of the user turns this request asks with (``new_user_indices``
    are their positions in ``messages``), so the guard need not score them again: every user turn it added, and
    the user turns after its last assistant turn even where a known prefix holds them (the upstream answers them
    now; their scores come from the score cache). ``state_failed``: the state backend failed or was too slow and
    local state answered (the signals may miss earlier turns).
    """

    signals: ConversationSignals
    new_user_scores: tuple[PromptScore, ...] = ()
    new_user_indices: tuple[int, ...] = ()
    window: PromptScore | None = None
    # the window pass did not run: its harm in ``signals`` is the estimate from the user turns' own states
    window_estimated: bool = False
    state_failed: bool = False
    known: bool = False  # a stored position of this conversation was found
    # Positions in ``messages`` of the assistant turns this gateway cannot vouch for (``_unrelayed``), oldest first:
    # the guard reads their text. Empty for a verified history, whatever its length.
    unverified: tuple[int, ...] = ()
    rephrase_matches: tuple[tuple[float, float], ...] = ()  # (cosine, risk when refused) of the closest refusals
    # The family (hex) this request rewords: its anchor, the family's first refused request, is at the tracker's
    # ``rephrase_low`` or closer (``ConversationTracker._rephrase``); else None. A refusal of this request joins that
    # family; a refused request that rewords none starts its own (``family``). Drill records carry it, so the drill
    # report's decision consistency compares the rewordings the guard itself matched.
    rephrase_family: str | None = None
    handle: _Handle | None = field(default=None, repr=False, compare=False)  # pass it back to record_reply
    # ``observe(defer_window=True)`` with a window pass to run: the final observation (these signals are provisional)
    pending: asyncio.Future[Observation] | None = field(default=None, repr=False, compare=False)
    # and what starts it before ``WINDOW_HOLD_S`` has passed (idempotent)
    window_go: asyncio.Future[None] | None = field(default=None, repr=False, compare=False)

    @property
    def family(self) -> str | None:
        """The family a refusal of this request is filed under (hex): the one it rewords, else its own."""
        if self.rephrase_family is not None:
            return self.rephrase_family
        return self.handle.family.hex() if self.handle is not None else None

    def start_window(self) -> None:
        if self.window_go is not None and not self.window_go.done():
            self.window_go.set_result(None)


async def _held(go: asyncio.Future[None] | None) -> None:
    """Wait for a deferred window's go, ``WINDOW_HOLD_S`` at most."""
    if go is not None:  # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancellation
        await asyncio.wait((go,), timeout=WINDOW_HOLD_S)


@dataclass(frozen=True)
class TurnResult:
    """One user turn of a replayed conversation."""

    index: int  # position of the user message in ``messages``
    harm: float  # the guard model's harm on this turn alone
    escalation: float
    signals: ConversationSignals
    prompt: PromptScore | None = None
    rephrase_matches: tuple[tuple[float, float], ...] = ()
    window: PromptScore | None = None  # the window pass's score, when this turn ran one

    @property
    def flagged(self) -> bool:
        return self.escalation >= esc.FLAG_THRESHOLD


def _prefix_history(chain: Chain, end: int, record: bytes) -> History:
    """The history of messages ``0..end`` of ``chain`` as ``record`` has it now: ``verified`` when every assistant
    turn's position holds an entry of a reply this gateway relayed; ``forged`` when one does not although an earlier
    position of the conversation holds an entry (the gateway knew the conversation before that turn); ``unverified``
    when the only such turns came before any known position; ``none`` without assistant turns."""
    start = len(record) % ENTRY_BYTES  # a torn head is skipped, as ``find_entry`` does
    newest = {record[p : p + TAG_BYTES]: p for p in range(start, len(record), ENTRY_BYTES)}
    history: History = "none"
    known = False  # a position before this one holds an entry
    for i in range(end + 1):
        if chain.roles[i] != "assistant":
            known = known or chain.tag(i) in newest
            continue
        at = newest.get(chain.tag(i))
        if at is not None and Snapshot.unpack(record[at + TAG_BYTES : at + ENTRY_BYTES]).relayed:
            history = worse_history(history, "verified")
        elif known:
            return "forged"
        else:
            history = "unverified"
        known = known or at is not None
    return history


def _unrelayed(
    chain: Chain, found: int | None, history: History, prefix: History, record: bytes
) -> tuple[tuple[int, ...], bool]:
    """The positions in ``messages`` of the assistant turns of ``chain`` that this gateway did not relay, for a
    request whose longest stored prefix ends at message ``found`` and whose verdict is ``history`` (the prefix's own
    is ``prefix``): every one after ``found`` (all of them when no prefix is known), and, when ``prefix`` is neither
    ``verified`` nor ``none``, those up to ``found`` whose position holds no entry of a relayed reply in ``record``.
    Also whether one of those has no entry at all in ``record`` (a tail may not reach it). A verified history costs
    nothing here."""
    if history in ("verified", "none"):
        return (), False
    start = 0 if found is None else found + 1
    out = [i for i in range(start, len(chain)) if chain.roles[i] == "assistant"]
    absent = False
    if found is not None and prefix not in ("verified", "none"):
        newest = {record[p : p + TAG_BYTES]: p for p in range(len(record) % ENTRY_BYTES, len(record), ENTRY_BYTES)}
        old = []
        for i in range(found + 1):
            if chain.roles[i] != "assistant":
                continue
            at = newest.get(chain.tag(i))
            if at is None or not Snapshot.unpack(record[at + TAG_BYTES : at + ENTRY_BYTES]).relayed:
                old.append(i)
                absent = absent or at is None
        out = old + out
    return tuple(chain.indices[i] for i in out), absent


def _trailing_users(chain: Chain) -> list[int]:
    """The user turns after the last assistant turn of ``chain``: the ask the upstream answers next, however many
    requests brought them."""
    out: list[int] = []
    for i in range(len(chain) - 1, -1, -1):
        role = chain.roles[i]
        if role == "assistant":
            break
        if role == "user":
            out.append(i)
    return out[::-1]


def subkey_of(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The client's subdivision of its tenant: the request's ``user`` and the conversation header."""
    user = body.get("user")
    conv = headers.get(CONVERSATION_HEADER)
    parts = [user if isinstance(user, str) else "", conv or ""]
    return None if not any(parts) else "\0".join(parts)


@dataclass(frozen=True)
class _Pending:
    snapshot: Snapshot
    embedding: npt.NDArray[np.float32] | None
    family: bytes


class _ScoreCache:
    """Prompt scores by content hash (LRU): a turn seen before, in any conversation, is never scored twice."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[bytes, PromptScore] = OrderedDict()

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]

    def get(self, text: str) -> PromptScore | None:
        k = self.key(text)
        hit = self._data.get(k)
        if hit is not None:
            self._data.move_to_end(k)
        return hit

    def put(self, text: str, score: PromptScore) -> None:
        if self.size <= 0:
            return
        self._data[self.key(text)] = score
        while len(self._data) > self.size:
            self._data.popitem(last=False)


_W = TypeVar("_W")


class _Rephrase:
    """Rephrase similarity of one request's user turns to its tenant's refused requests.

    While ``unresolved`` (some turns exited early, so have no embedding, and the tracker lets them: ``deferred``),
    ``value`` and ``pairs`` are a lower bound, from the other turns; ``resolve`` runs the whole model on the exited
    turns."""

    def __init__(
        self,
        tracker: ConversationTracker,
        texts: list[str],
        scores: list[PromptScore],
        refused: tuple[bytes, ...],
        *,
        lazy: bool,
    ) -> None:
        self._tracker = tracker
        self._texts = texts
        self._refused = refused
        self.scores = scores
        self.value, self.pairs, self.family = tracker._rephrase(scores, refused)
        self.unresolved = self.deferred = lazy and any(s.exited for s in scores)
        self.top_risk = max(refused_risks(refused, tracker.embedding_space), default=0.0) if self.unresolved else 0.0
        # the highest harm the request can report while the exited turns stay exited (their harm is the head's
        # estimate, under its line); 1.0 when the request carries tool results, which the guard scores apart
        self.harm_bound = max((s.harm for s in scores), default=0.0)

    @property
    def floor(self) -> float:
        """The lowest the similarity could be: ``value`` when some turn has an embedding; -1 when none has (the
        reported 0 then is a convention, not a bound)."""
        return self.value if any(not s.exited for s in self.scores) else -1.0

    async def resolve(self) -> None:
        """The whole model on the exited turns: their embeddings make the similarity exact."""
        self.scores = await self._tracker._scores_for(self._texts, exact=True)
        self.value, self.pairs, self.family = self._tracker._rephrase(self.scores, self._refused)
        self.unresolved = False

    async def gated(self, window: _W | None, open_at: Callable[..., bool]) -> _W | None:
        """``window`` if the window gate (``open_at(rephrase=...)``) is open at this similarity, resolved first when
        the exited turns could open it; None without a window."""
        if window is None:
            return None
        if self.unresolved and open_at(rephrase=1.0) != open_at(rephrase=self.value):
            await self.resolve()
        return window if open_at(rephrase=self.value) else None


class ConversationTracker:
    """Conversation state and escalation signals. One per process, shared by every request.

    ``shared``: the backend is shared by several processes (Redis), so a reply may be recorded by another
    process; an assistant turn right after a request that has no recorded reply yet is then re-checked once
    after ``reply_grace`` seconds before it counts as forged.

    ``rephrase_check``: lets a turn exit early (``PromptScore.exited``, no embedding) for a tenant with refused
    requests in memory. Rephrase similarity compares whole-model embeddings, so without it such a tenant's turns
    always run the whole model. With it, a request whose turns exited is concluded first with the similarity of
    its other turns (a lower bound; -1 when none has an embedding) and again with the highest the exited turns could
    add (similarity 1 to the refused request of highest risk). Only when the check says something could read the
    two differently (the guard asks every loaded policy and drill sampling: ``GuardCheck.conversation_sensitive``)
    do the exited turns run the whole model. Otherwise the request reports the other turns' similarity (0 when
    there are none), which decides as every value between the two ends does.
    """

    def __init__(
        self,
        backend: StateBackend,
        classifier: Classifier,
        *,
        hmac_secret: bytes,
        window_turns: int = esc.WINDOW_TURNS,
        window_max_ids: int | None = esc.WINDOW_MAX_IDS,
        params: esc.EscalationParams | None = None,
        score_cache_size: int = 2048,
        pending_size: int = 4096,
        reply_grace: float = 0.2,
        shared: bool = False,
        concurrent_window: bool = False,
        rephrase_check: RephraseCheck | None = None,
    ) -> None:
        if not hmac_secret:
            raise ValueError("hmac_secret must not be empty")
        self.backend = backend
        self.classifier = classifier
        self.window_turns = max(1, min(window_turns, esc.WINDOW_TURNS))
        self.window_max_ids = window_max_ids  # None: the model's own maximum
        self.params = params or esc.EscalationParams()
        self.reply_grace = reply_grace
        self.shared = shared
        # Start the window pass beside the new turn's pass (a classifier with >= 2 workers runs them at once): the
        # latency of a conversation turn becomes the longer pass, not the sum. A closed gate cancels it (or drops
        # its result): CPU spent for nothing on those requests, which is why it is opt-in.
        self.concurrent_window = concurrent_window
        self.rephrase_check = rephrase_check
        # called once per final observation whose turns exited with refusals in memory: True when they then ran
        # the whole model for their similarity, False when its lower bound stood
        self.observe_rephrase: Callable[[bool], None] | None = None
        # called once per request whose window pass was skipped on the window estimate (``_estimated_window``)
        self.observe_estimate: Callable[[], None] | None = None
        # called with ("state_lookup", seconds) once per ``observe`` (the hash chain over the request, the state read
        # and the prefix match, a reply grace included) and ("state_store", seconds) per state write (``observe``'s
        # and ``record_reply``'s), unless ``observe`` was given the exchange's ``timings``: the gateway's stage
        # metrics, apart from the inference that ``state`` also holds
        self.observe_timing: Callable[[str, float], None] | None = None
        self._secret = hmac_secret
        # keys the kept turn states by text (``_turn_key``): a keyed hash, so shared state holds no text digest
        self._turn_key_secret = hmac.digest(hmac_secret, b"turn-state", "sha256")
        self._scores = _ScoreCache(score_cache_size)
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._pending_size = pending_size

    async def aclose(self) -> None:
        await self.backend.aclose()

    def _timing(self, stage: str, since: float, timings: dict[str, float] | None = None) -> None:
        seconds = time.perf_counter() - since
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + seconds
        elif self.observe_timing is not None:
            self.observe_timing(stage, seconds)

    # -- reading state --------------------------------------------------------------------------------------------

    async def _locate(self, chain: Chain, loaded: Loaded, root: bytes) -> tuple[int | None, Snapshot | None, Loaded]:
        """The longest prefix of ``chain`` with a stored entry: (its last index, its snapshot, the read used)."""
        lo = max(0, len(chain) - _LOOKBACK)
        tags: dict[int, bytes] = {}  # computed on demand: the match is nearly always one or two positions back
        for attempt in range(2):
            for i in range(len(chain) - 1, lo - 1, -1):
                tag = tags.get(i) or tags.setdefault(i, chain.tag(i))
                snap = find_entry(loaded.record, tag)
                if snap is not None:
                    return i, snap, loaded
            if attempt or loaded.complete:
                break
            full = await self.backend.load_record(root)
            loaded = replace(
                full, refused=loaded.refused, degraded=loaded.degraded or full.degraded, turn_states=loaded.turn_states
            )
        return None, None, loaded

    async def _load(self, chain: Chain, tkey: bytes) -> tuple[int | None, Snapshot | None, Loaded]:
        """The conversation's stored state: ``_locate`` on a fresh read, read again once if a reply may be in flight."""
        loaded = await self.backend.load(chain.root, tkey, tail_entries=_TAIL_ENTRIES)
        found, snap, loaded = await self._locate(chain, loaded, chain.root)
        if self._reply_may_be_in_flight(chain, found, snap):
            await asyncio.sleep(self.reply_grace)
            again = await self.backend.load(chain.root, tkey, tail_entries=_TAIL_ENTRIES)
            found, snap, loaded = await self._locate(chain, again, chain.root)
        return found, snap, loaded

    async def _scores_beside(
        self, texts: Sequence[str], early_window: asyncio.Task[list[PromptScore]] | None, *, exact: bool
    ) -> list[PromptScore]:
        """``_scores_for``; a window pass started beside it does not outlive its failure."""
        try:
            return await self._scores_for(texts, exact=exact)
        except BaseException:
            if early_window is not None:
                early_window.cancel()
            raise

    async def _scores_for(self, texts: Sequence[str], *, exact: bool = False) -> list[PromptScore]:
        """Scores of ``texts``, cached by content: one classifier call for those not seen before. ``exact``: the
        whole model's scores with embeddings, never an early exit (``PromptScore.exited``)."""
        out: list[PromptScore | None] = [self._scores.get(t) for t in texts]
        if exact:
            out = [None if s is not None and s.exited else s for s in out]
        todo = list(dict.fromkeys(t for t, s in zip(texts, out, strict=True) if s is None))
        scored = await self.classifier.score_prompts(todo, exact=exact) if todo else []
        by_text = dict(zip(todo, scored, strict=True))
        for t, s in by_text.items():
            self._scores.put(t, s)
        return [s if s is not None else by_text[t] for t, s in zip(texts, out, strict=True)]

    async def _scored(
        self,
        texts: list[str],
        early_window: asyncio.Task[list[PromptScore]] | None,
        refused: tuple[bytes, ...],
        *,
        exact: bool = False,
        roles: Sequence[str] = (),
    ) -> _Rephrase:
        """The scores of a request's new user turns, with their rephrase similarity to the tenant's ``refused``
        requests. That needs whole-model embeddings: with refused requests in memory every turn runs the whole
        model, unless a ``rephrase_check`` lets turns exit and settles the similarity later (``_Rephrase``).
        ``exact``: every turn runs the whole model anyway (the caller's policies read below the exit's lines).
        ``roles``: the request's message roles (a tool result in it, scored by the guard, lifts its harm bound)."""
        lazy = bool(refused) and self.rephrase_check is not None and not exact
        scores = await self._scores_beside(texts, early_window, exact=exact or (bool(refused) and not lazy))
        rp = _Rephrase(self, texts, scores, refused, lazy=lazy)
        if any(r in ("tool", "function") for r in roles):
            rp.harm_bound = 1.0
        return rp

    def _start_window(self, chain: Chain, n: int, scored: Sequence[int]) -> asyncio.Task[list[PromptScore]] | None:
        """The window pass of this request, started now (``concurrent_window``); None when that is off, there is no
        window, or no new turn to score beside it (a cached turn costs nothing, so the cascade loses no time)."""
        if not self.concurrent_window:
            return None
        src = self._window(chain, n - 1)
        if src is None or all(self._scores.get(chain.text(i)) is not None for i in scored):
            return None
        text, newest = src
        # started before the new turn's score is known, so it cannot pass ``_window_exact``: the whole model
        task = asyncio.ensure_future(
            self.classifier.score_prompts([text], max_length=self.window_max_ids, newest=[newest], exact=True)
        )
        # a cancelled or unneeded pass may still fail: retrieve its outcome so it is never reported as lost
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _window_exact(self, exact: bool, risks: Sequence[float]) -> bool:
        """Whether the window pass must run the whole model: ``exact``, or ``risks`` (the trajectory and the last
        ``window_turns`` user turns' harm: every user turn in the window among them) reach the window head's harm
        line (``guardproxy.early_exit``). The head reads the mean of the window's early states, in which one harmful
        turn after long harmless ones is diluted (a window ending in a plain bomb-making ask, whole model 0.85,
        exited in a test); the turns' own scores are known by now, so such a window never exits."""
        window = getattr(getattr(self.classifier, "early_exit", None), "window", None)
        if exact or window is None:
            return exact
        return max(risks, default=0.0) >= float(window.harm_line)

    @property
    def embedding_space(self) -> bytes:
        """The classifier's embedding space (``OnnxClassifier.embedding_space``): refusal memory written in another
        (another model or projection, on this replica before an upgrade or on another one) is never compared."""
        space = getattr(self.classifier, "embedding_space", NO_SPACE)
        return space if isinstance(space, bytes) and len(space) == len(NO_SPACE) else NO_SPACE

    def _window_estimate(self) -> WindowEstimate | None:
        return getattr(getattr(self.classifier, "early_exit", None), "window_estimate", None)

    def _turn_key(self, text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=self._turn_key_secret).digest()

    def _kept_states(self, loaded: Loaded) -> list[TurnState]:
        """The user-turn states kept in the conversation's state (newest source first), for this projection."""
        estimate = self._window_estimate()
        if estimate is None:
            return []
        return [t for blob in loaded.turn_states for t in unpack_turn_states(blob, estimate.fingerprint, estimate.dims)]

    def _turn_states_blob(
        self, kept: Sequence[TurnState], chain: Chain, scored: Sequence[int], scores: Sequence[PromptScore]
    ) -> bytes | None:
        """The conversation's kept states after this request: its new user turns' states after the kept ones, the
        last ``window_turns - 1`` (the most a later window holds besides its own new turn); None when this request
        has none to add (nothing is written)."""
        estimate = self._window_estimate()
        if estimate is None:
            return None
        new = [
            TurnState(self._turn_key(chain.text(i)), s.harm, s.state)
            for i, s in zip(scored, scores, strict=True)
            if len(s.state) == estimate.dims
        ]
        if not new:
            return None
        fresh = {t.key for t in new}
        first: dict[bytes, TurnState] = {}
        for t in kept:
            first.setdefault(t.key, t)  # once each, in the newest source's order
        older = [t for k, t in first.items() if k not in fresh]
        return pack_turn_states(estimate.fingerprint, [*older, *new][-max(1, self.window_turns - 1) :])

    def _estimated_window(
        self,
        chain: Chain,
        n: int,
        scored: Sequence[int],
        scores: Sequence[PromptScore],
        *,
        exact: bool,
        kept: Sequence[TurnState] = (),
    ) -> esc.WindowEstimateReading | None:
        """The estimated harm of the window ending at message ``n - 1``, from its user turns' own states
        (``guardproxy.early_exit.WindowEstimate``), with the gate it is held to. A state comes from this request's
        scores, this process's score cache, or the states ``kept`` in the conversation's state (written by whichever
        replica scored the turn). None where the classifier has no estimate, the window does not end with a user
        turn, or a user turn in it has no state (scored by the whole model, or by a gateway that kept none), and for
        an ``exact`` request (its policies read below the early-exit lines), which never trusts an estimate. None
        runs the pass."""
        estimate = self._window_estimate()
        if estimate is None or exact or chain.roles[n - 1] != "user":
            return None
        by_index = dict(zip(scored, scores, strict=True))
        by_key = {t.key: t for t in kept}  # a state is the text's and the model's alone: any source will do
        start = max(0, n - self.window_turns)
        turns: list[tuple[float, npt.NDArray[np.float32]]] = []
        for i in range(start, n):
            text = chain.text(i) if chain.roles[i] == "user" else ""
            if not text:
                continue
            s = by_index.get(i) or self._scores.get(text)
            if s is not None and len(s.state) == estimate.dims:
                turns.append((s.harm, s.state))
            elif (t := by_key.get(self._turn_key(text))) is not None:
                turns.append((t.harm, t.state))
            else:
                return None
        if not turns:
            return None
        value = estimate.estimate(turns[-1][1], [st for _, st in turns[:-1]], [h for h, _ in turns])
        return esc.WindowEstimateReading(value, estimate.gate)

    def _estimate_stands(self, estimated: esc.WindowEstimateReading) -> float:
        """The window's harm when its estimate closed the gate (counted by ``observe_estimate``)."""
        if self.observe_estimate is not None:
            self.observe_estimate()
        return estimated.harm

    def _window(self, chain: Chain, end: int) -> tuple[str, str] | None:
        """The window ending at message ``end`` and its newest turn, both in the window format; None: one turn."""
        start = max(0, end + 1 - self.window_turns)
        turns = [(chain.roles[i], text) for i in range(start, end + 1) if (text := chain.text(i))]
        return (esc.window_text(turns), esc.window_text(turns[-1:])) if len(turns) >= 2 else None

    def _signals(self, state: Snapshot, similarity: float, pairs: Sequence[tuple[float, float]]) -> ConversationSignals:
        """The conversation signals of ``state`` with this rephrase similarity and these (cosine, risk) pairs."""
        trend_value = esc.trend(state.risks)
        score = esc.escalation(
            window=state.window,
            trajectory=state.trajectory,
            trend_value=trend_value,
            refusals=state.refusals,
            rephrase=pairs,
            history=state.history,
            p=self.params,
        )
        return ConversationSignals(
            window_harm=state.window,
            trajectory=state.trajectory,
            trend=trend_value,
            escalation=score,
            refusal_events=state.refusals,
            rephrase_similarity=similarity,
            history=state.history,
            turn_index=state.turns,
        )

    async def _settled_signals(self, state: Snapshot, rp: _Rephrase, *, final: bool) -> ConversationSignals:
        """The signals of ``state``. While exited turns leave the similarity unresolved, a final observation asks
        ``rephrase_check`` about the lower bound and the highest they could reach (similarity 1 to the refused
        request of highest risk; escalation grows with both), and the exited turns run the whole model only when it
        says that could change something. Provisional signals keep the lower bound."""
        low = self._signals(state, rp.value, rp.pairs)
        if not (final and rp.deferred):
            return low
        if rp.unresolved:
            floor = replace(low, rephrase_similarity=rp.floor)  # ``low`` lies between: it decides as both ends do
            if self._could_matter(floor, self._signals(state, 1.0, (*rp.pairs, (1.0, rp.top_risk))), rp.harm_bound):
                await rp.resolve()
                low = self._signals(state, rp.value, rp.pairs)
        if self.observe_rephrase is not None:
            self.observe_rephrase(not rp.unresolved)
        return low

    def _could_matter(self, low: ConversationSignals, high: ConversationSignals, harm: float) -> bool:
        """``rephrase_check``; a check that fails counts as "it could" (the whole model then settles it)."""
        assert self.rephrase_check is not None
        try:
            return self.rephrase_check(low, high, harm)
        except Exception:
            logger.exception("rephrase check failed; running the whole model on the exited turns")
            return True

    def _rephrase(
        self, scores: Sequence[PromptScore], refused: tuple[bytes, ...]
    ) -> tuple[float, tuple[tuple[float, float], ...], bytes | None]:
        """(max cosine, (cosine, risk when refused) of the closest few, the family this request rewords) between
        this request's user turns and the tenant's refused requests. Turns that exited early have no embedding and
        are left out.

        The family is the one whose anchor is closest, at ``rephrase_low`` or above; None when no anchor is that
        close. A family's anchor is its oldest refused request still in memory: the one that started it, until newer
        refusals push it out (the memory keeps the tenant's last 32 by default; then the oldest member left stands
        in). Matching the anchor, not any member, keeps a family from chaining: B rewords A, C is close to B but not
        to A, so C starts its own."""
        embeddings = [s.embedding for s in scores if not s.exited]
        if not refused or not embeddings:
            return 0.0, (), None
        e = np.stack([np.asarray(v, dtype=np.float32).ravel() for v in embeddings])
        memory = unpack_embeddings(refused, e.shape[1], self.embedding_space)
        if not len(memory):
            return 0.0, (), None
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sims = np.clip(np.max(e @ memory.matrix.T, axis=0), -1.0, 1.0)
        top = np.argsort(-sims)[:4]
        anchors = {f: i for i, f in enumerate(memory.families) if f != NO_FAMILY}  # newest first: the oldest wins
        near = [(float(sims[i]), f) for f, i in anchors.items() if sims[i] >= self.params.rephrase_low]
        family = max(near)[1] if near else None
        return float(sims[top[0]]), tuple((float(sims[i]), float(memory.risks[i])) for i in top), family

    # -- the API --------------------------------------------------------------------------------------------------

    async def observe(
        self,
        tenant: str,
        subkey: str | None,
        messages: Sequence[Any],
        *,
        defer_window: bool = False,
        exact: bool = False,
        timings: dict[str, float] | None = None,
    ) -> Observation:
        """Signals of one request. Scores only what this request adds to a known conversation, every new user turn
        however many, and reads the user turns after its last assistant turn from the score cache (scored again
        only on a miss): the upstream answers them now, whichever request brought them.

        ``defer_window``: when this request needs a window pass, return as soon as its new turns are scored, with
        provisional signals (the window read as the last turn alone, as a closed gate reads it) and the final
        observation in ``pending``, which runs the window pass and only then stores the request's state. Await or
        cancel ``pending``; the provisional signals are never stored.

        ``exact``: neither a new turn nor the window exits early (``PromptScore.exited``); the gateway asks this for a
        request whose policies read below the lines the early-exit heads were fitted for.

        ``timings``: the exchange's stage times; this request's ``state_lookup`` and ``state_store`` are added to it
        (the gateway's ``Server-Timing`` and stage metrics) instead of going to ``observe_timing``.

        Raises ``ClassifierError`` when the guard model fails; state backend failures never raise
        (``state_failed`` says local state answered).
        """
        started = time.perf_counter()
        chain = build_chain(self._secret, tenant, subkey, messages)
        n = len(chain)
        if n == 0:
            return Observation(ConversationSignals())
        root = chain.root
        found, snap, loaded = await self._load(chain, tenant_key(self._secret, tenant))
        kept = self._kept_states(loaded)
        failed = loaded.degraded
        prev = snap or Snapshot()
        start = 0 if found is None else found + 1
        history = await self._history(chain, found, prev, loaded)
        unverified = await self._unverified(chain, found, history, prev.history, loaded)
        self._timing("state_lookup", started, timings)

        new_users = [i for i in range(start, n) if chain.roles[i] == "user"]
        repeat = start == n  # the exact request again (a retry, or a regenerated reply)
        # Every user turn the upstream reads as this request's ask counts: the new ones, all of them, and the run of
        # user turns after the last assistant turn even where a known prefix holds it (a blocked ask is stored as a
        # position before the verdict; re-sent with more turns after it, it is still being asked). A known turn is
        # a score-cache hit; only the new ones move the conversation's state.
        scored = sorted({*new_users, *_trailing_users(chain)})
        early_window = self._start_window(chain, n, scored) if not repeat else None
        rp = await self._scored(
            [chain.text(i) for i in scored], early_window, loaded.refused, exact=exact, roles=chain.roles
        )
        added = [(i, s) for i, s in zip(scored, rp.scores, strict=True) if i >= start]

        async def conclude(
            state: Snapshot, window: PromptScore | None, *, final: bool = True, estimated: bool = False
        ) -> Observation:
            """The observation of ``state``; a final one is stored (unless a repeat) and remembered for the reply."""
            # Signals come from the state as stored (to 1/254), so a retry served from state reads exactly the same.
            state = Snapshot.unpack(state.pack())
            signals = await self._settled_signals(state, rp, final=final)
            state = replace(state, escalation=signals.escalation)
            tag = chain.tag(n - 1)
            state_failed = failed
            embedding = rp.scores[-1].embedding if rp.scores else None
            # a refusal of this request joins the family it rewords, else starts its own
            family = rp.family if rp.family is not None else chain.hashes[-1][:FAMILY_BYTES]
            if final:
                if not repeat:
                    blob = self._turn_states_blob(kept, chain, [i for i, _ in added], [s for _, s in added])
                    stored = time.perf_counter()
                    state_failed = not await self.backend.append(root, state.entry(tag), blob) or failed
                    self._timing("state_store", stored, timings)
                self._remember(tag, _Pending(state, embedding, family))
            return Observation(
                signals=signals,
                new_user_scores=tuple(rp.scores),
                new_user_indices=tuple(chain.indices[i] for i in scored),
                window=window,
                window_estimated=estimated,
                state_failed=state_failed,
                known=found is not None,
                unverified=unverified,
                rephrase_matches=rp.pairs,
                rephrase_family=rp.family.hex() if rp.family is not None else None,
                handle=_Handle(tenant, subkey, root, chain.hashes[-1], state, embedding, family),
            )

        if repeat:
            return await conclude(replace(prev, history=history), None)
        traj = prev.trajectory
        risks = list(prev.risks)
        for _, s in added:
            traj = esc.trajectory_step(traj, s.harm, self.params)
            risks.append(s.harm)

        def snapshot(window_harm: float) -> Snapshot:
            return Snapshot(
                turns=prev.turns + len(new_users),
                trajectory=traj,
                window=window_harm,
                peak=max([prev.peak, *(s.harm for _, s in added)]),
                risks=tuple(risks[-RISKS_KEPT:]),
                refusals=prev.refusals,
                history=history,
                relayed=False,
                last_refused=prev.last_refused,
            )

        window_of = self._window(chain, n - 1)
        # a one-turn request has no window to estimate: the turn is its own window
        estimated = (
            None if window_of is None else self._estimated_window(chain, n, scored, rp.scores, exact=exact, kept=kept)
        )
        gate_open = functools.partial(
            esc.window_gate_open,
            trajectory=traj,
            recent_risks=risks[-self.window_turns :],
            refusals=prev.refusals,
            history=history,
            p=self.params,
            estimate=estimated,
        )
        window_src = await rp.gated(window_of, gate_open)
        # a one-turn window is the turn itself; a closed gate's window is its estimate (or the turn, without one)
        turn_harm = rp.scores[-1].harm if scored and chain.roles[-1] == "user" else 0.0
        if window_src is None:
            if early_window is not None:
                early_window.cancel()  # the gate stayed closed: its result is not needed
            closed = turn_harm if estimated is None else self._estimate_stands(estimated)
            return await conclude(snapshot(closed), None, estimated=estimated is not None)

        go = asyncio.get_running_loop().create_future() if defer_window and early_window is None else None

        async def with_window() -> Observation:
            # a window is never seen twice: no cache in front of this call
            if early_window is not None:
                (window,) = await early_window
            else:
                await _held(go)
                (window,) = await self.classifier.score_prompts(
                    [window_src[0]],
                    max_length=self.window_max_ids,
                    newest=[window_src[1]],
                    exact=self._window_exact(exact, [traj, *risks[-self.window_turns :]]),
                )
            return await conclude(snapshot(window.harm), window)

        if not defer_window:
            return await with_window()
        pending = asyncio.ensure_future(with_window())
        try:
            provisional = await conclude(snapshot(turn_harm), None, final=False)
        except BaseException:
            pending.cancel()
            raise
        return replace(provisional, pending=pending, window_go=go)

    def _reply_may_be_in_flight(self, chain: Chain, found: int | None, snap: Snapshot | None) -> bool:
        """An assistant turn right after a request whose reply is not recorded yet: maybe it is being recorded."""
        if found is None or snap is None or snap.relayed or found + 1 >= len(chain):
            return False
        if chain.roles[found + 1] != "assistant" or self.reply_grace <= 0:
            return False
        return self.shared or chain.tag(found) in self._pending

    async def _history(self, chain: Chain, found: int | None, prev: Snapshot, loaded: Loaded) -> History:
        """The history of a request whose longest stored prefix ends at message ``found`` (``prev`` stored there).

        An assistant turn after ``found`` was never relayed after a prefix this gateway knows: forged. The prefix's
        own verdict is the one stored with it, reached when that position was stored. A ``verified`` (or ``none``)
        one stands: a later write only adds relayed replies. A ``forged`` or ``unverified`` one may have been
        reached without a write that was on its way: a replica cut off from Redis keeps the replies it relays in
        local state and replays them when it answers again, and a reply may be recorded after the grace. So it is
        derived again from the messages and the record (``_rederived``), and the better of the two stands: once the
        missing replies are found the conversation reads verified again, while a forged turn, which stays in every
        later request's history, is found missing again and keeps the conversation forged. A truncated record, or
        a read local state answered, keeps the stored verdict."""
        new_assistant = "assistant" in chain.roles[0 if found is None else found + 1 :]
        if found is None:
            return "unverified" if new_assistant else "none"
        if new_assistant:  # never relayed after a prefix this gateway knows
            return worse_history(prev.history, "unverified" if loaded.truncated else "forged")
        if prev.history not in ("forged", "unverified") or loaded.truncated or loaded.degraded:
            return prev.history
        again = await self._rederived(chain, found, loaded)
        return prev.history if again is None else better_history(prev.history, again)

    async def _rederived(self, chain: Chain, end: int, loaded: Loaded) -> History | None:
        """The history of messages ``0..end`` from the stored entries alone (``_prefix_history``); the whole record
        is read when the tail at hand cannot show every reply relayed. None when that read cannot say (local state
        answered, or the record was truncated)."""
        history = _prefix_history(chain, end, loaded.record)
        if history in ("verified", "none") or loaded.complete:
            return history
        full = await self.backend.load_record(chain.root)
        if full.degraded or full.truncated:
            return None
        return _prefix_history(chain, end, full.record)

    async def _unverified(
        self, chain: Chain, found: int | None, history: History, stored: History, loaded: Loaded
    ) -> tuple[int, ...]:
        """``Observation.unverified`` (``_unrelayed``): the prefix's own verdict is the request's ``history`` unless the
        request adds assistant turns (``_history`` then read the ``stored`` one). Only for a history that is not
        verified, and only when the tail at hand holds no entry of some assistant turn of the prefix, is the whole
        record read (as ``_rederived`` reads it): a reply relayed long ago is then not read again on every request.
        A position a truncated record dropped counts as not relayed."""
        adds_assistant = "assistant" in chain.roles[0 if found is None else found + 1 :]
        prefix = stored if adds_assistant else history
        unverified, absent = _unrelayed(chain, found, history, prefix, loaded.record)
        if not absent or loaded.complete or loaded.degraded:
            return unverified
        full = await self.backend.load_record(chain.root)
        return unverified if full.degraded else _unrelayed(chain, found, history, prefix, full.record)[0]

    def _remember(self, tag: bytes, pending: _Pending) -> None:
        self._pending[tag] = pending
        self._pending.move_to_end(tag)
        while len(self._pending) > self._pending_size:
            self._pending.popitem(last=False)

    async def record_reply(
        self,
        tenant: str,
        subkey: str | None,
        messages: Sequence[Any],
        reply_text: str | Mapping[str, Any] | None,
        *,
        refused: bool,
        observation: Observation | None = None,
    ) -> bool:
        """Record what the gateway relayed for the request ``messages``.

        ``reply_text`` is the assistant text (or the whole assistant message, for tool calls) as relayed, the
        policy's refusal text when the policy replaced the reply, or None when the client got an error status
        instead of a message (a block as an error: only the refusal is recorded). ``refused``: the reply is a
        refusal (the assistant's or the policy's); the request's embedding joins the tenant's refusal memory.
        ``observation``: what ``observe`` returned for these messages; with it nothing is hashed or read again.
        Returns False when the shared backend failed (local state took the write). Never raises for state.
        """
        handle = observation.handle if observation is not None else None
        if handle is not None and (handle.tenant, handle.subkey) == (tenant, subkey):
            root, last_hash, snap, embedding = handle.root, handle.last_hash, handle.snapshot, handle.embedding
            family = handle.family
            chain = None
            self._pending.pop(position_tag(self._secret, last_hash), None)
        else:
            chain = build_chain(self._secret, tenant, subkey, messages)
            if not len(chain):
                return True  # nothing the client could send back refers to this exchange
            root, last_hash = chain.root, chain.hashes[-1]
            family = last_hash[:FAMILY_BYTES]  # no observation at hand: what it would have started
            pending = self._pending.pop(chain.tag(len(chain) - 1), None)
            if pending is not None:
                snap, embedding, family = pending.snapshot, pending.embedding, pending.family
            else:
                loaded = await self.backend.load_record(root)
                _found, found_snap, _ = await self._locate(chain, loaded, root)
                snap, embedding = found_snap or Snapshot(), None
        if refused:
            snap = replace(snap, refusals=snap.refusals + 1, last_refused=True)
        if reply_text is not None:
            reply = {"role": "assistant", "content": reply_text} if isinstance(reply_text, str) else reply_text
            tag = position_tag(self._secret, reply_hash(last_hash, reply))
            snap = replace(snap, relayed=True, history=worse_history(snap.history, "verified"))
        else:
            tag = position_tag(self._secret, last_hash)
            snap = replace(snap, relayed=False)
        stored = time.perf_counter()
        ok = await self.backend.append(root, snap.entry(tag))
        self._timing("state_store", stored)
        if refused:
            if embedding is None or not embedding.size:  # unknown, or the turn exited early: no embedding yet
                chain = chain or build_chain(self._secret, tenant, subkey, messages)
                users = [i for i, r in enumerate(chain.roles) if r == "user"]
                if users:
                    (score,) = await self._scores_for([chain.text(users[-1])], exact=True)
                    embedding = score.embedding
            if embedding is not None:
                # the refused request's risk then: a rewording of a harmless request that was refused is no probe
                risk = max(snap.window, snap.risks[-1] if snap.risks else 0.0)
                blob = pack_embedding(embedding, risk, self.embedding_space, family)
                ok = await self.backend.add_refused(tenant_key(self._secret, tenant), blob) and ok
        return ok

    async def replay(self, messages: Sequence[Any], *, tenant: str = "score") -> list[TurnResult]:
        """Replay a conversation turn by turn through a fresh tracker, as the gateway would have seen it.

        At each user message the request is every message up to it; every assistant message of the file counts
        as relayed by the gateway, and as a refusal when the guard model classifies it as one (full or partial).
        """
        fresh = ConversationTracker(
            MemoryBackend(max_records=64, max_bytes=1 << 20),
            self.classifier,
            hmac_secret=secrets.token_bytes(32),
            window_turns=self.window_turns,
            window_max_ids=self.window_max_ids,
            params=self.params,
            score_cache_size=0,
            reply_grace=0.0,
            rephrase_check=self.rephrase_check,
        )
        fresh._scores = self._scores  # share the content cache: replays of similar rows score each turn once
        results: list[TurnResult] = []
        msgs = list(messages)
        last_user: str | None = None
        observed: tuple[int, Observation] | None = None  # (request length, what observe said about it)
        for k, message in enumerate(msgs):
            if not isinstance(message, Mapping):
                continue
            role = message.get("role")
            if role == "assistant":
                refused = False
                if last_user is not None:
                    (reply_score,) = await self.classifier.score_replies([(last_user, message_text(message))])
                    refused = reply_score.refusal != "none"
                obs = observed[1] if observed is not None and observed[0] == k else None
                await fresh.record_reply(tenant, None, msgs[:k], message, refused=refused, observation=obs)
                observed = None
            elif role not in ("system", "developer", "tool", "function"):
                last_user = message_text(message)
                obs = await fresh.observe(tenant, None, msgs[: k + 1])
                observed = (k + 1, obs)
                own = obs.new_user_scores[-1] if obs.new_user_scores else None
                results.append(
                    TurnResult(
                        index=k,
                        harm=own.harm if own is not None else 0.0,
                        escalation=obs.signals.escalation,
                        signals=obs.signals,
                        prompt=own,
                        rephrase_matches=obs.rephrase_matches,
                        window=obs.window,
                    )
                )
        return results
