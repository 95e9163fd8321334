"""Logging helpers: a redaction filter so credentials never reach a log line, the gateway's log level, and the
access log's line (``AccessRecord``: one per finished request, ``server.access_log``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

REDACTED = "[REDACTED]"
# A known key shorter than this is a placeholder ("EMPTY", "none", "x": what a keyless upstream is given), not a
# secret: cutting it out of a text would mangle every word that contains it.
MIN_SECRET_CHARS = 8

# Bearer tokens, OpenAI-style keys (sk-, sk-proj-, sk-ant-), Groq (gsk_), Google (AIza), Hugging Face (hf_) and xAI
# (xai-) keys, PEM private keys (the whole block; without its END line, the base64 lines that follow), the password
# of a URL (scheme://user:PASSWORD@host), and anything that looks like a key, token, secret or password assignment.
# Keys with no telling shape (Azure's 32 hex digits) only go as known keys here: a log line's request ids are 32 hex
# digits too (the drill store also cuts that shape, ``drills.redaction``).
_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"\bgsk_[A-Za-z0-9]{16,}"),
    re.compile(r"\bAIza[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    re.compile(r"\bxai-[A-Za-z0-9]{20,}"),
    re.compile(
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY-----"
        r"(?:[\s\S]{0,16384}?-----END[A-Z0-9 ]{0,40}PRIVATE KEY-----|[A-Za-z0-9+/=\r\n]*)"
    ),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]{0,20}://[^\s:/@]{1,128}:)[^\s@/]{1,256}(?=@)"),
    re.compile(
        r"(?i)((?:api[_-]?key|authorization|x-api-key|token|secret|password|passwd)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{6,}"
    ),
]


def cut_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each known secret (a key the gateway holds or was sent) replaced by ``[REDACTED]``, exactly.

    Secrets shorter than ``MIN_SECRET_CHARS`` are left alone; longer ones go first, so a key that contains
    another is cut whole."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= MIN_SECRET_CHARS and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace credentials in ``text`` with ``[REDACTED]``: the known ``secrets`` exactly, then anything shaped
    like a key."""
    text = cut_secrets(text, secrets)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


class RedactionFilter(logging.Filter):
    """Formats the record once and redacts credentials from the final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, AccessLine):
            return True  # made of fields already cut (``AccessRecord``): not formatted twice per request
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_text is None and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Attach the redaction filter to every handler of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactionFilter) for f in handler.filters):
            handler.addFilter(RedactionFilter())


class JsonFormatter(logging.Formatter):
    """One JSON object a line (``server.log_format = "json"``): ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, and ``exc`` when the record carries a traceback; a record's ``fields`` (an access line's) each as a
    key of their own, its message then ``AccessLine.summary``. The redaction filter runs before it, on the handler, so
    what it formats is already cut."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__.get("fields")  # ``extra={"fields": {...}}``: the access log's
        msg = record.msg
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": msg.summary() if isinstance(msg, AccessLine) else record.getMessage(),
        }
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


