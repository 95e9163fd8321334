"""Scoring JSONL rows with the guard model and a policy: the engine of ``guardproxy score`` and ``guardproxy eval``.

Three row kinds, told apart by their fields (the formats of ``../shared/data``):

- ``{"id", "prompt"}``: a prompt row → ``{"id", "kind": "prompt", "harm", "action", ...}``;
- ``{"id", "prompt", "response"}``: a response row → ``{"id", "kind": "response", "harm", "refusal",
  "false_refusal", "reply_harm", ...}`` (``harm`` is the prompt's);
- ``{"id", "messages"}``: a conversation row → ``{"id", "kind": "conversation", "turns": [{"index", "harm",
  "escalation", "action"}], "flagged", "first_flag_index"}``, one turn per user message, ``index`` its position
  in ``messages``.

Conversation rows are replayed turn by turn through the conversation tracker
(``guardproxy.conversation.ConversationTracker.replay``), as the gateway would have seen them: at user turn k the
request is every message up to k, each assistant message counts as relayed. ``escalation`` and the other
conversation signals are the tracker's; the policy's ``harm`` is computed as the guard does
(``guardproxy.guard``): the maximum over the user turns since the last assistant message when the tracker vouches
for the history, over every user turn so far otherwise. The turn entry reports the turn's own harm.

Rows are scored in chunks so that a file of any size streams: the caller reads, scores and writes one chunk at
a time.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from guardproxy.classifier import OnnxClassifier
from guardproxy.conversation import ConversationTracker, MemoryBackend, TurnResult
from guardproxy.conversation.escalation import WINDOW_MAX_IDS
from guardproxy.conversation.integrity import message_text
from guardproxy.pipeline import Action
from guardproxy.policy import Policy
from guardproxy.signals import PromptScore, ReplyScore, Signals

__all__ = ["ParsedRow", "Progress", "RowScorer", "error_row", "parse_row", "read_jsonl"]

_EMPTY = np.zeros(0, dtype=np.float32)
RowKind = Literal["prompt", "response", "conversation"]


class RowError(ValueError):
    """A row that cannot be scored; the message says why (the caller adds file:line)."""


@dataclass(frozen=True)
class ParsedRow:
    line: int
    id: Any
    kind: RowKind
    prompt: str = ""
    response: str = ""
    # (index in messages, role, text) of the user and assistant messages of a conversation row
    turns: tuple[tuple[int, str, str], ...] = ()
    raw: dict[str, Any] | None = None


def read_jsonl(stream: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (1-based line number, object or the reason it is not one) per non-blank line.

    Lines split on "\\n" only: some texts of the shared data hold U+2028, which ``str.splitlines`` would split.
    """
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield number, RowError(f"not UTF-8: {exc.reason} at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            # json's own message can end in "at" ("Invalid control character at"): the column completes it once
            yield number, RowError(f"invalid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}")
            continue
        if not isinstance(obj, dict):
            yield number, RowError(f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield number, obj


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a content-part array (images etc. carry no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise RowError(f"{where}: content parts must be objects")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise RowError(f"{where}: a text part needs a string 'text'")
                texts.append(part["text"])
        return "\n".join(texts)
    raise RowError(f"{where}: content must be a string or an array of parts")


def parse_row(line: int, obj: dict[str, Any]) -> ParsedRow:
    """Validate one row and tell its kind; raises ``RowError``."""
    if "id" not in obj or not isinstance(obj["id"], str | int) or isinstance(obj["id"], bool):
        raise RowError("missing or non-scalar 'id'")
    row_id = obj["id"]
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise RowError("'messages' must be an array")
        turns = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise RowError(f"messages[{i}] must be an object with a string 'role'")
            if msg["role"] in ("user", "assistant"):
                turns.append((i, msg["role"], _content_text(msg.get("content"), f"messages[{i}]")))
        return ParsedRow(line=line, id=row_id, kind="conversation", turns=tuple(turns), raw=obj)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise RowError("needs a string 'prompt' or a 'messages' array")
    if "response" in obj:
        response = obj["response"]
        if not isinstance(response, str):
            raise RowError("'response' must be a string")
        return ParsedRow(line=line, id=row_id, kind="response", prompt=prompt, response=response, raw=obj)
    return ParsedRow(line=line, id=row_id, kind="prompt", prompt=prompt, raw=obj)


class RowScorer:
    """Scores parsed rows: prompt and response rows of a chunk in one classifier call each (sync API), conversation
    rows by replaying them through the conversation tracker (async API, on this scorer's own event loop)."""

    def __init__(self, classifier: OnnxClassifier, policy: Policy, *, window_max_ids: int = WINDOW_MAX_IDS) -> None:
        """``window_max_ids``: ids of a conversation window, as the gateway's ``guard.window_max_ids``."""
        self.classifier = classifier
        self.policy = policy
        self._tracker = ConversationTracker(
            MemoryBackend(max_records=64, max_bytes=1 << 20),
            classifier,
            hmac_secret=secrets.token_bytes(32),
            window_max_ids=window_max_ids,
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._tracker.aclose())
            self._loop.close()
            self._loop = None

    def __enter__(self) -> RowScorer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def score(self, rows: Sequence[ParsedRow]) -> list[dict[str, Any]]:
        # as the gateway reads a user turn (``turn_text``); a reply's prompt as the output check reads it: as written
        texts = [turn_text(row.prompt) for row in rows if row.kind in ("prompt", "response")]
        pairs = [(row.prompt, row.response) for row in rows if row.kind == "response"]
        prompt_scores = iter(self.classifier.score_prompts_sync(texts))
        reply_scores = iter(self.classifier.score_whole_replies_sync(pairs))  # as the gateway reads a reply
        out = []
        for row in rows:
            if row.kind == "prompt":
                out.append(self._prompt(row, next(prompt_scores)))
            elif row.kind == "response":
                out.append(self._response(row, next(prompt_scores), next(reply_scores)))
            else:
                out.append(self._conversation(row))
        return out

    def _prompt(self, row: ParsedRow, s: PromptScore) -> dict[str, Any]:
        signals = Signals(harm=s.harm, category=s.category, jailbreak=s.jailbreak, unreadable=s.unreadable)
        decision = self.policy.decide_input(signals)
        return {
            "id": row.id,
            "kind": "prompt",
            "harm": round(s.harm, 6),
            "action": decision.action.value,
            "category": s.category,
            "jailbreak": round(s.jailbreak, 6),
            "unreadable": round(s.unreadable, 4),
            "rule": decision.rule,
            "estimated": s.exited,  # early exit (score --early-exit): harm and jailbreak are the head's estimates
        }

    def _response(self, row: ParsedRow, s: PromptScore, r: ReplyScore) -> dict[str, Any]:
        signals = Signals(
            harm=s.harm,
            category=s.category,
            jailbreak=s.jailbreak,
            unreadable=s.unreadable,
            refusal=r.refusal,
            reply_harm=r.reply_harm,
        )
        decision = self.policy.decide_output(signals, final=True, may_retry=False)
        return {
            "id": row.id,
            "kind": "response",
            "harm": round(s.harm, 6),
            "refusal": r.refusal,
            "false_refusal": signals.false_refusal(self.policy.harm_threshold),
            "reply_harm": round(r.reply_harm, 6),
            "refusal_probs": [round(p, 6) for p in r.refusal_probs],
            "category": s.category,
            "action": decision.action.value,
            "rule": decision.rule,
            "estimated": s.exited,  # the prompt's harm is the early-exit head's estimate
        }

    def _replay(self, messages: list[Any]) -> list[TurnResult]:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._tracker.replay(messages))

    def _conversation(self, row: ParsedRow) -> dict[str, Any]:
        messages = list((row.raw or {}).get("messages", []))
        results = {r.index: r for r in self._replay(messages)}
        turns = []
        first_flag: int | None = None
        since_reply: list[PromptScore] = []  # user turns after the last assistant message
        so_far: list[PromptScore] = []
        for index, role, _text in row.turns:
            if role == "assistant":
                since_reply = []
                continue
            result = results.get(index)
            if result is None:
                raise RowError(f"messages[{index}]: the conversation tracker returned no result for this turn")
            score = result.prompt or PromptScore(harm=result.harm, category="none", jailbreak=0.0, embedding=_EMPTY)
            since_reply.append(score)
            so_far.append(score)
            pool = since_reply if result.signals.history == "verified" else so_far
            top = max(pool, key=lambda s: s.harm)
            signals = Signals(
                harm=top.harm,
                category=top.category,
                jailbreak=max(s.jailbreak for s in pool),
                unreadable=max(s.unreadable for s in pool),
                conversation=result.signals,
            )
            decision = self.policy.decide_input(signals)
            if decision.action is not Action.ALLOW and first_flag is None:
                first_flag = index
            turns.append(
                {
                    "index": index,
                    "harm": round(result.harm, 6),
                    "escalation": round(result.escalation, 6),
                    "action": decision.action.value,
                    "window_harm": round(result.signals.window_harm, 6),
                    "rule": decision.rule,
                    # early exit: this turn's own scores, or its window's, are the head's estimates
                    "estimated": bool(
                        (result.prompt is not None and result.prompt.exited)
                        or (result.window is not None and result.window.exited)
                    ),
                }
            )
        return {
            "id": row.id,
            "kind": "conversation",
            "turns": turns,
            "flagged": first_flag is not None,
            "first_flag_index": first_flag,
        }


def turn_text(prompt: str) -> str:
    """A prompt as the gateway scores a user turn: the conversation tracker reads it as ``integrity.message_text``
    does (whitespace and zero-width characters one space, ends stripped), not as written. The normaliser deletes the
    zero-width characters, so an ask with U+200B / U+200C / U+2060 between its words scored as run-together words
    here and as the ask it is at the gateway (red team 4, finding 7). A prompt of whitespace alone stays as it is."""
    return message_text({"role": "user", "content": prompt}) or prompt


def error_row(path: Path | str, line: int, obj: dict[str, Any] | None, message: str) -> dict[str, Any]:
    row_id = obj.get("id") if isinstance(obj, dict) else None
    return {"id": row_id, "kind": "error", "line": line, "error": f"{path}:{line}: {message}"}


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal (every 0.2 s), a plain line every 5 s otherwise
    (a log file gets readable lines, not carriage returns); silent when disabled."""

    def __init__(self, label: str, total: int | None, *, enabled: bool, stream: Any = None) -> None:
        import sys

        self.label = label
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else 5.0
        self.rows = 0
        self.done = 0
        self._started = time.monotonic()
        self._drawn = self._started

    def update(self, rows: int, amount: int) -> None:
        """``rows`` scored, ``amount`` of the total (bytes or rows) consumed."""
        self.rows += rows
        self.done += amount
        now = time.monotonic()
        if self.enabled and now - self._drawn >= self.interval:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float, end: str | None = None) -> None:
        rate = self.rows / max(now - self._started, 1e-9)
        line = f"{self.label} {self.rows} rows {rate:.0f}/s"
        if self.total:
            frac = min(1.0, self.done / self.total)
            line = f"{self.label} [{'#' * int(frac * 30):<30}] {frac:6.1%} {self.rows} rows {rate:.0f}/s"
        if self.tty:
            self.stream.write("\r" + line + (end or ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n")
