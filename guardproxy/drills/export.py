"""Drills as a drill set: ``prompts.jsonl``, ``responses.jsonl`` and ``conversations.jsonl`` in the
``../shared/data`` formats, which ``guardproxy eval`` scores a candidate policy and model on.

A drill whose last user turn stands alone (one user turn, no tool call or tool result) is a prompt row: that
turn is the prompt. A drill whose last user turn leans on context (an earlier user turn, or a tool call or
result in the history) is a conversation row instead, with every message (tool calls and their ids kept): a
label given in context does not hold for the turn on its own. Its response rows carry no ``prompt_label`` for
the same reason.

Review labels map to data labels by this table. The response row ``drill-<id>-reply`` holds the text the client
got: the first reply, or the policy's own text when the policy blocked (the request at the input check, or the
upstream's reply at the output check). A policy's text is a refusal by construction, so its row's ``refusal`` is
``full`` whatever the label. A policy's text delivered as an HTTP error (``[block] delivery = "error"``) reached
the client as no reply at all: no ``-reply`` row is written for it (counted as ``delivered_as_error``):

=================  ==================  ==========================================  ======================
review label       prompt ``label``    response ``refusal``                        conversation ``label``
=================  ==================  ==========================================  ======================
missed_harm        ``harmful``         ``none`` (the reply complied)               ``escalation``
correct_refusal    ``harmful``         ``full`` (``partial`` if the guard saw one) ``escalation``
false_refusal      ``benign``          ``full`` (``partial`` if the guard saw one) ``benign``
correct_answer     ``benign``          ``none``                                    ``benign``
unclear            skipped             skipped                                     skipped
(not reviewed)     ``null``            ``null``                                    ``null``
=================  ==================  ==========================================  ======================

When the policy blocked the upstream's reply at the output check, the review page asks the reviewer to judge that
reply (was it harmful to send?), not the request: the label then gives no prompt or conversation label (a harmless
question can draw a harmful answer), so a reviewed drill of that kind writes no prompt or conversation row
(counted as ``label_judges_reply``) and its response rows' ``prompt_label`` is ``null``. A second response row
``drill-<id>-upstream`` holds what the upstream wrote (on a stream, its text up to the block), which never
reached the client as written. Its labels describe that text (``reply_harm`` is only on these rows):

=================  ======================  ==================
review label       ``refusal``             ``reply_harm``
=================  ======================  ==================
missed_harm        ``none``                ``true``
correct_refusal    ``none``                ``true``
false_refusal      ``null``                ``false``
correct_answer     ``null``                ``false``
(not reviewed)     ``null``                ``null``
=================  ======================  ==================

A harmful reply the reviewer agreed must not reach the client carried out the request (harmful compliance,
as in HarmBench's labels); a harmless one the gateway should have sent is scored for reply harm only.
Where the upstream sent several choices the record does not say which were replaced, so no upstream row is
written (counted as ``upstream_of_several_choices``).

Unreviewed drills are written only without ``--reviewed``, with null labels (``guardproxy eval`` skips
unlabelled prompt and conversation rows and scores such response rows without a gold refusal). Drills stored as
hashes only have no text to export and are skipped (counted), and so is a drill whose reviewers' latest labels
differ (``StoredDrill.disputed``: no gold label until they agree). Every row keeps ``source`` (``guardproxy-drills``),
the drill id and why it was sampled, so a metric can be traced back to the review page, and ``license``, its
provenance: ``internal: reviewed live traffic`` for a reviewed drill, ``internal: live traffic, not reviewed`` for
an unreviewed one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardproxy.drills.record import DrillRecord, message_text
from guardproxy.drills.store.base import StoredDrill

SOURCE = "guardproxy-drills"
LICENSE = "internal: reviewed live traffic"
LICENSE_UNREVIEWED = "internal: live traffic, not reviewed"


@dataclass(frozen=True)
class DataLabels:
    prompt: str
    refusal: str | None  # None: take full/partial from the guard's refusal class
    conversation: str
    upstream_refusal: str | None = None  # the upstream's blocked reply: None is no gold refusal
    upstream_harm: bool = False  # the upstream's blocked reply was harmful compliance (``reply_harm``)


LABEL_MAP: Mapping[str, DataLabels | None] = {
    "missed_harm": DataLabels("harmful", "none", "escalation", "none", True),
    "correct_refusal": DataLabels("harmful", None, "escalation", "none", True),
    "false_refusal": DataLabels("benign", None, "benign", None, False),
    "correct_answer": DataLabels("benign", "none", "benign", None, False),
    "unclear": None,
}


@dataclass(frozen=True)
class ExportRows:
    prompts: list[dict[str, Any]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    conversations: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def _refusal(record: DrillRecord, fixed: str | None) -> str:
    if fixed is not None:
        return fixed
    return "partial" if record.refusal == "partial" else "full"


def _common(drill: StoredDrill) -> dict[str, Any]:
    r = drill.record
    label = drill.label
    return {
        "source": SOURCE,
        "license": LICENSE if label is not None else LICENSE_UNREVIEWED,
        "drill_id": r.id,
        "created": r.created,
        "review_label": label.label if label else None,
        "review_note": label.note if label and label.note else None,
        "sampled_because": list(r.reasons),
        "active_policy": f"{r.active.policy}@{r.active.version}",
        "active_action": r.active.action,
        "active_rule": r.active.rule,
        # what each stage decided (input, then output): a rule the other stage's did not outrank shows here only;
        # [] for a drill recorded before stages were kept
        "active_stages": [s.as_dict() for s in r.active.stages],
        "history": r.history,  # verified | unverified | forged | none; null: not recorded
        # a refused request and the rewordings the guard matched to it: split a drill set by it, so one probe's
        # wordings never sit on both sides of a train/dev split
        "family": r.family,
    }


def judges_reply(record: DrillRecord) -> bool:
    """Whether a review label on this drill judges the upstream's reply rather than the request: the active policy
    blocked the reply at the output check (the review page's ``OUTPUT_BLOCK_NOTE``)."""
    return not record.reply_from_policy and record.active.action == "block"


def in_context(record: DrillRecord) -> bool:
    """Whether the last user turn leans on context: an earlier user turn, or a tool call or result before it."""
    users = 0
    for m in record.messages:
        role = m.get("role")
        if role in ("tool", "function") or (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            return True
        users += role == "user"
    return users >= 2


def build_rows(drills: Iterable[StoredDrill], *, reviewed_only: bool = False) -> ExportRows:
    out = ExportRows()
    for drill in drills:
        r = drill.record
        label = drill.label.label if drill.label else None
        if label is None and reviewed_only:
            out.skipped["not_reviewed"] += 1
            continue
        if drill.disputed:  # no gold label until the reviewers agree (a later label by either settles it)
            out.skipped["reviewers_disagree"] += 1
            continue
        if label is not None and LABEL_MAP.get(label) is None:
            out.skipped[label] += 1
            continue
        if r.hashed:
            out.skipped["hash_only"] += 1
            continue
        prompt = r.last_user_text()
        if not prompt:
            out.skipped["no_user_text"] += 1
            continue
        data = LABEL_MAP[label] if label is not None else None
        common = _common(drill)
        context = in_context(r)
        # the labels of the request (prompt or conversation): none where the label judged the upstream's reply
        request_data = None if judges_reply(r) else data
        if data is not None and request_data is None:
            out.skipped["label_judges_reply"] += 1
        elif context:
            out.conversations.append(
                {
                    "id": f"drill-{r.id}-conversation",
                    "messages": _messages(r.messages),
                    "label": request_data.conversation if request_data else None,
                    **common,
                }
            )
        else:
            out.prompts.append(
                {
                    "id": f"drill-{r.id}",
                    "prompt": prompt,
                    "label": request_data.prompt if request_data else None,
                    "category": r.category if r.category != "none" else None,
                    **common,
                }
            )
        prompt_label = None if context or request_data is None else request_data.prompt
        out.responses.extend(_responses(r, prompt, prompt_label, data, common, out.skipped))
    return out


def _responses(
    r: DrillRecord,
    prompt: str,
    prompt_label: str | None,
    data: DataLabels | None,
    common: Mapping[str, Any],
    skipped: Counter[str],
) -> list[dict[str, Any]]:
    """The response rows of one drill: what the client got, and what the upstream wrote if the policy blocked it."""

    def row(kind: str, response: str, refusal: str | None, model: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": f"drill-{r.id}-{kind}",
            "prompt": prompt,
            "response": response,
            "prompt_label": prompt_label,
            "refusal": refusal,
            **extra,
            "model": model,
            **common,
        }

    rows: list[dict[str, Any]] = []
    upstream_model = r.model or "unknown"
    blocked_upstream = not r.reply_from_policy and r.active.action == "block"
    relayed = int(r.signals.get("relayed_chars", 0)) if blocked_upstream else 0
    if relayed and r.reply_replaced and len(r.upstream_replies) == 1:
        # a stream blocked mid-way: the client got the start of the upstream's reply, then the policy's text; no
        # refusal class fits that whole, so it goes unlabelled for refusal
        policy_model = f"{upstream_model}+guardproxy-policy:{r.active.policy}"
        text = r.upstream_replies[0][:relayed] + r.replies[-1]
        rows.append(row("reply", text, None, policy_model, relayed_chars=relayed))
    elif (r.reply_from_policy or r.reply_replaced) and r.delivered_status:
        skipped["delivered_as_error"] += 1  # the client got an HTTP error, not a reply to score
    elif r.reply_from_policy or r.reply_replaced:
        # the policy's own text, which the client got: a refusal whatever the label
        policy_model = f"guardproxy-policy:{r.active.policy}"
        rows.append(row("reply", r.replies[-1], "full" if data else None, policy_model))
    elif r.replies and not blocked_upstream:
        rows.append(row("reply", r.replies[0], _refusal(r, data.refusal) if data else None, upstream_model))
    upstream = r.upstream_replies if blocked_upstream else ()
    if len(upstream) > 1:
        skipped["upstream_of_several_choices"] += 1
    elif upstream:
        # what the upstream wrote and the client never got as written: labelled as that text
        refusal, harm = (data.upstream_refusal, data.upstream_harm) if data else (None, None)
        rows.append(row("upstream", upstream[0], refusal, upstream_model, reply_harm=harm, relayed_chars=relayed))
    return rows


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation's messages as text, with an assistant's tool calls and a tool result's call id kept."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            continue
        row: dict[str, Any] = {"role": str(m.get("role")), "content": message_text(m)}
        for key in ("tool_calls", "tool_call_id"):
            if m.get(key):
                row[key] = m[key]
        out.append(row)
    return out


def write_rows(rows: ExportRows, out_dir: Path) -> dict[str, int]:
    """Write the three files (each always present, possibly empty); returns rows per file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, items in (
        ("prompts.jsonl", rows.prompts),
        ("responses.jsonl", rows.responses),
        ("conversations.jsonl", rows.conversations),
    ):
        tmp = out_dir / f".{name}.tmp"
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            for item in items:
                # ensure_ascii keeps U+2028 and friends escaped: readers split lines on "\n" only
                f.write(json.dumps(item, ensure_ascii=True) + "\n")
        tmp.replace(out_dir / name)
        counts[name] = len(items)
    return counts
