"""Redis state backend (shared by every gateway replica) and the fallback wrapper that keeps requests moving.

Keys (``prefix`` defaults to ``guardproxy:``; names are HMACs, never tenant names or text)::

    {prefix}c:{root hex}    string: the conversation record (fixed-size entries, APPENDed; see state.py)
    {prefix}t:{tenant hex}  list:   the tenant's refused-request embeddings, newest first, LTRIMmed to max_refused
    {prefix}s:{root hex}    string: the conversation's last user turns' states (state.pack_turn_states), replaced
    {prefix}k:hmac          string: the keyed fingerprint of the replicas' HMAC secret (integrity.secret_fingerprint)

Every key but ``k:hmac`` carries the state's TTL, refreshed on each read and write. An over-long record is trimmed
atomically by a short Lua script (keep the newest half behind the truncation marker).

Replicas whose ``state.hmac_secret`` differ cannot read each other's state: every conversation that moves between
them reads forged. Given the fingerprint, the backend checks it on its first read and once a minute after, in that
read's round trip (``check_secret`` checks at once): it claims ``k:hmac`` when absent, keeps it alive while it holds
this replica's fingerprint (10 minutes after the last such replica stopped, it lapses, so a completed rotation clears
itself), and logs one ERROR line when it holds another's. ``guardproxy serve`` checks once more before it takes a
request (``ResilientBackend.check_secret``), so a replica started on another secret says so at startup. Requests
are served either way: during a secret rotation both secrets run for a while (a rotation that changes
``state.prefix`` with the secret has no mismatch to report). Errors name the server (``host:port db N``) and
Redis's own message; never the password.

``ResilientBackend`` wraps the Redis backend: every call is bounded by ``timeout``; a failure or timeout
answers from a local ``MemoryBackend`` instead, is logged once per outage, and counted
(``guardproxy_state_fallbacks_total{op}``); while Redis is down it is probed at most once per
``retry_interval`` (by the requests, and by a background task while none come: a replica out of rotation recovers
too) and used again as soon as a probe succeeds. Reads consult the local state as well, and the writes answered
locally (``guardproxy_state_backlog``) are replayed to Redis when it returns, so a conversation that went on during
an outage keeps its history, on this replica and the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from guardproxy.conversation.memory import MemoryBackend
from guardproxy.conversation.state import ENTRY_BYTES, MARKER, Loaded, StateBackend
from guardproxy.errors import StateBackendError

__all__ = ["RedisBackend", "ResilientBackend"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_TRIM = """
local len = redis.call('STRLEN', KEYS[1])
if len <= tonumber(ARGV[1]) then return len end
local keep = tonumber(ARGV[2])
local tail = redis.call('GETRANGE', KEYS[1], len - keep, -1)
redis.call('SET', KEYS[1], ARGV[3] .. tail, 'KEEPTTL')
return keep + string.len(ARGV[3])
"""
# ``k:hmac`` lives this long after the last check that found this replica's fingerprint there
_SECRET_KEY_TTL = 600
# the startup check's deadline (``ResilientBackend.check_secret``): a connect timeout and a round trip, with room
_STARTUP_CHECK_SECONDS = 5.0
# the background probe's read, for a shared backend with no ``ping``: a root no conversation has
_PROBE_ROOT = bytes(16)


class RedisBackend:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "guardproxy:",
        ttl_seconds: int = 24 * 3600,
        max_record_bytes: int = 8192 * ENTRY_BYTES,
        max_refused: int = 32,
        connect_timeout: float = 1.0,
        client: Any = None,
        secret_fingerprint: str | None = None,
        check_interval: float = 60.0,
    ) -> None:
        # Any: the types-redis stubs predate redis 5 (no aclose).
        # No client-side retries: the wrapper's deadline decides, and a retry loop would only hide an outage.
        self.redis: Any = client or aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=max(connect_timeout, 1.0),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.prefix = prefix.encode()
        self.ttl = ttl_seconds
        self.max_record_bytes = max_record_bytes
        self.max_refused = max_refused
        self._trim = self.redis.register_script(_TRIM)
        kwargs = getattr(getattr(self.redis, "connection_pool", None), "connection_kwargs", {})
        where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self.target = f"{where} db {kwargs.get('db', 0)}"  # for messages: never the password
        self._password = kwargs.get("password") or ""
        self._fingerprint = secret_fingerprint.encode() if secret_fingerprint else None
        self.check_interval = check_interval
        self._next_check = 0.0
        self._checked = False
        # the fingerprint under the prefix is another secret's (as of the last check)
        self.secret_mismatch = False

    def _ckey(self, root: bytes) -> bytes:
        return self.prefix + b"c:" + root.hex().encode()

    def _tkey(self, tenant: bytes) -> bytes:
        return self.prefix + b"t:" + tenant.hex().encode()

    def _skey(self, root: bytes) -> bytes:
        return self.prefix + b"s:" + root.hex().encode()

    def _reason(self, exc: BaseException) -> str:
        """What went wrong, on one line: the exception's class and message (Redis's own words: "DB index is out of
        range", "Connection refused"), the password cut out should it ever appear."""
        text = " ".join(str(exc).split())
        if self._password:
            text = text.replace(self._password, "***")
        text = text[:300]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    async def _run(self, what: str, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StateBackendError(f"redis {what} failed at {self.target}: {self._reason(exc)}") from exc

    def _skkey(self) -> bytes:
        return self.prefix + b"k:hmac"

    def _add_secret_check(self, pipe: Any) -> None:
        """Queue the fingerprint check on ``pipe``: claim the key when absent, read it, and refresh it when the
        last check found this replica's fingerprint there (a key refreshed every minute never lapses while its
        replicas run, so it is ours still). The read's result is the pipeline's last but (when refreshed) one."""
        assert self._fingerprint is not None
        key = self._skkey()
        pipe.set(key, self._fingerprint, nx=True, ex=_SECRET_KEY_TTL)
        pipe.get(key)
        if self._checked and not self.secret_mismatch:
            pipe.expire(key, _SECRET_KEY_TTL)

    def _secret_checked(self, held: bytes | None) -> bool:
        """Note what the check read (``held``: the fingerprint under the prefix) and log what changed: the first
        check (INFO, naming the server and prefix to compare across replicas), a mismatch (ERROR, once until the
        two agree again), agreement after one. True when the fingerprint is this replica's."""
        ours = held is None or bytes(held) == self._fingerprint
        self._next_check = time.monotonic() + self.check_interval
        prefix = self.prefix.decode(errors="replace")
        if not self._checked:
            self._checked = True
            logger.info("conversation state shared through redis %s under prefix %r", self.target, prefix)
        if not ours and not self.secret_mismatch:
            logger.error(
                "replicas sharing this Redis prefix use different state.hmac_secret values: redis %s prefix %r holds "
                "another secret's fingerprint, so a conversation that moves between them reads forged; give every "
                "replica the same GUARDPROXY_STATE__HMAC_SECRET (during a secret rotation this lasts until the "
                "replicas on the old one are gone)",
                self.target,
                prefix,
            )
        elif ours and self.secret_mismatch:
            logger.warning("state.hmac_secret: redis prefix %r holds this replica's fingerprint again", prefix)
        self.secret_mismatch = not ours
        return ours

    async def check_secret(self) -> bool:
        """Check the secret's fingerprint now (``load`` does once a minute, in its own round trip): True when the
        key under the prefix holds this replica's, or when this backend was given no fingerprint to check. Raises
        ``StateBackendError`` when Redis fails."""
        if self._fingerprint is None:
            return True
        pipe = self.redis.pipeline(transaction=False)
        self._add_secret_check(pipe)
        claimed, held, *_ = await self._run("secret check", pipe.execute())
        ours = self._secret_checked(held)
        if ours and not claimed:
            await self._run("secret check", self.redis.expire(self._skkey(), _SECRET_KEY_TTL))
        return ours

    async def ping(self) -> None:
        """One round trip to tell whether Redis answers (``ResilientBackend``'s background probe while it is down):
        the secret's fingerprint check when one is due (as a read would run it), else a PING. Raises
        ``StateBackendError`` when Redis fails."""
        if self._fingerprint is not None and time.monotonic() >= self._next_check:
            await self.check_secret()
        else:
            await self._run("ping", self.redis.ping())

    async def load(self, root: bytes, tenant: bytes, *, tail_entries: int) -> Loaded:
        ck, tk, sk = self._ckey(root), self._tkey(tenant), self._skey(root)
        pipe = self.redis.pipeline(transaction=False)
        pipe.getrange(ck, -tail_entries * ENTRY_BYTES, -1)
        pipe.getrange(ck, 0, ENTRY_BYTES - 1)
        pipe.strlen(ck)
        pipe.lrange(tk, 0, -1)
        pipe.get(sk)
        pipe.expire(ck, self.ttl)
        pipe.expire(tk, self.ttl)
        pipe.expire(sk, self.ttl)
        check = self._fingerprint is not None and time.monotonic() >= self._next_check
        if check:  # in the same round trip: the check costs a request nothing
            self._add_secret_check(pipe)
        tail, head, length, refused, states, _, _, _, *checked = await self._run("load", pipe.execute())
        if check:
            self._secret_checked(checked[1])
        return Loaded(
            record=bytes(tail),
            complete=len(tail) >= int(length),
            truncated=bytes(head) == MARKER,
            refused=tuple(bytes(b) for b in refused),
            turn_states=(bytes(states),) if states else (),
        )

    async def load_record(self, root: bytes) -> Loaded:
        data = await self._run("load", self.redis.get(self._ckey(root)))
        record = bytes(data or b"")
        return Loaded(record=record, complete=True, truncated=record[:ENTRY_BYTES] == MARKER)

    async def append(self, root: bytes, entry: bytes, turn_states: bytes | None = None) -> bool:
        ck = self._ckey(root)
        pipe = self.redis.pipeline(transaction=False)
        pipe.append(ck, entry)
        pipe.expire(ck, self.ttl)
        if turn_states is not None:
            pipe.set(self._skey(root), turn_states, ex=self.ttl)
        length, *_ = await self._run("append", pipe.execute())
        if int(length) > self.max_record_bytes:
            keep = (self.max_record_bytes // 2) // ENTRY_BYTES * ENTRY_BYTES
            await self._run("trim", self._trim(keys=[ck], args=[self.max_record_bytes, keep, MARKER]))
        return True

    async def add_refused(self, tenant: bytes, blob: bytes) -> bool:
        tk = self._tkey(tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(tk, blob)
        pipe.ltrim(tk, 0, self.max_refused - 1)
        pipe.expire(tk, self.ttl)
        await self._run("add_refused", pipe.execute())
        return True

    async def drop_all(self) -> int:
        """Delete this backend's keys (a bench run's own, say) and return how many there were: its four kinds
        under its prefix only, so a longer prefix that starts with this one keeps its keys. The prefix is matched
        as a glob: keep ``*?[`` out of it."""

        async def drop() -> int:
            keys = [k async for k in self.redis.scan_iter(match=self.prefix + b"[ckst]:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await self.redis.delete(*keys[i : i + 1000])
            return len(keys)

        return await self._run("drop_all", drop())

    async def aclose(self) -> None:
        await self.redis.aclose()


class _MetricsLike(Protocol):
    def counter(self, name: str, doc: str, labels: Any = ()) -> Counter: ...

    def gauge(self, name: str, doc: str, labels: Any = ()) -> Gauge: ...


class ResilientBackend:
    """A shared backend with a deadline and a local fallback (see the module docstring).

    Every call that fails or misses the deadline is answered locally and counted. After ``down_after``
    consecutive failures the shared backend counts as down (logged once): calls skip it, one call per
    ``retry_interval`` probes it. Writes answered locally are kept (up to ``backlog``) and replayed to the shared
    backend once it answers again, so the other replicas learn what this one relayed during the outage.

    From the first fallback until the shared backend answers again and the backlog is replayed, one background task
    (``_probe_loop``) does the same with no request needed: it probes once per ``retry_interval`` while down (the
    primary's ``ping`` where it has one), marks the backend up and starts the replay, exactly as a request that
    finds it back would. It logs nothing of its own, and stops then, or on ``aclose``.
    """

    def __init__(
        self,
        primary: StateBackend,
        local: MemoryBackend,
        *,
        timeout: float,
        retry_interval: float = 1.0,
        down_after: int = 3,
        backlog: int = 10_000,
        metrics: _MetricsLike | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary = primary
        self.local = local
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.down_after = down_after
        self._clock = clock
        self._failures = 0
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._backlog: deque[tuple[str, bytes, bytes]] = deque(maxlen=backlog)
        self._flush_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        doc = "state backend calls answered from local state (shared backend down or slow), by operation"
        up_doc = "1 while the shared state backend answers, 0 while local state stands in"
        mismatch_doc = "1 while the shared state's prefix holds another replica's state.hmac_secret fingerprint"
        backlog_doc = "writes answered from local state during a shared backend outage, waiting to be replayed to it"
        reg = registry if registry is not None else CollectorRegistry()
        if metrics is not None:
            self.fallbacks = metrics.counter("guardproxy_state_fallbacks", doc, ["op"])
            self.up = metrics.gauge("guardproxy_state_backend_up", up_doc)
            self.secrets_differ = metrics.gauge("guardproxy_state_secret_mismatch", mismatch_doc)
            self.backlog_size = metrics.gauge("guardproxy_state_backlog", backlog_doc)
        else:
            self.fallbacks = Counter("guardproxy_state_fallbacks", doc, ["op"], registry=reg)
            self.up = Gauge("guardproxy_state_backend_up", up_doc, registry=reg)
            self.secrets_differ = Gauge("guardproxy_state_secret_mismatch", mismatch_doc, registry=reg)
            self.backlog_size = Gauge("guardproxy_state_backlog", backlog_doc, registry=reg)
        self.up.set(1)
        for op in ("load", "append", "add_refused"):
            self.fallbacks.labels(op)  # exported at 0 from the start: rate() and absent() alerts work at once
        # read at scrape time from the primary's last check (RedisBackend.check_secret); 0 where it checks none
        self.secrets_differ.set_function(lambda: float(getattr(primary, "secret_mismatch", False)))
        self.backlog_size.set_function(lambda: float(len(self._backlog)))

    @property
    def down(self) -> bool:
        return self._down_since is not None

    async def check_secret(self) -> bool | None:
        """Check the shared backend's secret fingerprint now, without waiting for the first read (``guardproxy
        serve`` does at startup): True when it is this replica's (claimed if absent), False when another secret's
        (the primary logs the ERROR line; ``guardproxy_state_secret_mismatch`` reads 1), None when the backend did
        not answer within ``_STARTUP_CHECK_SECONDS`` (a WARNING here; the first read checks again). Never raises for a
        backend failure, and does not count one: requests have not started."""
        check = getattr(self.primary, "check_secret", None)
        if check is None:
            return None
        try:
            return bool(await asyncio.wait_for(check(), _STARTUP_CHECK_SECONDS))
        except (StateBackendError, TimeoutError) as exc:
            reason = f"timed out after {_STARTUP_CHECK_SECONDS:g} s" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning(
                "state.hmac_secret not checked at startup (%s); the first request's state read checks it", reason
            )
            return None

    def _timed_out(self, op: str) -> str:
        target = getattr(self.primary, "target", None)
        return f"{op} timed out after {self.timeout:g} s" + (f" at {target}" if target else "")

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    async def _try(self, op: str, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        now = self._clock()
        if self._down_since is not None and now < self._next_probe:
            self.fallbacks.labels(op).inc()
            self._start_probe()
            return False, None
        self._next_probe = now + self.retry_interval  # one probe at a time while down
        try:
            result = await asyncio.wait_for(call(), self.timeout)
        except (StateBackendError, TimeoutError) as exc:
            self._failures += 1
            if self._down_since is None and self._failures >= self.down_after:
                self._down_since = now
                self.up.set(0)
                logger.warning(
                    "conversation state backend unavailable (%s); using local state until it answers again",
                    self._timed_out(op) if isinstance(exc, TimeoutError) else exc,
                )
            self.fallbacks.labels(op).inc()
            self._start_probe()
            return False, None
        self._answered(now)
        return True, result

    def _answered(self, now: float) -> None:
        """The shared backend answered (a request's call or the background probe, begun at ``now``): up again
        (the recovery line, once per outage), and the backlog's replay started unless it runs already."""
        self._failures = 0
        if self._down_since is not None:
            logger.warning("conversation state backend answers again after %.1f s", now - self._down_since)
            self._down_since = None
            self.up.set(1)
        self._replay()

    def _replay(self) -> None:
        """Start replaying the backlog, unless it is empty or a replay runs already (never two)."""
        if self._backlog and not self._closed and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.create_task(self._flush())

    def _start_probe(self) -> None:
        """After a fallback: the background probe, unless it runs already (never two) or the backend is closed."""
        if self._closed or (self._probe_task is not None and not self._probe_task.done()):
            return
        self._probe_task = asyncio.create_task(self._probe_loop(), name="guardproxy-state-probe")

    async def _probe(self) -> bool:
        """One probe of the shared backend, bounded by ``timeout``: True when it answered. Never raises (but for
        cancellation) and logs nothing above DEBUG: the outage's WARNING and recovery lines say it all."""
        ping = getattr(self.primary, "ping", None)
        try:
            if ping is not None:
                await asyncio.wait_for(ping(), self.timeout)
            else:  # any StateBackend: a read of a record no conversation has
                await asyncio.wait_for(self.primary.load_record(_PROBE_ROOT), self.timeout)
        except (StateBackendError, TimeoutError, RedisError, OSError):
            return False
        except Exception:  # a bug, not an outage: the probe goes on
            logger.debug("state backend probe failed unexpectedly", exc_info=True)
            return False
        return True

    async def _probe_loop(self) -> None:
        """While the shared backend is down or writes wait for it: probe it once per ``retry_interval`` (a request
        that probed meanwhile counts, and a failed probe here holds the requests' probes off as theirs do), mark it
        up when it answers, replay the backlog; return once it is up and nothing waits. Between probes it only
        sleeps: the event loop never waits on it."""
        wait = self.retry_interval
        while not self._closed:
            await asyncio.sleep(wait)
            wait = self.retry_interval
            if self._down_since is not None:
                started = self._clock()
                left = self._next_probe - started
                if left > 0:  # a request probed less than retry_interval ago: the next probe is due then
                    wait = min(max(left, 0.05), self.retry_interval)
                    continue
                # requests are not held off while this probe is out (a request's own probe may run beside it),
                # only after it failed, as after a request's failed probe
                if not await self._probe():
                    self._next_probe = max(self._next_probe, started + self.retry_interval)
                    continue
                if self._closed:
                    return
                self._answered(started)  # a request may have found it back meanwhile: then this is a no-op
            elif not self._backlog:
                return
            else:  # up, writes waiting (fewer failures than down_after, or a replay stopped at one): replay
                self._replay()
            flush = self._flush_task
            if flush is not None and not flush.done():
                await asyncio.wait({flush})  # cancelling this task leaves the replay to aclose
            if self._down_since is None and not self._backlog:
                return

    async def _flush(self) -> None:
        """Replay the writes answered locally during an outage; stop at the first failure (the rest waits)."""
        while self._backlog:
            kind, key, payload = self._backlog[0]
            call = self.primary.append if kind == "append" else self.primary.add_refused
            try:
                await asyncio.wait_for(call(key, payload), self.timeout * 4)
            except (StateBackendError, TimeoutError):
                return
            self._backlog.popleft()

    async def load(self, root: bytes, tenant: bytes, *, tail_entries: int) -> Loaded:
        ok, shared = await self._try("load", lambda: self.primary.load(root, tenant, tail_entries=tail_entries))
        local = await self.local.load(root, tenant, tail_entries=tail_entries)
        if not ok or shared is None:
            return Loaded(
                local.record, local.complete, local.truncated, local.refused, True, turn_states=local.turn_states
            )
        if not local.record and not local.refused:
            return shared
        # Entries written locally during an outage are newer than what the shared backend holds.
        return Loaded(
            record=shared.record + local.record,
            complete=shared.complete and local.complete,
            truncated=shared.truncated,
            refused=local.refused + shared.refused,
            turn_states=local.turn_states + shared.turn_states,
        )

    async def load_record(self, root: bytes) -> Loaded:
        ok, shared = await self._try("load", lambda: self.primary.load_record(root))
        local = await self.local.load_record(root)
        if not ok or shared is None:
            return Loaded(local.record, True, local.truncated, degraded=True)
        return Loaded(shared.record + local.record, True, shared.truncated)

    async def append(self, root: bytes, entry: bytes, turn_states: bytes | None = None) -> bool:
        ok, _ = await self._try("append", lambda: self.primary.append(root, entry, turn_states))
        if not ok:
            # the turn states are kept locally but not replayed: they only spare a window pass
            self.local.append_now(root, entry, turn_states)
            self._backlog.append(("append", root, entry))
        return ok

    async def add_refused(self, tenant: bytes, blob: bytes) -> bool:
        ok, _ = await self._try("add_refused", lambda: self.primary.add_refused(tenant, blob))
        if not ok:
            await self.local.add_refused(tenant, blob)
            self._backlog.append(("add_refused", tenant, blob))
        return ok

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._probe_task, self._flush_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await asyncio.wait_for(self.primary.aclose(), self.timeout * 10)
        except (StateBackendError, TimeoutError, RedisError, OSError):
            logger.warning("conversation state backend did not close cleanly")
        await self.local.aclose()
