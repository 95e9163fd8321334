"""The state record of a conversation and the backend protocol that stores it.

A record (one per ``Chain.root``) is a byte string of fixed-size entries, appended in time order::

    entry = tag (8 bytes) | snapshot (12 bytes)

An entry says: "the conversation was at this position, and this was its state there". ``observe`` appends one at
the end of every request; ``record_reply`` appends one at the position after the relayed reply. Appending is the
only write, so two gateway replicas never overwrite each other's state (Redis ``APPEND`` is atomic), a regenerated
or edited turn finds the older position it branches from, and a conversation costs 40 bytes per turn. A record that
outgrows its cap keeps its newest half behind a marker entry (``MARKER``), after which a missing position means
"unknown", not "forged".

The tenant's refusal memory is a separate short list (newest first) of the embeddings of refused requests,
quantised to int8 and tagged with the embedding space they were written in (``pack_embedding``): replicas on
another model, or a state kept from before the model was replaced, are never compared across spaces. Each carries
its family (8 bytes): the refused request's own, or that of the family it rewords (the drill report's decision
consistency reads it). A request rewords a family when it is close to the family's anchor, its oldest refused request
in the list (``ConversationTracker._rephrase``), not merely to some member: a chain of pairwise matches (B rewords A, C
rewords B) would otherwise grow one family across unrelated requests. The anchor is one of the entries, so families
cost no bytes beyond the 8 each entry carries.

Beside the record, a conversation keeps the states of its last few user turns (``pack_turn_states``): what the
window estimate (``guardproxy.early_exit.WindowEstimate``) reads instead of a window pass. A replica that did not
score those turns itself reads them here, so request N+1 costs one turn pass on whichever replica it lands. The blob
is replaced, not appended: a constant ~140 bytes per conversation, not per turn.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from guardproxy.conversation.integrity import TAG_BYTES, History

__all__ = [
    "ENTRY_BYTES",
    "FAMILY_BYTES",
    "NO_FAMILY",
    "NO_SPACE",
    "Loaded",
    "RefusedRequests",
    "Snapshot",
    "StateBackend",
    "TurnState",
    "find_entry",
    "pack_embedding",
    "pack_turn_states",
    "refused_risks",
    "unpack_embeddings",
    "unpack_turn_states",
]

_SNAPSHOT = struct.Struct("<BBHBBBBBBBB")  # flags refusals turns trajectory window peak r1 r2 r3 r4 escalation
SNAPSHOT_BYTES = _SNAPSHOT.size
ENTRY_BYTES = TAG_BYTES + SNAPSHOT_BYTES
MARKER_TAG = b"\0" * TAG_BYTES
RISKS_KEPT = 4  # the last per-turn risks, for the trend

_HISTORY_CODES: tuple[History, ...] = ("none", "verified", "unverified", "forged")
_F_RELAYED = 0x01
_F_MARKER = 0x08
_F_LAST_REFUSED = 0x10
_ABSENT = 255  # a quantised risk that was never observed


def _q(x: float) -> int:
    return int(round(min(1.0, max(0.0, x)) * 254))


def _dq(q: int) -> float:
    return q / 254


@dataclass(frozen=True)
class Snapshot:
    """The state of a conversation at one position. Probabilities are stored to 1/254."""

    turns: int = 0  # user turns so far
    trajectory: float = 0.0
    window: float = 0.0
    peak: float = 0.0  # highest single-turn risk so far
    risks: tuple[float, ...] = ()  # the last RISKS_KEPT per-turn risks, oldest first
    refusals: int = 0
    history: History = "none"
    relayed: bool = False  # the position ends with a reply this gateway relayed
    last_refused: bool = False
    escalation: float = 0.0

    def pack(self) -> bytes:
        risks = [_q(r) for r in self.risks[-RISKS_KEPT:]]
        risks = [_ABSENT] * (RISKS_KEPT - len(risks)) + risks
        flags = (
            (_F_RELAYED if self.relayed else 0)
            | (_HISTORY_CODES.index(self.history) << 1)
            | (_F_LAST_REFUSED if self.last_refused else 0)
        )
        return _SNAPSHOT.pack(
            flags,
            min(self.refusals, 255),
            min(self.turns, 65535),
            _q(self.trajectory),
            _q(self.window),
            _q(self.peak),
            *risks,
            _q(self.escalation),
        )

    @classmethod
    def unpack(cls, data: bytes) -> Snapshot:
        flags, refusals, turns, traj, window, peak, *risks, esc = _SNAPSHOT.unpack(data)
        return cls(
            turns=turns,
            trajectory=_dq(traj),
            window=_dq(window),
            peak=_dq(peak),
            risks=tuple(_dq(r) for r in risks if r != _ABSENT),
            refusals=refusals,
            history=_HISTORY_CODES[(flags >> 1) & 0x3],
            relayed=bool(flags & _F_RELAYED),
            last_refused=bool(flags & _F_LAST_REFUSED),
            escalation=_dq(esc),
        )

    def entry(self, tag: bytes) -> bytes:
        return tag + self.pack()


MARKER = MARKER_TAG + _SNAPSHOT.pack(_F_MARKER, 0, 0, 0, 0, 0, _ABSENT, _ABSENT, _ABSENT, _ABSENT, 0)


def find_entry(record: bytes, tag: bytes) -> Snapshot | None:
    """The newest snapshot stored under ``tag`` in ``record`` (entries aligned to ENTRY_BYTES), or None."""
    start = len(record) % ENTRY_BYTES  # a torn head (never written by us) is skipped, never misread
    end = len(record)
    while True:
        pos = record.rfind(tag, start, end)
        if pos < 0:
            return None
        if (pos - start) % ENTRY_BYTES == 0:
            return Snapshot.unpack(record[pos + TAG_BYTES : pos + ENTRY_BYTES])
        end = pos + TAG_BYTES - 1  # a match straddling entries: look further back


def trim_record(record: bytes, max_bytes: int) -> bytes:
    """Keep the newest half of an over-long record behind the truncation marker."""
    keep = (max_bytes // 2) // ENTRY_BYTES * ENTRY_BYTES
    return MARKER + record[len(record) - keep :]


@dataclass(frozen=True)
class Loaded:
    """What one state read returns."""

    record: bytes  # the newest entries of the record (all of it when ``complete``), aligned
    complete: bool  # ``record`` is the whole record
    truncated: bool  # older entries were dropped (record cap): a missing position is unknown, not forged
    refused: tuple[bytes, ...] = ()  # the tenant's refused-request embeddings, newest first
    degraded: bool = False  # the shared backend failed and local state answered
    turn_states: tuple[bytes, ...] = ()  # the conversation's kept user-turn states (``pack_turn_states``), by source


class StateBackend(Protocol):
    """Where records and refusal memories live. Implementations raise StateBackendError on failure."""

    async def load(self, root: bytes, tenant: bytes, *, tail_entries: int) -> Loaded: ...

    async def load_record(self, root: bytes) -> Loaded: ...

    async def append(self, root: bytes, entry: bytes, turn_states: bytes | None = None) -> bool:
        """Append one entry, and replace the conversation's turn states when given; False when the shared backend
        failed and both went to local state only."""
        ...

    async def add_refused(self, tenant: bytes, blob: bytes) -> bool: ...

    async def aclose(self) -> None: ...


# the embedding space's fingerprint (``OnnxClassifier.embedding_space``), dimension, scale, the request's risk when
# refused (1/254), its family
_EMB_HEADER = struct.Struct("<4sHfB8s")
# the layout before families (until 2026-12-07): still read, as of no family, so a rolling upgrade keeps comparing a
# refusal one version recorded with a rewording the other sees
_EMB_HEADER_V1 = struct.Struct("<4sHfB")
NO_SPACE = b"\0\0\0\0"  # a classifier that names no embedding space
FAMILY_BYTES = 8
NO_FAMILY = bytes(FAMILY_BYTES)


def pack_embedding(
    vector: npt.NDArray[np.float32], risk: float, space: bytes = NO_SPACE, family: bytes = NO_FAMILY
) -> bytes:
    """int8-quantise an L2-normalised embedding (one scale per vector) of embedding ``space`` (4 bytes), with the
    refused request's ``family`` (8 bytes): 384 dims fit in 403 bytes."""
    v = np.asarray(vector, dtype=np.float32).ravel()
    scale = float(np.max(np.abs(v))) / 127 or 1.0
    q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
    return bytes(_EMB_HEADER.pack(space, v.size, scale, _q(risk), family[:FAMILY_BYTES]) + q.tobytes())