def use_json_logs(logger: logging.Logger | None = None) -> None:
    """Format every handler of ``logger`` (the root logger by default) with ``JsonFormatter``."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(JsonFormatter())


# ``server.log_level`` names (uvicorn's, "trace" included) as logging levels.
LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}


def set_log_level(level: str) -> None:
    """Set the level of every ``guardproxy.*`` logger (``--log-level``, ``server.log_level``); uvicorn's loggers
    take it from ``uvicorn.Config``. Other libraries keep theirs: their debug lines are not ours to turn on."""
    logging.getLogger("guardproxy").setLevel(LOG_LEVELS[level.lower()])


# -- the access log ---------------------------------------------------------------------------------------------

ACCESS_LOGGER = "guardproxy.access"
access_log = logging.getLogger(ACCESS_LOGGER)
MAX_LOGGED_PATH_CHARS = 256
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
_BARE_VALUE = re.compile(r"[A-Za-z0-9._:/@+-]+")
_FALLBACK_REASON = re.compile(r"(classifier|state) (?:backend )?failed: (fail_open|fail_closed)")


def loggable_path(path: str) -> str:
    """A request path as an access line may show it: cut at a (decoded) ``?`` or ``#`` (no query ever), at most
    ``MAX_LOGGED_PATH_CHARS`` characters, and anything shaped like a key redacted."""
    if "?" in path or "#" in path:
        path = re.split(r"[?#]", path, maxsplit=1)[0]
    if len(path) > MAX_LOGGED_PATH_CHARS:
        path = path[:MAX_LOGGED_PATH_CHARS] + "..."
    return redact(path)


def loggable_method(method: str) -> str:
    """A request method as an access line may show it: one of HTTP's, or whatever else a client sent, cut short and
    redacted."""
    return method if method in _METHODS else redact(method[:32])


def fallback_of(reason: str) -> str | None:
    """``classifier_fail_open``, ``state_fail_closed``, ...: the failure fallback a verdict's reason names (the policy's
    ``on_classifier_failure`` / ``on_state_failure``, ``policy.Policy._failure``), or None when a rule decided."""
    m = _FALLBACK_REASON.fullmatch(reason)
    return f"{m.group(1)}_{m.group(2)}" if m is not None else None


def _logfmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    # anything but a plain token is one JSON string: a space, a quote or a newline in a path cannot forge a field
    return text if text != "-" and _BARE_VALUE.fullmatch(text) else json.dumps(text)


class AccessLine:
    """An access record's message, formatted only when a handler writes it: ``str()`` is the text format's
    ``key=value`` line (``-`` for a value not known, a JSON-quoted string where a value is not a plain token);
    ``JsonFormatter`` writes ``summary()`` as the message and each field as a key of its own."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={_logfmt(value)}" for key, value in self.fields.items())

    def summary(self) -> str:
        f = self.fields
        return f"{f['method']} {f['path']} {f['status']}"


@dataclass(slots=True, eq=False)
class AccessRecord:
    """One request's access line, filled in as the request goes (``app.V1Endpoint``; ``proxy.Upstream.open`` notes
    the upstream's status through ``CURRENT_ACCESS``) and written once, at its end, by ``write``.

    What it holds is what may be logged, already cut of anything shaped like a key (the redaction filter passes its
    line as it is): the method and path as ``loggable_method`` and ``loggable_path`` give them (no query), the
    request id (a client's own redacted), the tenant as ``auth.Authenticator.tenant`` names it (a configured name, or
    a hash of the key, never the key); no header, query, body or message text."""

    method: str
    path: str
    request_id: str
    tenant: str | None = None
    status: int = 0  # as sent; 0: no response started (499, the client went away, as the metrics count it)
    action: str | None = None  # the guard's: allow, flag or block, where it decided
    fallback: str | None = None  # the failure fallback that decided the action (``fallback_of``)
    outcome: str | None = None  # a guarded exchange's (``pipeline.Exchange.outcome``: ok, blocked_input, ...)
    error: str | None = None  # the code of the error the gateway answered or ended a stream with
    upstream_status: int | None = None  # the last upstream reply's, where one came
    bytes_sent: int = 0  # response body bytes handed to the server
    streamed: bool = False
    disconnected: bool = False

    def write(self, seconds: float) -> None:
        fields = {
            "method": self.method,
            "path": self.path,
            "status": self.status or 499,
            "duration_ms": round(seconds * 1000.0, 1),
            "request_id": self.request_id,
            "tenant": self.tenant,
            "action": self.action,
            "fallback": self.fallback,
            "outcome": self.outcome,
            "error": self.error,
            "upstream_status": self.upstream_status,
            "bytes_sent": self.bytes_sent,
            "streamed": self.streamed,
            "disconnected": self.disconnected,
        }
        access_log.info(AccessLine(fields), extra={"fields": fields})


# The access record of the request the running task serves; None where the access log is off.
CURRENT_ACCESS: ContextVar[AccessRecord | None] = ContextVar("guardproxy_access", default=None)


def access_log_on(setting: bool) -> bool:
    """Whether to keep an access record for a request: ``server.access_log``, and a logger that writes INFO."""
    return setting and access_log.isEnabledFor(logging.INFO)
