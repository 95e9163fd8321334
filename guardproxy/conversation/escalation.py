"""The escalation signals and how they combine: window text, trajectory, trend and the escalation score.

Per request the tracker knows, for each new user turn, the guard model's harm on that turn alone (``h_t``), and
the guard model's harm on a window of the last ``window_turns`` messages together (``w``), which sees a request
split over turns or steered by earlier ones that no single turn shows.

- trajectory, a decaying cumulative risk: ``r_t = min(1, max(h_t, decay * r_{t-1} + gain * max(0, h_t - floor)))``.
  With ``gain > 1 - decay`` steady risk above the floor accumulates (fixed point ``gain * (h - floor) /
  (1 - decay)``), the background noise of a long harmless chat (below ``floor``) does not, a single spike decays by
  ``decay`` per turn, and ``r_t`` never drops below the current turn's own risk.
- trend: the least-squares slope of ``h`` over the last four turns (risk per turn; positive = steering upward).
- the window is a second encoder pass, so it runs only when the cheaper evidence already shows some risk
  (``window_gate_open``): request N+1 of a long harmless chat then costs one new turn.
- escalation, a noisy-OR of independent pieces of evidence, each in [0, 1]::

      raw = 1 - (1 - max(w, r)) (1 - e_trend) (1 - e_refusal) (1 - e_rephrase) (1 - e_history)
      e_trend    = clip(trend_weight * trend, 0, trend_cap)
      e_refusal  = refusal_weight * min(refusals, 2) * max(w, r)    an earlier refusal makes risk count more
      e_rephrase = rephrase_weight * max_i clip((s_i - rephrase_low) / (rephrase_high - rephrase_low), 0, 1) * q_i
      e_history  = forged_weight | unverified_weight | 0

  where ``s_i`` is the cosine between this request and refused request i of the tenant and ``q_i`` that request's
  risk when it was refused (a clarification after a false refusal of a harmless request is not probing), and
  then mapped piecewise-linearly so that the tuned flag threshold lands on 0.5: ``escalation >= 0.5`` is the
  tracker's "flag" (``FLAG_THRESHOLD``), and policies can write round numbers.

The parameters are tuned on the train part of the conversation data only (``python -m bench.conversation_eval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from guardproxy.conversation.integrity import History
from guardproxy.signals import to_operating_scale

__all__ = [
    "FLAG_THRESHOLD",
    "EscalationParams",
    "WindowEstimateReading",
    "escalation",
    "trajectory_step",
    "trend",
    "window_gate_open",
    "window_text",
]

FLAG_THRESHOLD = 0.5  # the operating point of signals.to_operating_scale, onto which the tuned threshold maps
WINDOW_TURNS = 4
# Ids of the window the guard model reads (head and tail kept, ``encoding.encode_prompt``). 96 rather than the
# model's 256: the pass costs about a third. 128 against 256 changed nothing with model 2.2.0; with 2.3.0 it caught as
# much and flagged 4 more of 100 long harmless chats on dev. 96 against 128 with model 2.5.0 (2026-12-03): every dev
# figure identical, shipped or tuned parameters, and one more authored challenge escalation caught; 64 lost
# ActorAttack conversations (100% -> 94.9%). bench/RESULTS.md, "Conversation tracking".
WINDOW_MAX_IDS = 96
_WINDOW_TURN_CHARS = 4000  # the encoder keeps head and tail of the joined window; this only bounds the work


@dataclass(frozen=True)
class EscalationParams:
    """Defaults tuned for models/guard-v1 2.34.1 (6 layers, model.onnx md5 b07df018...) on the calibration split of
    the conversation data, benign budget 3% of each benign source (MT-Bench dialogues, stitched long chats, authored
    chats), scores on the operating scale: ``python -m bench.conversation_eval --tune`` (see its docstring).
    Retune whenever the model is replaced: the threshold sits on that model's score distribution."""

    # Tuned for 2.34.1 at its harm line 0.39 (2026-12-07, 11:41 UTC): 2.25.1's decay, gain and trend, no refusal term
    # and no window gate; only the threshold moved (2.25.1: 0.9776; bench/RESULTS.md, "Model 2.34.1").
    decay: float = 0.6
    gain: float = 0.3
    floor: float = 0.0
    trend_weight: float = 0.0
    trend_cap: float = 0.5
    refusal_weight: float = 0.0
    # lines in the projected embedding space (guardproxy.embedding_projection), mapped from the raw space's 0.85 and
    # 0.95 by the share of different harmful requests that match (python -m bench.rephrase_space)
    rephrase_low: float = 0.59
    rephrase_high: float = 0.89
    rephrase_weight: float = 0.5
    forged_weight: float = 0.3  # not tunable here (replayed history is always verified): chosen so that a forged
    unverified_weight: float = 0.1  # history alone never flags, and lifts a borderline conversation over the line
    # raw score mapped to FLAG_THRESHOLD (model 2.34.1, 96-id windows, per-source budget; the tuned cut 0.9319298...)
    threshold: float = 0.9319
    # Tuned: the highest gate within 0.02 of the ungated score. With this model that is no gate: the window pass runs
    # on every request after the first turn (2.12.0's gate 0.02 skipped a quarter of harmless requests).
    window_gate: float = 0.0