def _of_space(blob: bytes, space: bytes, dim: int | None = None) -> tuple[float, float, bytes] | None:
    """(scale, risk, family) of a blob of ``space`` (and ``dim``), else None: a blob another model or projection
    wrote (a replica not yet upgraded, a state written before the model was replaced) or an older layout is not
    comparable and is skipped."""
    if len(blob) < _EMB_HEADER_V1.size:
        return None
    tag, d, scale, risk = _EMB_HEADER_V1.unpack_from(blob)
    if tag != space or (dim is not None and d != dim):
        return None
    if len(blob) == _EMB_HEADER.size + d:
        return scale, _dq(risk), _EMB_HEADER.unpack_from(blob)[4]
    if len(blob) == _EMB_HEADER_V1.size + d:
        return scale, _dq(risk), NO_FAMILY
    return None


def refused_risks(blobs: tuple[bytes, ...], space: bytes = NO_SPACE) -> list[float]:
    """The risk stored with each embedding blob (``pack_embedding``) of ``space``."""
    return [read[1] for blob in blobs if (read := _of_space(blob, space)) is not None]


@dataclass(frozen=True)
class RefusedRequests:
    """The tenant's refused requests of one embedding space: L2-normalised embeddings (a row each), their risks
    when refused, and their families."""

    matrix: npt.NDArray[np.float32]
    risks: npt.NDArray[np.float32]
    families: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.families)


