"""Redaction of drill text before anything is written.

Always: the request's own keys, exactly, wherever they appear (``DrillRecord.secrets``: whatever their shape), then
API keys and bearer tokens by shape (``guardproxy.logs.redact`` plus the common provider key shapes, runs of exactly
32 hex digits, AWS secret keys, PEM private key blocks, URL passwords and passwords written out in prose).
By setting (``settings.drills.redact_patterns``): ``email``, ``phone``, ``card`` (digit runs that pass
the Luhn check, so order numbers and maths stay readable), and any other entry as a regular expression.
With ``hash_only`` every text is replaced by ``sha256:<hex>`` of its (key-redacted) text: reviewers
then see only which drills repeat, and the store holds nothing readable. Texts longer than ``max_chars``
keep their head and tail.

Redaction runs in the store's writer thread (it is regex work over whole conversations), never on the
request path; what sits in the bounded queue in memory is the only unredacted copy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from guardproxy.drills.record import DrillRecord
from guardproxy.errors import ConfigError
from guardproxy.logs import redact as redact_credentials

# Provider key shapes the log filter does not cover (AWS, GitHub, Slack, Google, Anthropic-style, JWTs), and two that
# only drill text gets: the log lines' own request ids share the first one's shape.
_KEY_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)\b(?:sk|pk|rk)[-_](?:live|test|proj|ant)[-_][A-Za-z0-9_-]{8,}"),
]
# A run of exactly 32 hex digits with letters and digits in it (Azure's keys; many other providers' too). Digests
# of other lengths (sha1 and git's 40, sha256's 64) are left alone; an md5 digest or a dashless uuid in a prompt is
# cut with the keys: indistinguishable from them, and cheap to lose for a reviewer.
_HEX32 = re.compile(r"(?<![\w-])(?=[0-9a-fA-F]{0,31}[a-fA-F])(?=[0-9a-fA-F]{0,31}[0-9])[0-9a-fA-F]{32}(?![\w-])")
# An AWS secret access key: exactly 40 base64 characters, mixing upper case, lower case and a digit, "/" or "+"
# (a 40-digit git hash is lower case only).
_AWS_SECRET = re.compile(
    r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[0-9/+])"
    r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
)
# "my password is Hunter2!": prose, not an assignment (the log filter covers "password: ..."); the value must hold a
# digit or a symbol, so "the password is incorrect" stays readable.
_PASSWORD_PROSE = re.compile(
    r"(?i)\b((?:password|passwd|passphrase|pin)\s+(?:is|was)\s+[\"']?)(?=[^\s\"']*[^A-Za-z\s\"'.,;:!?])[^\s\"']{4,}"
)
_STRUCTURE_KEYS = frozenset({"role", "type"})
# Bounded and anchored at the start of a run: an unbounded local part backtracks quadratically on long text.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}"
)
# International or grouped national numbers: +44 20 7946 0958, (555) 123-4567, 555-123-4567.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?!\w)")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_sub(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else match.group(0)


def _phone_sub(match: re.Match[str]) -> str:
    # a phone-shaped slice of a longer digit-group run (an order or account number) is not a phone number
    text, start, end = match.string, match.start(), match.end()
    if re.match(r"[ .-]?\d", text[end : end + 2]) or re.search(r"\d[ .-]?$", text[max(0, start - 2) : start]):
        return match.group(0)
    return "[PHONE]"


def clip(text: str, limit: int) -> str:
    """Keep the head and the tail of an overlong text (after redaction, so no key is cut in half unredacted):
    the harmful ask often sits at the end of a long jailbreak wrapper."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def redact_keys(text: str, secrets: Iterable[str] = ()) -> str:
    """Cut the known ``secrets`` exactly, then every key shape (``guardproxy.logs.redact`` and this module's)."""
    text = redact_credentials(text, secrets)
    for pattern in _KEY_PATTERNS:
        text = pattern.sub("[REDACTED]", text)
    return text


def redact_text_keys(text: str, secrets: Iterable[str] = ()) -> str:
    """``redact_keys``, and the shapes that only free text gets (32 hex digits, AWS secrets, passwords in prose):
    never applied to the request id, which may be the gateway's own 32 hex digits."""
    text = _PASSWORD_PROSE.sub(lambda m: m.group(1) + "[REDACTED]", redact_keys(text, secrets))
    return _AWS_SECRET.sub("[REDACTED]", _HEX32.sub("[REDACTED]", text))


class Redactor:
    """Applies the configured redaction to every string of a drill."""

    def __init__(
        self,
        patterns: Iterable[str] = ("email", "phone", "card"),
        *,
        hash_only: bool = False,
        max_chars: int = 64 * 1024,
    ) -> None:
        self.hash_only = hash_only
        self.max_chars = max_chars
        self._steps: list[Callable[[str], str]] = []
        for name in patterns:
            if name == "email":
                self._steps.append(lambda t: _EMAIL.sub("[EMAIL]", t))
            elif name == "card":
                # cards before phones: a spaced card number would otherwise read as a phone number
                self._steps.insert(0, lambda t: _CARD.sub(_card_sub, t))
            elif name == "phone":
                self._steps.append(lambda t: _PHONE.sub(_phone_sub, t))
            else:
                try:
                    compiled = re.compile(name)
                except re.error as exc:
                    raise ConfigError(f"drills.redact_patterns: bad regular expression {name!r}: {exc}") from exc
                self._steps.append(functools.partial(compiled.sub, "[REDACTED]"))

    def text(self, text: str, secrets: Iterable[str] = ()) -> str:
        """``text`` redacted: the known ``secrets`` (the request's own keys) cut exactly, then every key shape,
        then the configured patterns (or the whole text hashed)."""
        text = redact_text_keys(text, secrets)
        if self.hash_only:
            return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        for step in self._steps:
            text = step(text)
        return clip(text, self.max_chars)

    def value(self, value: Any, secrets: Iterable[str] = ()) -> Any:
        """Redact every string inside a JSON-like value (message dicts, content parts, tool calls)."""
        if isinstance(value, str):
            return self.text(value, secrets)
        if isinstance(value, Mapping):
            # roles and part types are structure, not content: keep them readable even in hash-only mode
            return {
                k: v if k in _STRUCTURE_KEYS and isinstance(v, str) else self.value(v, secrets)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v, secrets) for v in value]
        return value

    def record(self, record: DrillRecord) -> DrillRecord:
        """The record as it may be stored: every text redacted, and the request's keys (``record.secrets``), which
        were only carried here to be cut out, dropped."""
        secrets = record.secrets
        messages = tuple(self.value(m, secrets) for m in record.messages)
        return dataclasses.replace(
            record,
            messages=messages,
            replies=tuple(self.text(r, secrets) for r in record.replies),
            request_id=redact_keys(record.request_id, secrets),
            model=redact_keys(record.model, secrets) if record.model else record.model,
            family=redact_keys(record.family, secrets) if record.family else record.family,
            hashed=self.hash_only,
            secrets=(),
        )
