"""In-process state backend: records and refusal memories in LRU order, bounded by count and bytes, with a TTL.

The default backend of a single gateway process, and the local fallback of the Redis backend. Everything here
runs on the event loop without awaiting: each operation is a few dictionary and bytearray steps.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from guardproxy.conversation.state import ENTRY_BYTES, MARKER, Loaded, trim_record

__all__ = ["MemoryBackend"]

# Python's own bookkeeping per record (key bytes object, record object, bytearray header and its slack, the
# float, the OrderedDict node and dict slot), counted against max_bytes. 240 undercounted: tracemalloc under
# the soak mix (2026-12-02) put a one-turn conversation at 450-520 B in all against ~90 B of key + payload.
_RECORD_OVERHEAD = 400
_TENANT_OVERHEAD = 400


def _states_bytes(states: bytes) -> int:
    """A record's kept turn states as counted: the blob and its bytes object's header (``sys.getsizeof``)."""
    return sys.getsizeof(states) if states else 0


class _Record:
    __slots__ = ("data", "expires", "states")

    def __init__(self, expires: float) -> None:
        self.data = bytearray()
        self.expires = expires
        self.states = b""  # the kept user-turn states (state.pack_turn_states), replaced whole


class _Refused:
    __slots__ = ("blobs", "expires")

    def __init__(self, maxlen: int, expires: float) -> None:
        self.blobs: deque[bytes] = deque(maxlen=maxlen)
        self.expires = expires


class MemoryBackend:
    """``max_records`` conversations and ``max_tenants`` refusal memories, together at most ``max_bytes``."""

    def __init__(
        self,
        *,
        max_records: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_seconds: float = 24 * 3600,
        max_record_bytes: int = 8192 * ENTRY_BYTES,
        max_refused: int = 32,
        max_tenants: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.ttl = ttl_seconds
        self.max_record_bytes = max_record_bytes
        self.max_refused = max_refused
        self.max_tenants = max_tenants
        self._clock = clock
        self._records: OrderedDict[bytes, _Record] = OrderedDict()
        self._tenants: OrderedDict[bytes, _Refused] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    @property
    def bytes_used(self) -> int:
        """The bytes counted against ``max_bytes`` (payload plus a fixed estimate of Python's overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._records)

    def _record(self, root: bytes, now: float) -> _Record | None:
        rec = self._records.get(root)
        if rec is None:
            return None
        if rec.expires <= now:
            self._drop_record(root)
            return None
        rec.expires = now + self.ttl
        self._records.move_to_end(root)
        return rec

    def _refused(self, tenant: bytes, now: float) -> _Refused | None:
        ref = self._tenants.get(tenant)
        if ref is None:
            return None
        if ref.expires <= now:
            self._drop_tenant(tenant)
            return None
        ref.expires = now + self.ttl
        self._tenants.move_to_end(tenant)
        return ref

    def _drop_record(self, root: bytes) -> None:
        rec = self._records.pop(root)
        self._bytes -= len(rec.data) + _states_bytes(rec.states) + len(root) + _RECORD_OVERHEAD

    def _drop_tenant(self, tenant: bytes) -> None:
        ref = self._tenants.pop(tenant)
        self._bytes -= sum(map(len, ref.blobs)) + len(tenant) + _TENANT_OVERHEAD

    def _evict(self, now: float) -> None:
        # Expired entries sit at the front too (every access refreshes both order and expiry).
        while self._records and next(iter(self._records.values())).expires <= now:
            self._drop_record(next(iter(self._records)))
        while self._tenants and next(iter(self._tenants.values())).expires <= now:
            self._drop_tenant(next(iter(self._tenants)))
        while len(self._records) > self.max_records or (self._bytes > self.max_bytes and self._records):
            self._drop_record(next(iter(self._records)))
            self.evictions += 1
        while len(self._tenants) > self.max_tenants or (self._bytes > self.max_bytes and self._tenants):
            self._drop_tenant(next(iter(self._tenants)))
            self.evictions += 1

    def _loaded(self, rec: _Record | None, tail_entries: int | None, refused: tuple[bytes, ...]) -> Loaded:
        if rec is None:
            return Loaded(record=b"", complete=True, truncated=False, refused=refused)
        data = bytes(rec.data) if tail_entries is None else bytes(rec.data[-tail_entries * ENTRY_BYTES :])
        return Loaded(
            record=data,
            complete=len(data) == len(rec.data),
            truncated=rec.data[:ENTRY_BYTES] == MARKER,
            refused=refused,
            turn_states=(rec.states,) if rec.states else (),
        )

    async def load(self, root: bytes, tenant: bytes, *, tail_entries: int) -> Loaded:
        now = self._clock()
        ref = self._refused(tenant, now)
        refused = tuple(reversed(ref.blobs)) if ref is not None else ()
        return self._loaded(self._record(root, now), tail_entries, refused)

    async def load_record(self, root: bytes) -> Loaded:
        return self._loaded(self._record(root, self._clock()), None, ())

    def append_now(self, root: bytes, entry: bytes, turn_states: bytes | None = None) -> None:
        now = self._clock()
        rec = self._record(root, now)
        if rec is None:
            rec = self._records[root] = _Record(now + self.ttl)
            self._bytes += len(root) + _RECORD_OVERHEAD
        before = len(rec.data)
        rec.data += entry
        if len(rec.data) > self.max_record_bytes:
            rec.data = bytearray(trim_record(bytes(rec.data), self.max_record_bytes))
        self._bytes += len(rec.data) - before
        if turn_states is not None:
            self._bytes += _states_bytes(turn_states) - _states_bytes(rec.states)
            rec.states = turn_states
        self._evict(now)

    async def append(self, root: bytes, entry: bytes, turn_states: bytes | None = None) -> bool:
        self.append_now(root, entry, turn_states)
        return True

    async def add_refused(self, tenant: bytes, blob: bytes) -> bool:
        now = self._clock()
        ref = self._refused(tenant, now)
        if ref is None:
            ref = self._tenants[tenant] = _Refused(self.max_refused, now + self.ttl)
            self._bytes += len(tenant) + _TENANT_OVERHEAD
        if len(ref.blobs) == ref.blobs.maxlen:
            self._bytes -= len(ref.blobs[0])
        ref.blobs.append(blob)
        self._bytes += len(blob)
        self._evict(now)
        return True

    async def aclose(self) -> None:
        self._records.clear()
        self._tenants.clear()
        self._bytes = 0
