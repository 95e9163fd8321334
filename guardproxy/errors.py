"""The exception tree of guardproxy.

Every error that domain code raises derives from ``GuardProxyError``. The app maps them to
OpenAI-shaped error JSON in one place (``guardproxy.app``); domain code never builds responses.

    GuardProxyError
    ├── ConfigError              bad settings, policy or model files (CLI: one line with file and line)
    │   └── PolicyError          a policy or mapping file failed validation (every problem, file:line: field)
    ├── RequestError             the client's request is invalid (HTTP 400)
    │   ├── PayloadTooLarge      body over the limit (HTTP 413)
    │   └── HeadersTooLarge      too many or oversized headers (HTTP 431)
    ├── AuthError                missing or wrong gateway key (HTTP 401)
    ├── RateLimited              tenant over its token bucket (HTTP 429, Retry-After)
    ├── Overloaded               gateway at capacity (HTTP 503, Retry-After)
    ├── RouteNotGuarded          a generating route this gateway does not guard (HTTP 403)
    ├── Blocked                  a check blocked the request and its policy asks for an error status
    ├── UpstreamError            the upstream failed
    │   ├── UpstreamUnreachable  connect failure or reset before headers (HTTP 502)
    │   ├── UpstreamTimeout      connect, read-gap or overall deadline exceeded (HTTP 504)
    │   ├── UpstreamHTTPError    the upstream answered 4xx/5xx: passed through with its body and Retry-After
    │   └── UpstreamStreamError  a 200 stream that carried an error payload or broke mid-way
    ├── ClassifierError          the guard model failed (raised, timed out, missing)
    │   └── ClassifierBusy       saturated: timed out while other calls finished
    │       └── ClassifierPartial   timed out with some of its texts scored (their scores ride along)
    ├── StateBackendError        conversation state backend failed (Redis down or slow)
    └── StoreError               the drill store failed (queue full, disk full, database down)
"""

from __future__ import annotations

from typing import Any


class GuardProxyError(Exception):
    """Root of every error guardproxy raises on purpose."""


class ConfigError(GuardProxyError):
    """Bad settings, policy or model file. ``where`` is ``file:line`` when known."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class PolicyError(ConfigError):
    """A policy or mapping file is invalid. ``issues`` holds every problem as ``file:line: field: message``; the
    message is those lines, so the CLI prints every one (an "and N more" is a problem nobody gets to read)."""

    def __init__(self, issues: list[str], *, where: str | None = None) -> None:
        self.issues = tuple(issues) or ("invalid policy file",)
        # Each issue already names file and line; ``where`` is kept for callers that want the file.
        Exception.__init__(self, "\n".join(self.issues))
        self.where = where


class RequestError(GuardProxyError):
    """The client's request is invalid."""

    status_code = 400
    code: str | None = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class PayloadTooLarge(RequestError):
    status_code = 413
    code = "payload_too_large"


class HeadersTooLarge(RequestError):
    status_code = 431
    code = "headers_too_large"


class AuthError(GuardProxyError):
    status_code = 401


class RateLimited(GuardProxyError):
    status_code = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(GuardProxyError):
    status_code = 503

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RouteNotGuarded(GuardProxyError):
    status_code = 403


class Blocked(GuardProxyError):
    """A check blocked the exchange and asked for an error status instead of an assistant reply."""

    def __init__(self, message: str, *, status_code: int = 400, category: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.category = category


class UpstreamError(GuardProxyError):
    status_code = 502


class UpstreamUnreachable(UpstreamError):
    status_code = 502


class UpstreamTimeout(UpstreamError):
    status_code = 504


class UpstreamStreamError(UpstreamError):
    status_code = 502


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with an error status; the client gets that status, body and Retry-After."""

    def __init__(
        self, status_code: int, body: bytes, *, content_type: str = "", retry_after: str | None = None
    ) -> None:
        super().__init__(f"upstream answered HTTP {status_code}")
        self.status_code = status_code
        self.body = body
        self.content_type = content_type
        self.retry_after = retry_after


class ClassifierError(GuardProxyError):
    """The guard model raised, timed out, or could not be loaded."""


class ClassifierBusy(ClassifierError):
    """The guard model is working but saturated: this call timed out while other calls completed."""


class ClassifierPartial(ClassifierBusy):
    """A call timed out after scoring some of its texts: ``scores`` has one entry per text of the call, None for a
    text it did not reach, and for a long text whose windows it did not read, its head+tail pass's score (a lower
    bound on harm: windows only raise it). The guard acts on the scores that came back (a block they earn stands)
    and the policy's ``on_classifier_failure`` decides the rest."""

    def __init__(self, message: str, scores: list[Any]) -> None:
        super().__init__(message)
        self.scores = scores


class StateBackendError(GuardProxyError):
    """The conversation state backend failed or was too slow."""


class StoreError(GuardProxyError):
    """The drill store failed; samples are dropped and counted, requests never fail for it."""