def window_text(turns: Sequence[tuple[str, str]]) -> str:
    """Turns (role, text), oldest first, in the window format of ``models/README.md``: ``"user: …\\nassistant: …"``."""
    return "\n".join(f"{role}: {text[:_WINDOW_TURN_CHARS]}" for role, text in turns)


class WindowEstimateReading(NamedTuple):
    """A window's harm estimated from its user turns' own states (operating scale), and the gate it is held to."""

    harm: float
    gate: float


def window_gate_open(
    *,
    trajectory: float,
    recent_risks: Sequence[float],
    refusals: int,
    rephrase: float,
    history: History,
    p: EscalationParams,
    estimate: WindowEstimateReading | None = None,
) -> bool:
    """Whether this request pays for the window pass (a second encoder pass over the recent turns).

    A cascade: the per-turn scores come first (cached by content, so a long conversation adds one new turn), and
    the window is scored only when the conversation already shows some risk: an earlier refusal, history the
    gateway cannot vouch for, and then, with ``estimate`` (the window's harm estimated from its user turns' own
    states, ``guardproxy.early_exit.WindowEstimate``), that estimate at its gate or above; without one, a request
    close to a refused one, or a recent user turn or the trajectory at ``window_gate`` or above. A request's
    similarity to refused ones still counts in its escalation either way; with an estimate it does not open the
    gate, so a tenant with refusals in memory does not pay a whole pass for an exited turn's similarity only to
    decide the gate. A closed gate counts the window as its estimate, or as the newest turn alone (which
    ``max(w, r)`` already holds, so it adds nothing). ``window_gate`` is tuned with the other parameters; 0 runs
    the window on every request that has no estimate.
    """
    if refusals > 0 or history in ("forged", "unverified"):
        return True
    if estimate is not None:  # it stands for the cheaper signs, a rewording of a refused request's included
        return estimate.harm >= estimate.gate
    if p.window_gate <= 0.0 or rephrase >= p.rephrase_low:
        return True
    return trajectory >= p.window_gate or max(recent_risks, default=0.0) >= p.window_gate


def trajectory_step(previous: float, risk: float, p: EscalationParams) -> float:
    return min(1.0, max(risk, p.decay * previous + p.gain * max(0.0, risk - p.floor)))


def trend(risks: Sequence[float]) -> float:
    """Least-squares slope of the risks (oldest first); 0 with fewer than two."""
    n = len(risks)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(risks) / n
    num = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(risks))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return min(hi, max(lo, x))


def raw_escalation(
    *,
    window: float,
    trajectory: float,
    trend_value: float,
    refusals: int,
    rephrase: Sequence[tuple[float, float]],
    history: History,
    p: EscalationParams,
) -> float:
    base = max(window, trajectory)
    span = max(p.rephrase_high - p.rephrase_low, 1e-6)
    rephrase_evidence = max((_clip((s - p.rephrase_low) / span) * q for s, q in rephrase), default=0.0)
    evidence = (
        base,
        _clip(p.trend_weight * trend_value, 0.0, p.trend_cap),
        _clip(p.refusal_weight * min(refusals, 2) * base),
        p.rephrase_weight * rephrase_evidence,
        p.forged_weight if history == "forged" else p.unverified_weight if history == "unverified" else 0.0,
    )
    keep = 1.0
    for e in evidence:
        keep *= 1.0 - _clip(e)
    return 1.0 - keep


def escalation(
    *,
    window: float,
    trajectory: float,
    trend_value: float,
    refusals: int,
    rephrase: Sequence[tuple[float, float]],
    history: History,
    p: EscalationParams,
) -> float:
    """The escalation score; ``rephrase``: (cosine, risk when refused) per refused request of the tenant."""
    raw = raw_escalation(
        window=window,
        trajectory=trajectory,
        trend_value=trend_value,
        refusals=refusals,
        rephrase=rephrase,
        history=history,
        p=p,
    )
    return to_operating_scale(raw, p.threshold)
