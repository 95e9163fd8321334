"""Logging helpers: a redaction filter so credentials never reach a log line, and the gateway's log level."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime

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
    ``message``, and ``exc`` when the record carries a traceback. The redaction filter runs before it, on the handler,
    so what it formats is already cut."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
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
