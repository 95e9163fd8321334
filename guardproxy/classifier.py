"""The guard model at runtime: one ONNX session, one bounded executor, one LRU cache.

``OnnxClassifier.load(model_dir)`` reads the files described in ``models/README.md`` once, at startup. Inference
never runs on the event loop: each ``score_*`` call becomes one job on the classifier's own executor
(``guardproxy.workers.LowestIdleExecutor``: ``workers`` threads, each job on the lowest-numbered idle one; shut down
by ``aclose``). At most ``max_pending`` jobs are queued or running; a caller waits for a slot inside its own
deadline, so a flood turns into ``ClassifierError`` timeouts (which the policy maps to its configured failure
outcome) instead of a queue that grows without bound. A timed-out job is told to stop at its next batch boundary,
so abandoned work does not keep the worker busy.

Scores: harm, jailbreak and reply harm are reported on the operating scale (``to_operating_scale``): each head's
calibrated threshold from ``config.json`` maps to 0.5, so policies read the same round numbers whatever model is
loaded. Refusal probabilities are reported as the model gives them.

Caching: results are kept in an LRU keyed by sha256 of (mode, normalized text). Evasion variants of one text
normalize to the same key. The event loop also checks a key of the raw text (a cheap hash, no normalization) so
that a request whose turns were all seen before (every earlier user turn of a chat is re-sent with each request)
does not take an executor hop at all.

Batching: one call's texts can run in batches of at most ``max_batch`` inputs and ``max_batch_tokens`` padded
tokens (memory grows with batch x length; the issue measured 2.1 GiB for one 32 x 512 batch). The default is
``max_batch=1``, and there is no batching across concurrent calls (micro-batching): on this 2-core CPU
(``python -m bench.classifier_runtime``, guard-v1, 1 thread) batches of 4 to 16 texts of 64 tokens ran within 5%
of one-by-one, mixed lengths (16 to 256 tokens) ran 6% to 55% slower, and a 32-text batch peaked at 825 MiB
RSS. Micro-batching would add a collection delay to every request for no throughput. Batching also changes the
scores: dynamic int8 quantization computes activation scales over the whole batch, padding included (at one
threshold guard-v1 2.2.0 flags 20.5% of bench/challenge2's look-alikes scored in batches of 32, 15.4% one at a time).
A per-turn check reads its texts one after another (below), so only a long text's windows batch.

Oversized calls: a per-turn check reads every text's head+tail pass first and the long ones' windows after, each
round from the newest text (a request's ask). One that times out part way raises ``ClassifierPartial`` with a score
of every text it reached: whole, or the pass's, which the text's windows could only raise (never cached). A call
that will run more than ``LIGHT_CALL_PASSES`` passes is heavy: it waits behind light calls, at most ``workers`` heavy
calls hold slots at once, and a running one lets the light calls that wait run between its passes
(``LowestIdleExecutor.run_light``).

Long user turns: a prompt pass reads a text's head and tail (``encoding.encode_prompt``). A per-turn check
(``score_prompts`` without ``max_length`` or ``newest``: the gateway's, the tracker's per-turn scores, the CLI's)
also scores the middle that pass skips, in overlapping windows of ``PROMPT_WINDOW_IDS`` ids (``prompt_windows``), in
the same job; a window's harm counts from ``PROMPT_WINDOW_LINE`` and then brings its category. A turn the pass reads
whole but longer than one window is read in windows over its whole length too (a short ask beside a paragraph of
other text is diluted in one pass), counted from ``WHOLE_TURN_WINDOW_LINE``. Jailbreak, the
unreadable share and the embedding stay the head+tail pass's. A conversation window pass (a call that names its
length) reads head and tail only, as the turns it joins are scored whole on their own.

Early exit (``guard.early_exit``, ``load(early_exit=True | "auto")``): per-turn prompt checks run the graph in two
parts and stop after the first when the model's first layers already say the turn is clearly harmless
(``guardproxy.early_exit``); so do conversation window passes at the length the spec's window head was fitted for,
on that head. Such a score has ``exited`` set and no embedding; ``exact=True`` asks for the whole model and never
reuses one. Windows of a long turn always run the whole model; when one decides a turn whose head+tail pass exited,
that pass runs again on the whole model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from guardproxy import embedding_projection as projection_file
from guardproxy import taxonomy
from guardproxy.early_exit import (
    SPEC_FILE,
    ExitSpec,
    Head,
    WindowHead,
    cache_entry,
    cached_cut,
    cut_in_child,
    file_md5,
    load_spec,
    pooled,
)
from guardproxy.embedding_projection import EmbeddingProjection
from guardproxy.errors import ClassifierBusy, ClassifierError, ClassifierPartial, ConfigError
from guardproxy.settings import GuardSettings
from guardproxy.signals import REFUSAL_CLASSES, PromptScore, RefusalClass, ReplyScore, to_operating_scale
from guardproxy.workers import LowestIdleExecutor

__all__ = ["ModelInfo", "OnnxClassifier", "Thresholds"]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Reply windows (``OnnxClassifier.reply_windows``): a window fits the reply's share of a pair pass whatever the
# prompt's length (at least two thirds of 253 ids); consecutive windows overlap by a sentence or two.
REPLY_WINDOW_IDS = 128
REPLY_WINDOW_STRIDE = 96
REPLY_HEAD_IDS = 253  # no pair pass reads more of a reply (max_length 256 less three special ids)
# A window's reply harm counts from here: on the calibration split (python -m bench.reply_windows --split
# calibration), windows at 0.5 flagged 3.9% of PHTest's harmless replies against 2.3% for the head alone, at 0.6 2.5%.
REPLY_WINDOW_LINE = 0.6
# ~37k ids, RAW_REPLY_CHARS of English: beyond that a reply is read no further (``ReplyScore.unread``, counted in
# guardproxy_reply_unread_total). 128 (~12k ids) let a harmful passage after 62k characters of harmless text through
# (a red-team walkthrough, 2026-12-08). A stream's windows are scored as it grows, each once (cached); a plain
# reply's all at once, in a heavy call (``LIGHT_CALL_PASSES``) that may take its windows' allowance.
MAX_REPLY_WINDOWS = 384
# Prompt windows (``OnnxClassifier.prompt_windows``): the middle of a user turn that the head+tail pass skips, read
# in short windows: in a 128-id window of article text a short harmful ask is diluted. On the calibration split's
# probe (python -m bench.prompt_windows --split calibration: short harmful asks put in the middle of long harmless
# texts) 64-id windows every 48 ids found 76.5% at the line below, 128 every 96 59.8%, with fewer false flags.
PROMPT_WINDOW_IDS = 64
PROMPT_WINDOW_STRIDE = 48
# A window's harm counts from here, where it blocks under the default policy. On that probe the harmless-ask control
# was flagged 17.6% head+tail, with windows from 0.5 23.5%, 0.6 22.5%, 0.7 21.6%, 0.8 21.6%, 0.9 18.6%, and the
# harmful asks found 77.5%, 76.5%, 74.5%, 70.6%, 59.8%. The rule, written before those figures were read: the lowest
# line at which the control rises by at most 3 points (a window reads text out of context, and long harmless pastes
# of offensive text are common). 0.6 was used first; on dev 0.9 finds 54.0% of the hidden asks (11.9% without
# windows) and flags 15.9% of the controls (11.9%); bench/RESULTS.md, "A harmful ask in the middle of a long turn".
PROMPT_WINDOW_LINE = 0.9
# ~3,100 ids of middle after the head (a 2,000-id turn has 37 windows): beyond that it is read by no pass
MAX_PROMPT_WINDOWS = 64
# A turn the pass reads whole but longer than a window (65 to 254 ids) is read in windows over its whole length too,
# counted from this line: a short harmful ask with a paragraph of harmless prose before or after it is diluted in
# one pass (on dev, 192 ids of prose before an ask: 50.0% of the asks found at 0.5, 75.0% of them alone). The rule,
# written before any window figure was read: the lowest line of 0.7, 0.8, 0.9, 0.95 at which, on the calibration
# split, natural harmless prompts of 65-254 ids flagged rise by at most 1 point and the probe's harmless-ask control
# by at most 3 on average; shipped only if on dev the probe's harmful asks are found 10 points more often on average
# and the natural rise stays within 2. 0.8: calibration +0.9 and +1.7 points; dev asks +11.8 points, natural +0.6,
# control +5.6; bench/RESULTS.md, "A harmful ask diluted in one pass" (python -m bench.prompt_dilution).
WHOLE_TURN_WINDOW_LINE = 0.8
# ... and only where the pass reads at least this much harm: a diluted ask still reads above it, most harmless turns
# below (the windows cost 2-3x the pass). The rule, written before any gate figure was read: the highest of 0.01,
# 0.02, 0.05, 0.1 at which the calibration probe's harmful asks found fall by at most 1 point on average against no
# gate. 0.02: calibration -0.6 points; dev -0.6, and 70.6% of natural harmless prompts of 65-254 ids skip the windows.
WHOLE_TURN_WINDOW_GATE = 0.02
# A turn with fenced code (```...```) is also read without it, as one more window counted from the line of the turn's
# other windows, whatever its pass reads: code after a short ask dilutes it past what any window recovers (a
# red-team walkthrough: 25 of 30 asks reached the upstream with a 12-line function after them; 0.992 -> 0.107).
# python -m bench.prompt_code (short asks of the split with 4-25 lines of MBPP or HumanEval code after or before
# them): on the calibration split the harmful asks with code after them were found 78.3% against 20.0%, those
# with code before 87.5% against 72.5%, harmless ones flagged 0.0% either way; on dev 83.3% (20.0%), 87.5% (78.3%),
# harmless 2.5% (0.8%) with code after, 1.7% either way before. The rule, written before its figures were read: at
# least 10 points more of the asks with code after found on calibration, none lost with code before, at most 2
# points more harmless ones flagged. A first candidate behind WHOLE_TURN_WINDOW_GATE passed it too (59.2% in a first
# probe: an ask with code after it reads under the gate); this one costs one more pass per turn with fenced code.
_FENCED = re.compile(r"```.*?(?:```|\Z)", re.S)
_MIN_PROSE_WORDS = 3


def prose_view(text: str) -> str | None:
    """``text`` without its fenced code blocks (an unclosed fence runs to the end), where it has some and at least
    ``_MIN_PROSE_WORDS`` words are left; else None."""
    if "```" not in text:
        return None
    prose = _FENCED.sub("\n", text).strip()
    return prose if len(prose.split()) >= _MIN_PROSE_WORDS and prose != text.strip() else None


_CHARS_PER_ID = 8  # as encoding's pre-cut: more characters than an id spans, so a prefix this long holds the windows
# Before a text is normalised it is cut to its first RAW_HEAD_CHARS and last RAW_TAIL_CHARS characters (a reply to
# its first RAW_REPLY_CHARS): normalising a 3.4 MB paste took seconds, past guard.timeout, so one oversized text made
# the check fail open (a red-team walkthrough). The cuts lie far beyond what any pass reads (the windows reach ~26k
# characters of a prompt, ~100k of a reply, at 8 characters an id): only a very long text's unread middle is lost,
# and padding that normalisation removes can push text out of the windows' reach, never out of the head or tail.
RAW_HEAD_CHARS = 64_000
RAW_TAIL_CHARS = 16_000
RAW_REPLY_CHARS = 160_000


# The output check of a long plain reply scores up to MAX_REPLY_WINDOWS windows at once, a pair pass each (~20 ms on
# a quiet 2-core Xeon): 128 took 6.4 s on a loaded one, past guard.timeout, so a plain reply long enough failed open.
# Its check may take this much longer than the timeout per window it will have (a stream's windows are scored as it
# grows, and cached). Windows are counted at 3 characters an id, more than most text spans, so never too few.
REPLY_WINDOW_ALLOWANCE_S = 0.05


def whole_reply_allowance(pairs: Sequence[tuple[str, str]]) -> float:
    """Seconds beyond ``guard.timeout`` that scoring these replies whole may take (``REPLY_WINDOW_ALLOWANCE_S``)."""
    return sum(_reply_windows(r) for _, r in pairs) * REPLY_WINDOW_ALLOWANCE_S


def _reply_windows(reply: str) -> int:
    """The windows ``reply_parts`` will cut of ``reply``, estimated from its length (never too few)."""
    return min(MAX_REPLY_WINDOWS, min(len(reply), RAW_REPLY_CHARS) // (REPLY_WINDOW_STRIDE * 3))


# A call that will run more model passes than this is heavy (``LowestIdleExecutor.submit_heavy``): it waits behind
# the light calls, lets those that wait run between its passes, and at most ``workers`` heavy calls are queued or
# running at once. Without that, two requests padded with long texts held both inference threads for seconds and
# every other tenant's check timed out waiting, to be decided by the policy's on_classifier_failure (the default
# policy forwards it): a red-team walkthrough, 2026-12-08. 16 passes (``turn_passes``) are a turn of up to ~970
# characters, or 16 short turns: ~0.1-0.3 s on two cores.
LIGHT_CALL_PASSES = 16


def turn_passes(text: str, max_length: int) -> int:
    """At most the passes a per-turn check of ``text`` will run (its head+tail pass and ``prompt_windows``), counted
    at one id a character: no id spans less, so no text a client writes passes for lighter than it is (English runs
    ~4.5 characters an id, so its long texts count heavy sooner than they are)."""
    budget = max_length - 2
    size = min(PROMPT_WINDOW_IDS, budget)
    skipped = min(len(text), RAW_HEAD_CHARS + RAW_TAIL_CHARS) - budget
    middle = min(MAX_PROMPT_WINDOWS, -(-skipped // PROMPT_WINDOW_STRIDE)) if skipped > 0 else 0
    # a text of more characters than the pass reads ids may still be read whole by it, in windows over all of it
    whole = 1 + -(-(min(len(text), budget) - size) // PROMPT_WINDOW_STRIDE) if len(text) > size else 0
    return 1 + max(middle, whole) + ("```" in text)  # and the prose view of a turn with fenced code


def _bounded(text: str) -> str:
    """``text`` cut to the characters any pass can read (``RAW_HEAD_CHARS``, ``RAW_TAIL_CHARS``)."""
    if len(text) <= RAW_HEAD_CHARS + RAW_TAIL_CHARS:
        return text
    return text[:RAW_HEAD_CHARS] + "\n" + text[-RAW_TAIL_CHARS:]


TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("harm", "category", "jailbreak", "reply_harm", "refusal", "embedding")

T = TypeVar("T", PromptScore, ReplyScore)
_NO_EMBEDDING = np.zeros(0, dtype=np.float32)  # an exited score's: the heads that pool the embedding did not run


@dataclass(frozen=True)
class Thresholds:
    """Calibrated thresholds: raw head outputs in ``config.json`` (see models/README.md); ``scaled()`` is the
    view on the operating scale that scores are reported in."""

    harm: float  # default flag threshold of the harm head
    harm_high: float  # block-level harm
    jailbreak: float
    reply_harm: float
    refusal_partial: float  # p(partial) + p(full) at or above this is a refusal

    def scaled(self) -> Thresholds:
        """The same thresholds on the operating scale (harm, jailbreak and reply harm at 0.5)."""
        return Thresholds(
            harm=0.5,
            harm_high=to_operating_scale(self.harm_high, self.harm),
            jailbreak=0.5,
            reply_harm=0.5,
            refusal_partial=self.refusal_partial,
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    max_length: int
    thresholds: Thresholds
    embedding_dim: int


class _LRU:
    """A small thread-safe LRU: the event loop and the executor threads both touch it."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: Any) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _whole(head: ReplyScore, windows: Sequence[float]) -> ReplyScore:
    """A reply's score from its head's and its windows' reply harm. A window reads the reply from its middle, out of
    context, and reads harmless text as harmful more often than a head does: it counts only at ``REPLY_WINDOW_LINE``
    or above (below, the head's reply harm stands)."""
    sure = [w for w in windows if w >= REPLY_WINDOW_LINE]
    if not sure or max(sure) <= head.reply_harm:
        return head
    return ReplyScore(head.refusal, head.refusal_probs, max(sure))


