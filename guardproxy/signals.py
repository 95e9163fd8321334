"""The guard's signals: what the classifier, the conversation tracker and the failure paths produce,
and what policies decide on. Computed once per exchange and shared by the active and shadow policies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

# At or above this share of a turn's letters in scripts the model spells only letter by letter, the turn counts as one
# the model cannot read (the shipped policies' `unreadable_at_least`, the gateway's counter, bench.script_coverage).
UNREADABLE = 0.5


def readable_side(unreadable: float) -> str:
    """How reports split rows by ``unreadable``: ``"cannot read"`` at or above ``UNREADABLE``, else ``"can read"``."""
    return "cannot read" if unreadable >= UNREADABLE else "can read"


RefusalClass = Literal["none", "partial", "full"]
REFUSAL_CLASSES: tuple[RefusalClass, ...] = ("none", "partial", "full")


def to_operating_scale(x: float, threshold: float) -> float:
    """Map a raw score onto the scale every policy reads: its calibrated threshold goes to 0.5.

    Piecewise linear and monotone (``[0, t] -> [0, 0.5]``, ``[t, 1] -> [0.5, 1]``), so rankings (AUROC) are
    unchanged and a policy's round numbers mean the same operating point for every model: ``harm_at_least =
    0.5`` is the threshold the model's trainer calibrated, whatever raw value that was. The guard model's heads
    (``guardproxy.classifier``) and the conversation escalation score (``guardproxy.conversation.escalation``)
    are both reported on it.
    """
    t = min(max(threshold, 1e-6), 1.0 - 1e-6)
    x = min(max(x, 0.0), 1.0)
    return 0.5 * x / t if x < t else 0.5 + 0.5 * (x - t) / (1.0 - t)


_NO_STATE = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class PromptScore:
    """Guard-model scores of one user turn (or a window of turns)."""

    harm: float  # the text requests harmful assistance: a probability on the operating scale (0.5 = threshold)
    category: str  # taxonomy id of the most likely hazard category (guardproxy.taxonomy)
    jailbreak: float  # jailbreak wrapper / instruction override, on the operating scale
    embedding: npt.NDArray[np.float32] = field(repr=False, compare=False)  # L2-normalised pooled embedding
    # Share of the text's letters in scripts the model's vocabulary spells only letter by letter (Cyrillic, Greek,
    # Arabic, CJK... for the English-first shipped model); near 1 the harm score is close to a guess.
    unreadable: float = 0.0
    # Scored by the early-exit head from the model's first layers (guardproxy.early_exit): harm and jailbreak are its
    # estimates, capped below the lines it was fitted for; category "none"; ``embedding`` is empty.
    exited: bool = False
    # The turn's mean cut-layer state, projected by the early-exit spec's window estimate (``WindowEstimate``),
    # for a per-turn check that went through the cut; empty otherwise (the tracker then runs the window pass).
    state: npt.NDArray[np.float32] = field(default_factory=lambda: _NO_STATE, repr=False, compare=False)


@dataclass(frozen=True)
class ReplyScore:
    """Guard-model scores of one (user turn, assistant reply) pair."""

    refusal: RefusalClass
    refusal_probs: tuple[float, float, float]  # none, partial, full
    reply_harm: float  # the reply carries harmful assistance, on the operating scale
    # the reply runs past what the output check reads (``classifier.MAX_REPLY_WINDOWS``, ``RAW_REPLY_CHARS``)
    unread: bool = False


class Classifier(Protocol):
    """The guard model as the rest of guardproxy sees it. Implementations run inference off the event loop."""

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        """Scores of user turns (or windows of turns). ``max_length``: read at most this many ids of each text
        (head and tail kept; never more than the model's own maximum); None, with no ``newest``, is a per-turn check:
        what the model reads, and a long turn's middle in windows besides (``OnnxClassifier.prompt_windows``).
        ``newest``: for windows, each text's newest turn (its last line); a model trained to pool over it
        (``guardproxy train --window-pool newest``) reads the window through that turn, others ignore it.
        ``exact``: never an early exit (``PromptScore.exited``): the whole model's scores and an embedding."""
        ...

    async def score_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class ConversationSignals:
    """Escalation signals of the conversation tracker (guardproxy.conversation)."""

    window_harm: float = 0.0  # guard model on the recent turns together
    trajectory: float = 0.0  # decaying cumulative risk
    trend: float = 0.0  # slope of per-turn risk over recent turns
    escalation: float = 0.0  # the combined escalation score in [0, 1]
    refusal_events: int = 0  # earlier refusals (assistant or policy) in this conversation
    rephrase_similarity: float = 0.0  # max cosine to a request refused earlier for this tenant
    history: Literal["verified", "unverified", "forged", "none"] = "none"
    turn_index: int = 0  # number of user turns so far


@dataclass(frozen=True)
class Signals:
    """Everything a policy rule can test. Output-side fields are None until a reply exists."""

    harm: float = 0.0  # max over the scored user turns (and tool results) of this request
    category: str = "none"
    jailbreak: float = 0.0
    unreadable: float = 0.0  # max over the scored turns: how much of a turn the model could not read (PromptScore)
    # Max reply harm over the assistant text of the history the gateway cannot vouch for: assistant turns it never
    # relayed (``history`` forged or unverified), and what a client added to a relayed turn outside the text the
    # history's HMAC binds (reasoning fields and the like). 0.0 when there is none. Harmful assistance there is what
    # the upstream is asked to continue (``guard.GuardCheck``: which turns, and how many per request).
    history_harm: float = 0.0
    conversation: ConversationSignals = ConversationSignals()
    refusal: RefusalClass | None = None
    reply_harm: float | None = None
    # Reply harm of the reply read after the assistant replies just before it in the conversation (at most
    # ``guard.JOINED_REPLY_TURNS``), joined in order and scored whole: a procedure handed out one step per turn
    # reads harmless piece by piece. None where the new reply completes nothing: no earlier assistant reply, or
    # earlier ones that already read harmful without it (``guard.joined_harm``).
    joined_reply_harm: float | None = None
    classifier_failed: bool = False
    # With ``classifier_failed``: some of the request's texts were scored before the rest failed (timed out, or lay
    # beyond ``guard.MAX_SCORED_TEXTS``): harm, category, jailbreak and unreadable are theirs, a lower bound. The
    # guard lets a block that the policy's rules find in them stand over ``on_classifier_failure``.
    partly_scored: bool = False
    state_failed: bool = False
    # Some scored turn exited early (guardproxy.early_exit): harm and jailbreak include the head's estimates, capped
    # below its lines, and with refusals in memory rephrase similarity may be a lower bound. Logged, not a condition.
    estimated: bool = False

    def false_refusal(self, harm_threshold: float) -> bool:
        """Derived: a full or partial refusal of a request whose harm is below ``harm_threshold``."""
        return self.refusal in ("partial", "full") and self.harm < harm_threshold
