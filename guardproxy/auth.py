"""Who is calling: gateway keys (replace mode), tenant ids (pass-through mode) and per-tenant rate limits.

Replace mode (``upstream.api_key`` set): the gateway holds the upstream key, so every client must show a
gateway key; ``auth.gateway_keys`` maps tenant names to the sha256 hex of their key (keys are never
stored in clear). Pass-through mode: the client's ``Authorization`` goes upstream unchanged and the
tenant is a hash of it, so per-tenant limits and conversation state work without storing keys. Either
mode without the other half (an upstream key without gateway keys, gateway keys without an upstream
key) is a ``ConfigError``: the gateway does not start.
Keys are never logged: only the tenant name or hash leaves this module.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Mapping

from guardproxy.errors import AuthError, ConfigError, RateLimited
from guardproxy.settings import Settings

ANONYMOUS = "anonymous"


def hash_key(key: str) -> str:
    """The form a gateway key is configured in: ``sha256(key)`` as hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The client's key from ``Authorization: Bearer ...`` (or ``x-api-key``, or Azure's ``api-key``), if any."""
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("x-api-key") or headers.get("api-key") or None


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.replace_mode = settings.upstream.api_key is not None
        self._keys: list[tuple[str, bytes]] = []
        for name, hex_digest in settings.auth.gateway_keys.items():
            try:
                digest = bytes.fromhex(hex_digest.lower())
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError(f"auth.gateway_keys.{name}: expected a sha256 hex digest (64 characters)")
            self._keys.append((name, digest))
        if self.replace_mode and not self._keys:
            raise ConfigError(
                "upstream.api_key is set (replace mode) but auth.gateway_keys is empty: no client could authenticate"
            )
        if self._keys and not self.replace_mode:
            # Pass-through mode forwards the client's own key and checks none: gateway keys would be ignored
            # and every client let in, which is never what configuring them means.
            raise ConfigError(
                "auth.gateway_keys is set but upstream.api_key is not: gateway keys are checked only in replace "
                "mode; set upstream.api_key (the key the gateway sends upstream) or remove auth.gateway_keys"
            )

    def tenant(self, headers: Mapping[str, str]) -> str:
        """The tenant of this request; raises ``AuthError`` in replace mode without a valid gateway key."""
        token = bearer_token(headers)
        if not self.replace_mode:
            return "k:" + hash_key(token)[:16] if token else ANONYMOUS
        if token is None:
            raise AuthError("missing gateway API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        # Compare against every key (constant time each, no early exit) so timing says nothing.
        for name, expected in self._keys:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        if found is None:
            raise AuthError("invalid gateway API key")
        return found


class RateLimiter:
    """A token bucket per tenant: ``rate`` tokens per second, up to ``burst``.

    The table is bounded (least recently used tenants are dropped; a dropped tenant starts with a full
    bucket), because in pass-through mode a client can mint tenants by sending random keys.

    The buckets live in this process, not in the shared state: N replicas behind a load balancer let a tenant
    through at up to N times ``rate``. Divide the limit by the replica count, or enforce it at the load balancer
    (README, Operations). The drill sampling caps (``guardproxy.drills.sampling.Sampler``) are per process too.
    """

    def __init__(self, rate: float, burst: int, *, max_tenants: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_tenants = max_tenants
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, tenant: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(tenant, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, now)
            raise RateLimited(f"rate limit exceeded for this key ({self.rate:g} requests/s)",
                              retry_after=(1.0 - tokens) / self.rate)  # fmt: skip
        self._buckets[tenant] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_tenants:
            self._buckets.popitem(last=False)