def _turn(head: PromptScore, windows: Sequence[PromptScore], line: float) -> PromptScore:
    """A user turn's score from its pass and its windows (``prompt_windows``). A window reads the turn out of
    context: its harm counts only at ``line`` or above (``PROMPT_WINDOW_LINE`` for a long turn's middle,
    ``WHOLE_TURN_WINDOW_LINE`` for a turn the pass reads whole), and then the highest such window's harm and category
    replace the pass's when higher. Jailbreak, unreadable share, embedding and state stay the pass's (the embedding
    feeds rephrase similarity, which compares whole turns)."""
    sure = [w for w in windows if w.harm >= line]
    decider = max(sure, key=lambda w: w.harm, default=None)
    if decider is None or decider.harm <= head.harm:
        return head
    return dataclasses.replace(head, harm=decider.harm, category=decider.category)


def _key(kind: bytes, *parts: str) -> bytes:
    # Length-prefixed parts: ("ab", "c") and ("a", "bc") must not collide.
    h = hashlib.sha256(kind)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ClassifierError(f"{path}: model config not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClassifierError(f"{path}: cannot read model config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ClassifierError(f"{path}: model config is not a JSON object")
    return raw


def _parse_info(config: dict[str, Any], path: Path, embedding_dim: int) -> ModelInfo:
    try:
        t = config["thresholds"]
        thresholds = Thresholds(
            harm=float(t["harm"]),
            harm_high=float(t["harm_high"]),
            jailbreak=float(t["jailbreak"]),
            reply_harm=float(t["reply_harm"]),
            refusal_partial=float(t["refusal_partial"]),
        )
        max_length = int(config["max_length"])
        categories = tuple(config["categories"])
        refusal_labels = tuple(config["refusal_labels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ClassifierError(f"{path}: model config lacks or mangles {exc}") from exc
    # A model trained on another category list would silently mislabel every category.
    if categories != taxonomy.CATEGORY_IDS:
        raise ConfigError("model categories differ from guardproxy.taxonomy.CATEGORY_IDS", where=str(path))
    if refusal_labels != REFUSAL_CLASSES:
        raise ConfigError(f"refusal_labels must be {list(REFUSAL_CLASSES)}", where=str(path))
    return ModelInfo(
        name=str(config.get("name", path.parent.name)),
        version=str(config.get("version", "")),
        max_length=max_length,
        thresholds=thresholds,
        embedding_dim=embedding_dim,
    )


class _Breaker:
    """A circuit breaker over classifier calls, used on the event loop only.

    ``failures`` consecutive failures (inference errors, and timeouts while no model call or batch finished at all;
    a timeout under overload, or of one call too big to finish in time, is ``ClassifierBusy`` and does not count)
    open it: for ``cooldown`` seconds
    every call that needs the model fails at once instead of waiting out the timeout, so a hung or broken model
    costs each request nothing while the policy's fail-open / fail-closed behaviour applies. Then one call at a
    time may probe (half-open): a success closes it, a failure opens it for another cooldown. 0 failures: off.
    """

    def __init__(self, failures: int, cooldown: float, on_change: Callable[[str], None] | None = None) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.on_change = on_change
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.probing or time.monotonic() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        if self.threshold <= 0 or self.opened_at is None:
            return True
        if self.probing or time.monotonic() - self.opened_at < self.cooldown:
            return False
        self.probing = True
        return True

    def retry_in(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (time.monotonic() - self.opened_at))

    def success(self) -> None:
        was_open = self.opened_at is not None
        self.failures, self.opened_at, self.probing = 0, None, False
        if was_open:
            logger.warning("guard model circuit closed: the model answers again")
            self._changed("closed")

    def failure(self) -> None:
        self.failures += 1
        was_probing, self.probing = self.probing, False
        if self.threshold > 0 and (self.failures >= self.threshold or was_probing):
            first = self.opened_at is None
            self.opened_at = time.monotonic()
            if first:
                logger.warning(
                    "guard model circuit open after %d consecutive failures: failing fast for %.1f s at a time",
                    self.failures,
                    self.cooldown,
                )
                self._changed("open")

    def release(self) -> None:
        """A probe that ended without a verdict (the caller went away): let the next call probe."""
        self.probing = False

    def _changed(self, state: str) -> None:
        if self.on_change is not None:
            self.on_change(state)


class _Exit:
    """The guard graph cut in two at an early-exit spec's layer (``guardproxy.early_exit``)."""

    def __init__(self, first: Any, rest: Any, spec: ExitSpec) -> None:
        self.first, self.rest, self.spec = first, rest, spec
        self.first_inputs = [i.name for i in first.get_inputs()]
        self.rest_inputs = [i.name for i in rest.get_inputs() if i.name != spec.tap]
        # per-row shape of each output, for rows that exit before the heads (every non-batch dim is fixed)
        shapes = {o.name: o.shape[1:] for o in rest.get_outputs()}
        self.row_shapes = {name: tuple(int(d) for d in shapes[name]) for name in OUTPUTS}

    def _first(self, feeds: dict[str, npt.NDArray[np.int64]]) -> npt.NDArray[np.float32]:
        (hidden,) = self.first.run([self.spec.tap], {k: feeds[k] for k in self.first_inputs})
        return hidden  # type: ignore[no-any-return]

    def _rest(
        self, names: list[str], feeds: dict[str, npt.NDArray[np.int64]], hidden: npt.NDArray[np.float32]
    ) -> list[Any]:
        return list(self.rest.run(names, {**{k: feeds[k] for k in self.rest_inputs}, self.spec.tap: hidden}))

    def run_whole(self, names: list[str], feeds: dict[str, npt.NDArray[np.int64]]) -> list[Any]:
        """The whole graph's outputs, through both parts (``InferenceSession.run``'s shape)."""
        return self._rest(names, feeds, self._first(feeds))

    def run_whole_with_state(self, feeds: dict[str, npt.NDArray[np.int64]]) -> dict[str, npt.NDArray[Any]]:
        """``run_whole``'s outputs by name, and the pooled cut-layer states as ``state`` (as ``run`` gives them)."""
        hidden = self._first(feeds)
        outputs = dict(zip(OUTPUTS, self._rest(list(OUTPUTS), feeds, hidden), strict=True))
        return {**outputs, "state": pooled(hidden, feeds["attention_mask"])}

    def run(self, feeds: dict[str, npt.NDArray[np.int64]], head: Head) -> dict[str, npt.NDArray[Any]]:
        """The whole model's outputs for the rows that go on, ``head``'s estimates for those that exit; ``exited``
        marks which is which."""
        hidden = self._first(feeds)
        x = pooled(hidden, feeds["attention_mask"])
        exited = head.exits(x, feeds["attention_mask"].sum(axis=1))
        n = len(exited)
        stay = np.flatnonzero(~exited)
        if len(stay) == n:
            outputs = dict(zip(OUTPUTS, self._rest(list(OUTPUTS), feeds, hidden), strict=True))
            return {**outputs, "exited": exited, "state": x}
        out: dict[str, npt.NDArray[Any]] = {
            name: np.zeros((n, *self.row_shapes[name]), dtype=np.float32) for name in OUTPUTS
        }
        out["harm"][exited] = _sigmoid(head.harm(x[exited])).reshape(-1, *self.row_shapes["harm"])
        out["jailbreak"][exited] = _sigmoid(head.jailbreak(x[exited])).reshape(-1, *self.row_shapes["jailbreak"])
        if len(stay):
            values = self._rest(list(OUTPUTS), {k: feeds[k][stay] for k in self.rest_inputs}, hidden[stay])
            for name, value in zip(OUTPUTS, values, strict=True):
                out[name][stay] = value
        out["exited"] = exited
        out["state"] = x  # the pooled cut-layer states, exited or not (``WindowEstimate.project`` reads them)
        return out


class _WholeThroughParts:
    """The session of a classifier with early exit: whole passes run both parts, bit for bit the whole graph."""

    def __init__(self, parts: _Exit) -> None:
        self._parts = parts

    def run(self, names: list[str], feeds: dict[str, npt.NDArray[np.int64]]) -> list[Any]:
        return self._parts.run_whole(names, feeds)


def _sigmoid(z: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


class OnnxClassifier:
    """``signals.Classifier`` backed by the ONNX guard model. Build it with ``load`` or ``from_settings``."""

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        info: ModelInfo,
        *,
        workers: int = 1,
        timeout: float = 2.0,
        cache_size: int = 8192,
        max_pending: int | None = None,
        max_batch: int = 1,
        max_batch_tokens: int = 4096,
        breaker_failures: int = 5,
        breaker_cooldown: float = 5.0,
        pools_newest: bool = False,
        early_exit: _Exit | None = None,
        projection: EmbeddingProjection | None = None,
    ) -> None:
        from guardproxy.encoding import covered_scripts

        self._session = session
        self._tokenizer = tokenizer
        self.covered_scripts = covered_scripts(tokenizer)  # what PromptScore.unreadable measures against
        self.info = info
        # A graph with ``pool_mask`` reads a window through its newest turn (``score_prompts(newest=...)``).
        self.pools_newest = pools_newest
        self._exit = early_exit
        # PromptScore.embedding is in this space when set (``guardproxy.embedding_projection``), raw otherwise
        self.projection = projection
        # 4 bytes naming the space of PromptScore.embedding (the model's name and version, and its projection or
        # none): the conversation tracker tags the refused requests it keeps with it, so embeddings from another model
        # or projection are never compared (``conversation.state.pack_embedding``)
        self.embedding_space = hashlib.blake2b(
            f"{info.name} {info.version} {info.embedding_dim} {_projection_id(projection)}".encode(), digest_size=4
        ).digest()
        self._timeout = timeout
        self._cache = _LRU(cache_size)
        self._max_pending = max_pending if max_pending is not None else 4 * workers
        self._max_batch = max(1, max_batch)
        self._max_batch_tokens = max(info.max_length, max_batch_tokens)
        self._executor = LowestIdleExecutor(workers, thread_name_prefix="guardproxy-classifier")
        self._workers = workers
        # per event loop: the slots of every call, and of heavy calls (``LIGHT_CALL_PASSES``)
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore, asyncio.Semaphore] | None = None
        self._closed = False
        # Called from the worker thread with ("tokenize" | "model", seconds) once per job that ran the model:
        # the gateway feeds it into its per-stage histogram, so "inference" (the wait for scores, queue included)
        # splits into normalisation + tokenization and the ONNX run. Must be thread-safe and cheap.
        self.observe_timing: Callable[[str, float], None] | None = None
        # Called from the worker thread with (rows that exited, rows that went on, "turn" | "window") per early-exit
        # batch: the gateway counts them in guardproxy_classifier_early_exit_total (per-turn checks) and
        # guardproxy_classifier_window_early_exit_total (window passes). Must be thread-safe and cheap.
        self.observe_exit: Callable[[int, int, str], None] | None = None
        self._exit_lock = threading.Lock()
        self._exit_counts = {"turn": (0, 0), "window": (0, 0)}  # (checked, exited), for exit_stats
        self.breaker = _Breaker(breaker_failures, breaker_cooldown)
        self._last_done = time.monotonic()  # when a job or a batch last finished (written by worker threads)

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        threads: int = 1,
        workers: int = 1,
        timeout: float = 2.0,
        cache_size: int = 8192,
        early_exit: bool | Literal["auto"] = False,
        exit_cache: str | Path | None = None,
        embedding_projection: bool = True,
        **options: Any,
    ) -> OnnxClassifier:
        """Load ``model.onnx``, ``tokenizer.json`` and ``config.json`` from ``model_dir``; with ``early_exit``, also
        ``early_exit.json`` (``guardproxy.early_exit``). ``"auto"``: early exit where that file fits this model, the
        whole model otherwise, with a log line saying why. ``exit_cache``: a directory that keeps the cut graph's
        parts between loads (``guardproxy.early_exit.cached_cut``); None or empty: cut afresh.
        ``embedding_projection``: embeddings in the space of ``embedding_projection.json`` where the model has one
        fitted on this graph (``guardproxy.embedding_projection``); False: the raw pooled embedding.

        Raises ``ClassifierError`` naming the file when one is missing or unreadable (or, for the early-exit
        spec with ``early_exit=True``, fitted on another graph), ``ConfigError`` when the model was trained on
        another taxonomy.
        """
        import onnxruntime as ort  # heavy import, only where a model is loaded

        from guardproxy.encoding import POOL_INPUT, load_tokenizer

        directory = Path(model_dir)
        for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise ClassifierError(f"{directory / name}: model file not found")
        config = _read_config(directory / CONFIG_FILE)
        try:
            tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
        except ConfigError as exc:
            raise ClassifierError(str(exc)) from exc

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model_path = directory / MODEL_FILE
        session = _open_session(model_path, opts)
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        missing = [n for n in INPUTS if n not in inputs] + [n for n in OUTPUTS if n not in outputs]
        if missing:
            raise ClassifierError(f"{model_path}: model lacks inputs/outputs {missing}")
        dim = outputs["embedding"].shape[-1]
        embedding_dim = int(dim) if isinstance(dim, int) else int(config.get("hidden", 0))
        info = _parse_info(config, directory / CONFIG_FILE, embedding_dim)
        projection = projection_file.load(directory, model_path, embedding_dim) if embedding_projection else None
        exit_parts = None
        spec = _exit_spec(directory, model_path, int(config.get("hidden", embedding_dim)), early_exit)
        if spec is not None:
            del session  # the two parts replace it: one copy of the weights
            try:
                exit_parts = _load_exit(directory, model_path, spec, opts, Path(exit_cache) if exit_cache else None)
            except ClassifierError as exc:
                if early_exit is True:
                    raise
                logger.warning("guard.early_exit auto: the whole model serves every check: %s", exc)
                session = _open_session(model_path, opts)
            else:
                session = _WholeThroughParts(exit_parts)
        logger.info(
            "guard model %s %s loaded from %s (%d workers of %d threads%s)",
            info.name,
            info.version,
            directory,
            workers,
            threads,
            f", early exit after layer {exit_parts.spec.layer}" if exit_parts else "",
        )
        return cls(
            session,
            tokenizer,
            info,
            workers=workers,
            timeout=timeout,
            cache_size=cache_size,
            pools_newest=POOL_INPUT in inputs,
            early_exit=exit_parts,
            projection=projection,
            **options,
        )

    @classmethod
    def from_settings(cls, settings: GuardSettings) -> OnnxClassifier:
        return cls.load(
            settings.model_dir,
            threads=settings.threads,
            workers=settings.workers,
            timeout=settings.timeout,
            cache_size=settings.cache_size,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown=settings.breaker_cooldown,
            early_exit=settings.early_exit,
            exit_cache=settings.early_exit_cache,
        )

    @property
    def thresholds(self) -> Thresholds:
        """Thresholds on the scale scores are reported in (harm, jailbreak, reply harm: 0.5)."""
        return self.info.thresholds.scaled()

    @property
    def raw_thresholds(self) -> Thresholds:
        """The calibrated thresholds on the model's raw outputs, as ``config.json`` holds them."""
        return self.info.thresholds

    @property
    def embedding_dim(self) -> int:
        return self.info.embedding_dim

    @property
    def early_exit(self) -> ExitSpec | None:
        """The early-exit spec in use; None when every check runs the whole model."""
        return self._exit.spec if self._exit is not None else None

    def drop_early_exit(self) -> None:
        """Run the whole model for every check from now on (the two parts, one after the other): for a caller
        whose only policy reads below the lines the early-exit head was fitted for."""
        self._exit = None

    @property
    def exit_stats(self) -> tuple[int, int]:
        """(turns checked, turns that exited) through the per-turn early-exit path since load."""
        return self._exit_counts["turn"]

    @property
    def window_exit_stats(self) -> tuple[int, int]:
        """(windows checked, windows that exited) through the window's early-exit path since load."""
        return self._exit_counts["window"]

    @property
    def cache_stats(self) -> tuple[int, int, int]:
        """(hits, misses, entries) of the result cache."""
        return self._cache.hits, self._cache.misses, len(self._cache)

    # --- the async API (signals.Classifier) -----------------------------------------------------------

    async def score_prompts(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        """Scores of user turns (``signals.Classifier.score_prompts``). A per-turn check (no ``max_length``, no
        ``newest``) reads a turn longer than the model's ``max_length`` whole: the head+tail pass, and windows of the
        middle it skips (``prompt_windows``). A call that names its length (a conversation window) reads head and
        tail only."""
        length = self._length(max_length)
        head = self._exit_head(max_length, exact)
        if max_length is None and newest is None:
            # its own cache kind: a long turn's score is not the head+tail pass's that "raw-prompt" keys hold
            turn_keys = [_key(b"raw-turn:%d" % length, t) for t in texts]
            turn_job = functools.partial(self._turn_job, head=head)
            return await self._submit(
                turn_keys,
                turn_job,
                list(texts),
                exact=head is None,
                cost=functools.partial(turn_passes, max_length=length),
                partial=True,
            )
        lasts = self._newest(texts, newest)
        raw_keys = [_key(b"raw-prompt:%d" % length, t, *last) for t, last in zip(texts, lasts, strict=True)]
        # each text travels with its newest turn: ``_submit`` hands the job only the texts the cache lacks
        job = functools.partial(self._paired_prompt_job, max_length=length, head=head)
        return await self._submit(raw_keys, job, list(zip(texts, lasts, strict=True)), exact=head is None)

    async def score_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        raw_keys = [_key(b"raw-pair", p, r) for p, r in pairs]
        return await self._submit(raw_keys, self._pair_job, list(pairs))

    def reply_parts(self, reply: str) -> tuple[str, list[str]]:
        return self._reply_parts(reply)[:2]

    def _reply_parts(self, reply: str) -> tuple[str, list[str], bool]:
        """(head, windows) of ``reply``. A pair pass reads the reply's head (``encoding.encode_pair``); ``head`` is the
        reply cut where no pair pass reads further (so the head's score is cached while a stream grows), and
        ``windows`` the parts after the head that no pass would read: overlapping windows of ``REPLY_WINDOW_IDS``
        ids every ``REPLY_WINDOW_STRIDE`` ids after the first stride, cut from the normalised reply at the
        tokenizer's offsets; [] for a reply the head covers. Scored as (prompt, window) pairs, their reply harm finds
        harmful text after a long harmless opening, which the head alone never reads. At most
        ``MAX_REPLY_WINDOWS``, from the start; ``_reply_parts`` also says whether text was left unread (past those
        or past ``RAW_REPLY_CHARS``)."""
        from guardproxy.normalize import normalize

        text = normalize(reply[:RAW_REPLY_CHARS])
        cut = len(reply) > RAW_REPLY_CHARS
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        head = text if len(offsets) <= REPLY_HEAD_IDS else text[: offsets[REPLY_HEAD_IDS - 1][1]]
        if len(offsets) <= REPLY_WINDOW_IDS:
            return head, [], cut
        windows = []
        last = len(offsets) - REPLY_WINDOW_IDS + REPLY_WINDOW_STRIDE
        for start in range(REPLY_WINDOW_STRIDE, last, REPLY_WINDOW_STRIDE):
            end = min(start + REPLY_WINDOW_IDS, len(offsets))
            windows.append(text[offsets[start][0] : offsets[end - 1][1]])
            if len(windows) == MAX_REPLY_WINDOWS:
                return head, windows, cut or end < len(offsets)
        return head, windows, cut

    def prompt_windows(self, text: str) -> list[str]:
        """The windows a per-turn check reads of ``text`` besides its pass (``encoding.encode_prompt`` at the
        model's ``max_length``), cut from the normalised text at the tokenizer's offsets: ``PROMPT_WINDOW_IDS`` ids
        every ``PROMPT_WINDOW_STRIDE``, so an ask up to one overlap long is read whole by one window.

        - A text the pass reads whole and longer than a window: windows over all of it (a short ask beside a
          paragraph of other text is diluted in the pass), counted from ``WHOLE_TURN_WINDOW_LINE``.
        - A longer text: windows of the middle the pass skips (it keeps a quarter of its ids from the head and the
          rest from the tail, 63 and 191 for a 256-id model), from one overlap before the skipped ids to one overlap
          after them, counted from ``PROMPT_WINDOW_LINE``. At most ``MAX_PROMPT_WINDOWS``, from the head on: the rest
          of a longer middle is read by no pass (nor tokenized: only the prefix the windows can reach is).

        [] for a text within one window."""
        return self._prompt_windows(text)[0]

    def _prompt_windows(self, text: str) -> tuple[list[str], bool]:
        """``prompt_windows``, and whether they are a turn read whole by the pass (its windows counted from
        ``WHOLE_TURN_WINDOW_LINE``, else from ``PROMPT_WINDOW_LINE``)."""
        from guardproxy.encoding import HEAD_FRACTION
        from guardproxy.normalize import normalize

        text = normalize(_bounded(text))
        budget = self.info.max_length - 2
        size = min(PROMPT_WINDOW_IDS, budget)  # a window is read whole, even by a model shorter than the default
        if len(text) <= size:  # every id spans at least one character
            return [], False
        kept_head = int(budget * HEAD_FRACTION)
        overlap = size - PROMPT_WINDOW_STRIDE
        reach = (kept_head + MAX_PROMPT_WINDOWS * PROMPT_WINDOW_STRIDE + size) * _CHARS_PER_ID
        cut = len(text) > reach
        offsets = self._tokenizer.encode(text[:reach] if cut else text, add_special_tokens=False).offsets
        n = len(offsets)
        if n <= size:
            return [], False
        whole = not cut and n <= budget
        if whole:  # read whole by the pass: windows over all of it
            first, end = 0, n
        else:  # the pass skips ids [kept_head, n - (budget - kept_head)); in a cut text they run past the prefix
            first = max(0, kept_head - overlap)
            end = n if cut else min(n, n - (budget - kept_head) + overlap)
        windows = []
        for start in range(first, end, PROMPT_WINDOW_STRIDE):
            stop = min(start + size, n)
            windows.append(text[offsets[start][0] : offsets[stop - 1][1]])
            if stop >= end or len(windows) == MAX_PROMPT_WINDOWS:
                break
        return windows, whole

    def _turn_job(
        self,
        texts: list[str],
        cancel: threading.Event,
        *,
        head: Head | None = None,
        found: list[Any] | None = None,
    ) -> list[PromptScore]:
        """Per-turn checks in one job, in two rounds, each from the last text (the newest turn of a request, its ask)
        back: every text's head+tail pass (exiting on ``head`` where it may), then the windows of each text longer
        than that pass reads (``prompt_windows``, combined by ``_turn``). ``found`` gets each text's (score, whole)
        as it comes: after the first round the pass's score, which the text's windows can only raise, and whole once
        its windows are read. So a call that times out still has a score of every text its first round reached
        (``ClassifierPartial``), and an ask placed before long padding is read before the padding's middles are.
        Windows run the whole model: an exited window's harm is an estimate capped below the exit's lines and could
        never count. When a window decides a turn whose pass exited, the pass runs again on the whole model, so the
        score has the embedding and jailbreak score of an unexited one."""
        length = self.info.max_length
        out: list[PromptScore | None] = [None] * len(texts)
        parts: list[list[str]] = [[] for _ in texts]
        whole_turn = [False] * len(texts)
        for i in reversed(range(len(texts))):
            (out[i],) = self._prompt_job([texts[i]], cancel, max_length=length, newest=[()], head=head)
            self._executor.run_light()  # a heavy call yields between its passes, and between normalising them too
            parts[i], whole_turn[i] = self._prompt_windows(texts[i])
            if whole_turn[i] and out[i].harm < WHOLE_TURN_WINDOW_GATE:  # type: ignore[union-attr]
                parts[i] = []  # a turn read whole whose pass reads next to no harm: its windows are not read
            view = prose_view(texts[i])
            if view is not None:
                parts[i] = [*parts[i], view]
            if found is not None:
                found[i] = (out[i], not parts[i])
        for i in reversed(range(len(texts))):
            score = out[i]
            if not parts[i] or score is None:
                continue
            windows = self._prompt_job(parts[i], cancel, max_length=length, newest=[()] * len(parts[i]))
            line = WHOLE_TURN_WINDOW_LINE if whole_turn[i] else PROMPT_WINDOW_LINE
            whole = _turn(score, windows, line)
            if score.exited and whole is not score:
                (again,) = self._prompt_job([texts[i]], cancel, max_length=length, newest=[()])
                whole = _turn(again, windows, line)
            out[i] = whole
            if found is not None:
                found[i] = (whole, True)
        return out  # type: ignore[return-value]

    async def score_whole_replies(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        """``score_replies`` over each reply's whole length: the refusal class of its head, and the higher reply harm
        of its head and of its windows (``reply_parts``) that reach ``REPLY_WINDOW_LINE``."""
        raw_keys = [_key(b"raw-whole", p, r) for p, r in pairs]
        limit_s = self._timeout + whole_reply_allowance(pairs)
        return await self._submit(
            raw_keys, self._whole_job, list(pairs), limit_s=limit_s, cost=lambda pair: 1 + _reply_windows(pair[1])
        )

    def score_whole_replies_sync(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        return self._whole_job(list(pairs), threading.Event())

    def _whole_job(self, pairs: list[tuple[str, str]], cancel: threading.Event) -> list[ReplyScore]:
        out = []
        for prompt, reply in pairs:
            head, windows, unread = self._reply_parts(reply)
            scores = self._pair_job([(prompt, head), *((prompt, w) for w in windows)], cancel)
            whole = _whole(scores[0], [s.reply_harm for s in scores[1:]])
            out.append(dataclasses.replace(whole, unread=True) if unread else whole)
        return out

    async def aclose(self) -> None:
        """Stop accepting work, drop queued jobs, and wait (off the loop) for a running one to finish."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # --- the sync API (CLI: score, eval, classify) -----------------------------------------------------

    def score_prompts_sync(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        newest: Sequence[str] | None = None,
        exact: bool = False,
    ) -> list[PromptScore]:
        if max_length is None and newest is None:  # a per-turn check: the middle too (``score_prompts``)
            return self._turn_job(list(texts), threading.Event(), head=self._exit_head(None, exact))
        lasts = self._newest(texts, newest)
        return self._prompt_job(
            list(texts),
            threading.Event(),
            max_length=self._length(max_length),
            newest=lasts,
            head=self._exit_head(max_length, exact),
        )

    def score_replies_sync(self, pairs: Sequence[tuple[str, str]]) -> list[ReplyScore]:
        return self._pair_job(list(pairs), threading.Event())

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OnnxClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with OnnxClassifier.load(...) as model:`` closes it at the end, as the sync CLI paths need."""
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------------

    def _semaphore(self, heavy: bool = False) -> asyncio.Semaphore:
        """The slots a call waits for: ``max_pending`` for a light call, ``workers`` for a heavy one."""
        # asyncio primitives belong to one loop; tests (and a CLI that runs several loops) get one per loop.
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._max_pending), asyncio.Semaphore(self._workers))
        _, light, heavy_calls = self._slots
        return heavy_calls if heavy else light

    async def _submit(
        self,
        raw_keys: list[bytes],
        job: Callable[[list[Any], threading.Event], list[T]],
        items: list[Any],
        *,
        exact: bool = True,
        limit_s: float | None = None,
        cost: Callable[[Any], int] | None = None,
        partial: bool = False,
    ) -> list[T]:
        """``exact``: an exited score in the cache does not answer this call. ``limit_s``: the job's time limit, if
        not the classifier's timeout. ``cost``: the model passes an item will run (one, if not given): a call of
        more than ``LIGHT_CALL_PASSES`` is heavy. ``partial``: the job takes a ``found`` list and puts (score, whole)
        in an item's place as it goes, and a call that times out with some there raises ``ClassifierPartial`` with
        those scores (and caches the whole ones)."""
        if self._closed:
            raise ClassifierError("classifier is closed")
        cached = [_usable(self._cache.get(k), exact) for k in raw_keys]
        todo = [i for i, hit in enumerate(cached) if hit is None]
        if not todo:
            return cached
        breaker = self.breaker
        if not breaker.allow():
            raise ClassifierError(
                f"classifier circuit open after {breaker.failures} consecutive failures; "
                f"next try in {breaker.retry_in():.1f} s"
            )
        passes = sum(cost(items[i]) for i in todo) if cost is not None else len(todo)
        found: list[Any] = [None] * len(todo)
        run = job
        if partial:
            takes_found: Callable[..., list[T]] = job
            run = functools.partial(takes_found, found=found)
        try:
            results = await self._run_job(run, [items[i] for i in todo], limit_s, heavy=passes > LIGHT_CALL_PASSES)
        except ClassifierBusy as exc:
            breaker.release()  # saturated, not broken: overload must not open the circuit
            done = list(found)  # a snapshot: the job may still be filling it until it sees the cancel
            if not any(d is not None for d in done):
                raise
            merged: list[Any] = list(cached)
            for i, entry in zip(todo, done, strict=True):
                if entry is not None:
                    merged[i], whole = entry
                    if whole:
                        self._cache.put(raw_keys[i], merged[i])
            read = sum(d is not None and d[1] for d in done)
            began = sum(d is not None and not d[1] for d in done)
            message = f"{exc}; of {len(todo)} texts {read} read whole, {began} in part"
            raise ClassifierPartial(message, merged) from exc
        except ClassifierError:
            if not self._closed:
                breaker.failure()
            raise
        except BaseException:
            breaker.release()
            raise
        breaker.success()
        out: list[Any] = list(cached)
        for i, result in zip(todo, results, strict=True):
            out[i] = result
            self._cache.put(raw_keys[i], result)
        return out

    async def _run_job(
        self,
        job: Callable[[list[Any], threading.Event], list[T]],
        items: list[Any],
        limit_s: float | None = None,
        *,
        heavy: bool = False,
    ) -> list[T]:
        """Run ``job(items)`` in the executor within the timeout; every failure is a ``ClassifierError``.

        A timeout is ``ClassifierBusy`` when some job or batch finished while this call waited (the model works:
        the queue is long, or this call is too big to finish in time) and a plain ``ClassifierError`` when none did
        (the model is stuck): only the latter may open the circuit breaker, so one client's oversized request
        cannot fail every tenant's requests fast.
        """
        loop = asyncio.get_running_loop()
        limit = self._timeout if limit_s is None else limit_s
        deadline = loop.time() + limit
        began = time.monotonic()

        def timed_out(what: str) -> ClassifierError:
            if self._last_done >= began:
                return ClassifierBusy(f"classifier busy: {what} within {limit:g} s")
            return ClassifierError(f"classification timed out after {limit:g} s ({what}; no call finished)")

        slots = self._semaphore(heavy)
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        except TimeoutError:
            raise timed_out("no slot") from None
        cancel = threading.Event()
        try:
            submit = self._executor.submit_heavy if heavy else self._executor.submit
            cfut: Future[list[T]] = submit(self._finishing, job, items, cancel)
        except RuntimeError as exc:  # executor shut down between the check above and now
            slots.release()
            raise ClassifierError("classifier is closed") from exc
        # The slot frees when the thread is really done (or the job was dropped unstarted), not when the
        # caller gives up: abandoned work still occupies the executor and must count against the bound.
        cfut.add_done_callback(lambda _f: _release_threadsafe(loop, slots))
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.wrap_future(cfut)
        except TimeoutError:
            cancel.set()
            raise timed_out("no result") from None
        except BaseException as exc:
            cancel.set()  # caller cancelled, or the job failed: stop at the next batch either way
            if isinstance(exc, ClassifierError | asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            raise ClassifierError(f"inference failed: {exc!r}") from exc

    def _finishing(
        self, job: Callable[[list[Any], threading.Event], list[T]], items: list[Any], cancel: threading.Event
    ) -> list[T]:
        """``job`` on the worker thread, noting when it ended (before the caller can see its result)."""
        try:
            return job(items, cancel)
        finally:
            self._last_done = time.monotonic()

    def _length(self, max_length: int | None) -> int:
        """Ids a prompt may use: the model's maximum, or less when the caller asks (a conversation window)."""
        if max_length is None:
            return self.info.max_length
        return max(8, min(max_length, self.info.max_length))

    def _newest(self, texts: Sequence[str], newest: Sequence[str] | None) -> list[tuple[str, ...]]:
        """Per text, its newest turn as a 0- or 1-tuple: empty unless this model pools by it."""
        if newest is None or not self.pools_newest:
            return [()] * len(texts)
        if len(newest) != len(texts):
            raise ValueError(f"newest: {len(newest)} turns for {len(texts)} texts")
        return [(n,) for n in newest]

    def _exit_head(self, max_length: int | None, exact: bool) -> Head | None:
        """The early-exit head a prompt call may exit on: the per-turn head for a per-turn check (the model's own
        length), the window's for a pass at the length its head was fitted for; None: the whole model."""
        if self._exit is None or exact:
            return None
        if max_length is None:
            return self._exit.spec
        window = self._exit.spec.window
        return window if window is not None and self._length(max_length) == window.max_ids else None

    def _paired_prompt_job(
        self,
        items: list[tuple[str, tuple[str, ...]]],
        cancel: threading.Event,
        *,
        max_length: int,
        head: Head | None = None,
    ) -> list[PromptScore]:
        """``_prompt_job`` over (text, newest turn) pairs."""
        texts = [t for t, _ in items]
        return self._prompt_job(texts, cancel, max_length=max_length, newest=[n for _, n in items], head=head)

    def _prompt_job(
        self,
        texts: list[str],
        cancel: threading.Event,
        *,
        max_length: int,
        newest: list[tuple[str, ...]],
        head: Head | None = None,
    ) -> list[PromptScore]:
        from guardproxy.encoding import encode_prompt, encode_window, unreadable_share
        from guardproxy.normalize import normalize

        started = time.perf_counter()
        normalized = [normalize(_bounded(t)) for t in texts]
        lasts = [tuple(normalize(_bounded(n)) for n in last) for last in newest]
        keys = [_key(b"prompt:%d" % max_length, n, *last) for n, last in zip(normalized, lasts, strict=True)]

        def encode(i: int) -> Any:
            if lasts[i]:
                return encode_window(self._tokenizer, normalized[i], lasts[i][0], max_length)
            return encode_prompt(self._tokenizer, normalized[i], max_length)

        def decode(out: dict[str, npt.NDArray[np.float32]], rows: list[int]) -> list[PromptScore]:
            shares = [unreadable_share(normalized[i], self.covered_scripts) for i in rows]
            return self._prompt_scores(out, shares, head)

        # a per-turn check keeps its cut-layer state for the window estimate, exited or exact (windows do not)
        per_turn = max_length == self.info.max_length and not any(lasts)
        return self._run_cached(keys, encode, decode, cancel, started, head=head, state=per_turn)

    def _pair_job(self, pairs: list[tuple[str, str]], cancel: threading.Event) -> list[ReplyScore]:
        from guardproxy.encoding import encode_pair
        from guardproxy.normalize import normalize

        started = time.perf_counter()
        normalized = [(normalize(_bounded(p)), normalize(r[:RAW_HEAD_CHARS])) for p, r in pairs]
        keys = [_key(b"pair", p, r) for p, r in normalized]
        return self._run_cached(
            keys,
            lambda i: encode_pair(self._tokenizer, normalized[i][0], normalized[i][1], self.info.max_length),
            lambda out, _rows: self._reply_scores(out),
            cancel,
            started,
        )

    def _run_cached(
        self,
        keys: list[bytes],
        encode: Callable[[int], Any],
        decode: Callable[[dict[str, npt.NDArray[np.float32]], list[int]], list[T]],
        cancel: threading.Event,
        started: float,
        *,
        head: Head | None = None,
        state: bool = False,
    ) -> list[T]:
        """``started``: when the job began (normalisation counts as tokenization in the timings). ``decode`` gets a
        batch's outputs and the positions in ``keys`` of its rows. ``head``: the early-exit head rows may exit on. A
        call without one never reuses an exited score (and its whole-model score then replaces it in the cache).
        ``state``: a whole-model pass through the cut also returns the pooled cut-layer states (``state``)."""
        results: list[T | None] = [_usable(self._cache.get(k), head is None) for k in keys]
        first: dict[bytes, int] = {}  # duplicates inside one call are computed once
        for i, k in enumerate(keys):
            if results[i] is None:
                first.setdefault(k, i)
        todo = list(first.values())
        if todo:
            encodings = [encode(i) for i in todo]
            t1 = time.perf_counter()
            scored = self._infer(
                encodings, lambda out, rows: decode(out, [todo[r] for r in rows]), cancel, head=head, state=state
            )
            if self.observe_timing is not None:
                self.observe_timing("tokenize", t1 - started)
                self.observe_timing("model", time.perf_counter() - t1)
            for i, score in zip(todo, scored, strict=True):
                self._cache.put(keys[i], score)
                results[i] = score
        return [r if r is not None else results[first[keys[i]]] for i, r in enumerate(results)]  # type: ignore[misc]

    def _infer(
        self,
        encodings: list[Any],
        decode: Callable[[dict[str, npt.NDArray[np.float32]], list[int]], list[T]],
        cancel: threading.Event,
        *,
        head: Head | None = None,
        state: bool = False,
    ) -> list[T]:
        from guardproxy.encoding import pad_batch

        # Sort by length so a batch pads little; results go back to input order at the end.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))
        out: list[T | None] = [None] * len(encodings)
        start = 0
        while start < len(order):
            if cancel.is_set():
                raise ClassifierError("classification abandoned")
            end = start + 1
            while (
                end < len(order)
                and end - start < self._max_batch
                and (end - start + 1) * len(encodings[order[end]]) <= self._max_batch_tokens
            ):
                end += 1
            batch = [encodings[i] for i in order[start:end]]
            feeds = pad_batch(batch, pool_mask=self.pools_newest)
            if head is not None and self._exit is not None:
                outputs = self._exit.run(feeds, head)
                self._count_exits(int(outputs["exited"].sum()), len(batch), head)
            elif state and self._exit is not None:
                outputs = self._exit.run_whole_with_state(feeds)
            else:
                outputs = dict(zip(OUTPUTS, self._session.run(list(OUTPUTS), feeds), strict=True))
            rows = order[start:end]
            for i, score in zip(rows, decode(outputs, rows), strict=True):
                out[i] = score
            start = end
            # the model works: a call that times out while batches keep finishing (its own, of an oversized call)
            # is busy, not broken, and must not count toward the circuit breaker that every tenant shares
            self._last_done = time.monotonic()
            self._executor.run_light()  # a heavy call lets the light calls waiting now run (LIGHT_CALL_PASSES)
        return out  # type: ignore[return-value]

    def _count_exits(self, exited: int, checked: int, head: Head) -> None:
        kind = "window" if isinstance(head, WindowHead) else "turn"
        with self._exit_lock:
            before = self._exit_counts[kind]
            self._exit_counts[kind] = (before[0] + checked, before[1] + exited)
        if self.observe_exit is not None:
            self.observe_exit(exited, checked - exited, kind)

    def _prompt_scores(
        self, out: dict[str, npt.NDArray[np.float32]], unreadable: list[float], head: Head | None = None
    ) -> list[PromptScore]:
        t = self.info.thresholds
        scores = []
        exited = out.get("exited")
        # a per-turn check through the cut keeps its state for the window estimate (the window's own passes do not)
        estimate = self._exit.spec.window_estimate if self._exit is not None else None
        per_turn = "state" in out and not isinstance(head, WindowHead)
        states = estimate.project(out["state"]) if estimate is not None and per_turn else None
        embeddings = out["embedding"] if self.projection is None else self.projection.apply(out["embedding"])
        rows = zip(out["harm"], out["category"], out["jailbreak"], embeddings, unreadable, strict=True)
        for row, (harm, cat, jb, emb, share) in enumerate(rows):
            if exited is not None and exited[row] and head is not None:
                scores.append(
                    PromptScore(
                        harm=min(to_operating_scale(float(harm), t.harm), head.harm_cap),
                        category="none",
                        jailbreak=min(to_operating_scale(float(jb), t.jailbreak), head.jailbreak_cap),
                        embedding=_NO_EMBEDDING,
                        unreadable=share,
                        exited=True,
                        state=_NO_EMBEDDING if states is None else states[row],
                    )
                )
                continue
            idx = int(np.argmax(cat))
            # A request judged harmful always gets a hazard category the policy can write a refusal for.
            if idx == 0 and float(harm) >= t.harm and len(cat) > 1:
                idx = 1 + int(np.argmax(cat[1:]))
            scores.append(
                PromptScore(
                    harm=to_operating_scale(float(harm), t.harm),
                    category=taxonomy.CATEGORY_IDS[idx],
                    jailbreak=to_operating_scale(float(jb), t.jailbreak),
                    embedding=np.array(emb, dtype=np.float32),  # a copy: do not pin the whole batch array
                    unreadable=share,
                    state=_NO_EMBEDDING if states is None else states[row],
                )
            )
        return scores

    def _reply_scores(self, out: dict[str, npt.NDArray[np.float32]]) -> list[ReplyScore]:
        scores = []
        for probs, reply_harm in zip(out["refusal"], out["reply_harm"], strict=True):
            p = (float(probs[0]), float(probs[1]), float(probs[2]))
            scores.append(
                ReplyScore(
                    refusal=self.refusal_class(p),
                    refusal_probs=p,
                    reply_harm=to_operating_scale(float(reply_harm), self.info.thresholds.reply_harm),
                )
            )
        return scores

    def refusal_class(self, probs: tuple[float, float, float]) -> RefusalClass:
        """The contract's rule: ``none`` below ``refusal_partial``, else the likelier of partial and full."""
        if probs[1] + probs[2] < self.info.thresholds.refusal_partial:
            return "none"
        return "partial" if probs[1] >= probs[2] else "full"


def _usable(score: Any, exact: bool) -> Any:
    """A cached score, unless the caller wants the whole model's and this one exited early."""
    if exact and isinstance(score, PromptScore) and score.exited:
        return None
    return score


def _open_session(model_path: Path, opts: Any) -> Any:
    """An onnxruntime session of ``model_path`` on the CPU; ``ClassifierError`` naming the file when it cannot load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise ClassifierError(f"{model_path}: cannot load ONNX model: {exc}") from exc


def _projection_id(projection: EmbeddingProjection | None) -> str:
    if projection is None:
        return "raw"
    digest = hashlib.blake2b(projection.mean.tobytes() + projection.remove.tobytes(), digest_size=8).hexdigest()
    return f"{projection.model_md5} {digest}"


def _exit_spec(directory: Path, model_path: Path, dim: int, early_exit: bool | Literal["auto"]) -> ExitSpec | None:
    """The early-exit spec to serve, or None. With ``early_exit=True`` a missing or unfit spec raises
    ``ClassifierError`` naming the file; with ``"auto"`` it is logged and the whole model serves."""
    if early_exit is False:
        return None
    path = directory / SPEC_FILE
    if early_exit == "auto" and not path.is_file():
        logger.info(
            "guard.early_exit auto: %s not found, the whole model serves every check (fit one: python -m "
            "guardproxy.training.early_exit --model %s --data ../shared/data)",
            path,
            directory,
        )
        return None
    try:
        return load_spec(path, model_md5=file_md5(model_path), dim=dim)
    except ClassifierError as exc:
        if early_exit is True:
            raise
        logger.warning("guard.early_exit auto: the whole model serves every check: %s", exc)
        return None


def _load_exit(directory: Path, model_path: Path, spec: ExitSpec, opts: Any, cache: Path | None = None) -> _Exit:
    """The two sessions of ``spec``'s cut, from ``cache`` when it has them (or can keep them); ``ClassifierError``
    naming the spec file when they cannot be made."""
    import tempfile

    import onnxruntime as ort

    def sessions(parts: tuple[Path, Path]) -> _Exit:
        first, rest = (
            ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"]) for p in parts
        )
        return _Exit(first, rest, spec)

    failed = f"{directory / SPEC_FILE}: cannot cut {model_path.name} at {spec.tap}"
    if cache is not None:
        try:
            parts = cached_cut(model_path, spec.model_md5, spec.tap, cache)
        except OSError as exc:  # an unwritable cache only costs the cut
            logger.info("guard.early_exit_cache %s cannot be used (%s): the graph is cut at each start", cache, exc)
        except ValueError as exc:  # the cut itself failed: it would fail again
            raise ClassifierError(f"{failed}: {exc}") from exc
        else:
            try:
                return sessions(parts)
            except Exception as exc:  # a damaged entry (onnxruntime raises its own types): drop it, cut afresh
                entry = cache_entry(cache, spec.model_md5, spec.tap)
                logger.warning("guard.early_exit_cache: %s cannot be loaded (%s): removed, cutting afresh", entry, exc)
                shutil.rmtree(entry, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="guardproxy-exit-") as tmp:
            return sessions(cut_in_child(model_path, spec.tap, Path(tmp)))
    except Exception as exc:  # onnx and onnxruntime raise their own types; the message names what failed
        raise ClassifierError(f"{failed}: {exc}") from exc


def _release_threadsafe(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore) -> None:
    try:
        loop.call_soon_threadsafe(slots.release)
    except RuntimeError:  # the loop is closed: nobody is left waiting for the slot
        pass
