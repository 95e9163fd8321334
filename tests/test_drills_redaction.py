"""Redaction before anything is written: credentials always, PII by setting, hashes on request."""

from __future__ import annotations

import pytest

from guardproxy.drills.record import DrillRecord
from guardproxy.drills.redaction import Redactor, luhn_ok
from guardproxy.errors import ConfigError

CANARY = "sk-canary-7f3a9c1e5b2d4f60a8e1"


@pytest.mark.parametrize(
    ("text", "gone", "kept"),
    [
        (f"my key is {CANARY} ok", CANARY, "my key is"),
        ("Authorization: Bearer abcdef123456789xyz", "abcdef123456789xyz", "Authorization"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "aws"),
        ("token ghp_0123456789abcdefghijABCDEFGHIJ", "ghp_0123456789abcdefghij", "token"),
        ("write to jane.doe+x@example.co.uk please", "jane.doe", "please"),
        ("call me on +44 20 7946 0958 tonight", "7946 0958", "tonight"),
        ("or (555) 123-4567", "123-4567", "or"),
        ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111", "exp 12/29"),
        ("card 4111-1111-1111-1111", "4111-1111-1111-1111", "card"),
    ],
)
def test_redacts(text: str, gone: str, kept: str) -> None:
    out = Redactor().text(text)
    assert gone not in out
    assert kept in out


@pytest.mark.parametrize(
    "text",
    [
        "order number 4111 1111 1111 1112 is late",  # fails Luhn: not a card
        "What is 12345 * 67890?",
        "Janet has 3 apples and buys 14 more.",
        "the year 2024 and 1999",
    ],
)
def test_leaves_ordinary_numbers(text: str) -> None:
    assert Redactor().text(text) == text


def test_pii_only_by_setting_but_keys_always() -> None:
    r = Redactor(patterns=[])
    out = r.text(f"mail a@b.com key {CANARY}")
    assert "a@b.com" in out and CANARY not in out


def test_custom_pattern_and_bad_pattern() -> None:
    r = Redactor(patterns=[r"ACCT-\d{6}"])
    assert r.text("account ACCT-123456 closed") == "account [REDACTED] closed"
    with pytest.raises(ConfigError, match="regular expression"):
        Redactor(patterns=["(unclosed"])


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("5500005555555559")
    assert not luhn_ok("4111111111111112")


def test_record_every_string_and_hash_only() -> None:
    record = DrillRecord(
        request_id=f"id-{CANARY}",
        tenant="t",
        messages=(
            {"role": "system", "content": f"key {CANARY}"},
            {"role": "user", "content": [{"type": "text", "text": f"use {CANARY}"}]},
            {"role": "assistant", "tool_calls": [{"function": {"arguments": f'{{"k": "{CANARY}"}}'}}]},
        ),
        replies=(f"here: {CANARY}",),
    )
    plain = Redactor().record(record)
    assert CANARY not in repr(plain)
    hashed = Redactor(hash_only=True).record(record)
    assert CANARY not in repr(hashed) and hashed.hashed
    assert hashed.messages[1]["role"] == "user" and hashed.messages[1]["content"][0]["type"] == "text"
    assert hashed.replies[0].startswith("sha256:") and len(hashed.replies[0]) == 7 + 64