def unpack_embeddings(blobs: tuple[bytes, ...], dim: int, space: bytes = NO_SPACE) -> RefusedRequests:
    """The blobs of ``space`` and dimension ``dim``; others are skipped."""
    rows = []
    risks = []
    families = []
    for blob in blobs:
        read = _of_space(blob, space, dim)
        if read is None:
            continue
        scale, risk, family = read
        rows.append(np.frombuffer(blob, dtype=np.int8, offset=len(blob) - dim).astype(np.float32) * scale)
        risks.append(risk)
        families.append(family)
    if not rows:
        return RefusedRequests(np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.float32), ())
    m = np.stack(rows)
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out: npt.NDArray[np.float32] = (m / np.maximum(norms, 1e-12)).astype(np.float32)
    return RefusedRequests(out, np.asarray(risks, dtype=np.float32), tuple(families))


# --- the kept user-turn states --------------------------------------------------------------------------------

_STATES_HEADER = struct.Struct("<4sBB")  # the projection's fingerprint, dims, turns
_TURN_KEY_BYTES = 8


@dataclass(frozen=True)
class TurnState:
    """One user turn's harm and projected state (``PromptScore.harm`` / ``.state``), keyed by a keyed hash of its
    text: the state depends on the text and the model alone, so a key match is the same turn wherever it sits."""

    key: bytes
    harm: float
    state: npt.NDArray[np.float32]


def pack_turn_states(fingerprint: bytes, turns: list[TurnState]) -> bytes:
    """The blob of ``turns`` (oldest first), all of one dimension: header, then per turn its key, harm (float32)
    and state (float16: a relative error of ~5e-4, far below what moves the estimate)."""
    dims = len(turns[0].state) if turns else 0
    out = [_STATES_HEADER.pack(fingerprint[:4], dims, len(turns))]
    for t in turns:
        out.append(t.key[:_TURN_KEY_BYTES] + struct.pack("<f", t.harm) + np.asarray(t.state, "<f2").tobytes())
    return b"".join(out)


def unpack_turn_states(blob: bytes, fingerprint: bytes, dims: int) -> list[TurnState]:
    """The turns of a blob written for this projection (``fingerprint``, ``dims``); [] for any other, a torn or a
    foreign blob: a missing state only means the window pass runs."""
    if len(blob) < _STATES_HEADER.size:
        return []
    fp, d, count = _STATES_HEADER.unpack_from(blob)
    size = _TURN_KEY_BYTES + 4 + 2 * d
    if fp != fingerprint[:4] or d != dims or len(blob) != _STATES_HEADER.size + count * size:
        return []
    turns = []
    for i in range(count):
        at = _STATES_HEADER.size + i * size
        (harm,) = struct.unpack_from("<f", blob, at + _TURN_KEY_BYTES)
        state = np.frombuffer(blob, "<f2", d, at + _TURN_KEY_BYTES + 4).astype(np.float32)
        turns.append(TurnState(blob[at : at + _TURN_KEY_BYTES], harm, state))
    return turns
