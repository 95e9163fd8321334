"""Read the shared data sets (and the authored ones) into labelled examples for every head.

Label rules (issue 3 and the data README):

- prompts: ``harmful`` -> harm 1; ``benign``/``borderline_benign`` -> 0; ``borderline_controversial`` -> 0 at a lower
  weight; ``policy_restricted`` -> 0 (reported separately, its category kept so policies can restrict it);
  ``jailbreak`` -> jailbreak 1 with the harm loss masked (a wrapper says nothing about the ask it will carry).
  Every other prompt row is a jailbreak negative.
- responses/phtest: refusal 3-way on (prompt, reply); the prompts are borderline, the replies harmless
  (reply_harm 0).
- responses/harmbench_classifier_val: ``none`` means the model carried out the harmful behaviour -> reply_harm 1,
  refusal ``none``; ``null`` -> reply_harm 0 and refusal masked (not carrying out is not the same as refusing).
- conversations: windows of the last K <= 4 turns, ``role: text`` lines. Escalation conversations: windows ending at
  the last two user turns -> harm 1; earlier turns carry no per-turn label and are not used. MT-Bench-101 windows
  -> harm 0, with and without the assistant turns so the presence of ``assistant:`` lines is no shortcut.
- authored (``guardproxy/training/authored/*.jsonl``): prompt, response and conversation rows in the same formats,
  grouped by their ``family`` field.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardproxy.conversation import escalation
from guardproxy.normalize import normalize
from guardproxy.training.categories import category_index, map_category

log = logging.getLogger(__name__)

REFUSAL_INDEX = {"none": 0, "partial": 1, "full": 2}
NONE_CATEGORY = 0  # taxonomy "none"
WINDOW_TURNS = 4
CONTROVERSIAL_WEIGHT = 0.5
COPYRIGHT_WEIGHT = 0.5  # HarmBench copyright rows are harmful by label, not a safety harm
AUTHORED_DIR = Path(__file__).parent / "authored"
# Never trained on: scored for the report only. Each set after the first was written later by helpers who saw neither
# the training data nor the earlier sets (see their READMEs); challenge7's three parts by three of them.
CHALLENGE_DIRS = tuple(
    Path(__file__).resolve().parents[2] / "bench" / d for d in ["challenge"] + [f"challenge{i}" for i in range(2, 15)]
)
# The pairs ``--chat-replies`` adds (MT-Bench's, the authored harmless chats'): kept out of the pooled dev refusal
# figures ("all"), so that a model trained with them is read on the same pairs as one trained without.
CHAT_REPLY_SOURCES = ("mtbench101_replies", "authored/chat_replies")
BENIGN_TURN_WEIGHT = 0.5  # a user turn of a harmless authored chat, scored on its own (see _benign_turns)

# The placeholder a jailbreak wrapper leaves for the question (matched case-insensitively).
PLACEHOLDER = re.compile(
    r"\[(?:insert (?:prompt|question|x|×|any question)[^\]]{0,20}|prompt|your prompt here|prompt here|question)\\?\]"
    r"|\{(?:prompt|insert prompt here|\"your prompt here\")\}|<(?:prompt|put your query here)>|\((?:query|prompt)\)",
    re.IGNORECASE,
)


@dataclass
class Example:
    """One training or evaluation item. ``None`` in a label masks that head's loss."""

    text: str  # the prompt (prompt mode) or the prompt of a pair
    source: str
    group: str  # rows sharing a group always land in the same split
    label: str  # the source's own label (harmful, benign, ..., escalation, or the prompt label of a pair)
    reply: str | None = None  # pair mode when set
    harm: float | None = None
    harm_weight: float = 1.0
    category: int | None = None
    category_weight: float = 1.0
    jailbreak: float | None = None
    refusal: int | None = None
    # Trained on in place of the one-hot of ``refusal`` when set: P(none, partial, full) given the source's label,
    # a correction for a noisy labeller (``guardproxy train --refusal-targets``). Metrics read ``refusal`` only.
    refusal_target: tuple[float, float, float] | None = None
    reply_harm: float | None = None
    # A conversation window's newest turn (its last line, ``role: text``): what the heads read with --window-pool
    # newest (guardproxy.encoding.encode_window). None: not a window.
    newest: str | None = None
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def pair(self) -> bool:
        return self.reply is not None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    # Split on "\n" only: some texts hold U+2028, which str.splitlines() would treat as a line break.
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            yield json.loads(line)


def text_group(text: str) -> str:
    """Identical requests in different sources must share a split: group by normalized text."""
    return "text:" + re.sub(r"\W+", " ", normalize(text).lower()).strip()[:300]


def load_prompts(data: Path) -> list[Example]:
    out: list[Example] = []
    for path in sorted((data / "prompts").glob("*.jsonl")):
        source = path.stem
        for row in read_jsonl(path):
            out.append(_prompt_example(row, source))
    return out


def _prompt_example(row: dict[str, Any], source: str) -> Example:
    text, label = row["prompt"], row["label"]
    group = _group_of(row, source)
    meta = {"id": row.get("id")}
    if row.get("language"):  # authored rows name their language; the public prompt sets are English
        meta["language"] = row["language"]
    ex = Example(text=text, source=source, group=group, label=label, jailbreak=0.0, meta=meta)
    if label == "harmful":
        ex.harm = 1.0
        cid, weight = map_category(source, row.get("category"), text)
        ex.category, ex.category_weight = category_index(cid), weight
        if source == "harmbench" and row.get("category") == "copyright":
            ex.harm_weight = COPYRIGHT_WEIGHT
    elif label in ("benign", "borderline_benign"):
        ex.harm, ex.category = 0.0, NONE_CATEGORY
    elif label == "borderline_controversial":
        ex.harm, ex.harm_weight, ex.category = 0.0, CONTROVERSIAL_WEIGHT, NONE_CATEGORY
    elif label == "policy_restricted":
        ex.harm = 0.0
        cid, weight = map_category(source, row.get("category"), text)
        ex.category, ex.category_weight = category_index(cid), weight
    elif label == "jailbreak":
        ex.jailbreak = 1.0
        ex.meta["placeholder"] = bool(PLACEHOLDER.search(text))
    else:
        raise ValueError(f"{source}: unknown label {label!r}")
    if row.get("family"):
        ex.meta["family"] = row["family"]
    if row.get("style"):
        ex.meta["style"] = row["style"]
    if row.get("kind"):  # authored harmless prompts: everyday or lookalike (calibration.harm_group)
        ex.meta["kind"] = row["kind"]
    return ex


def _group_of(row: dict[str, Any], source: str) -> str:
    if row.get("family"):
        return f"family:{row['family']}"
    if source == "phtest":
        return f"phtest:{row['id']}"  # its 11 model responses carry prompt_id == this id
    if source == "harmbench":
        return f"harmbench:{row['id'].removeprefix('harmbench-')}"
    if source == "itw_jailbreak_prompts" and row.get("community_id") is not None:
        return f"jb-community:{row['community_id']}"  # variants of one jailbreak stay together
    return text_group(row["prompt"])


def load_responses(data: Path) -> list[Example]:
    out: list[Example] = []
    for path in sorted((data / "responses" / "phtest").glob("*.jsonl")):
        for row in read_jsonl(path):
            out.append(
                Example(
                    text=row["prompt"],
                    reply=row["response"] or "",
                    source="phtest_responses",
                    group=f"phtest:{row['prompt_id']}",
                    label=row["prompt_label"],
                    refusal=REFUSAL_INDEX[row["refusal"]] if row["refusal"] else None,
                    reply_harm=0.0,
                    meta={"model": row["model"], "id": row["id"]},
                )
            )
    for row in read_jsonl(data / "responses" / "harmbench_classifier_val.jsonl"):
        complied = row["refusal"] == "none"
        out.append(
            Example(
                text=row["prompt"],
                reply=row["response"] or "",
                source="harmbench_classifier_val",
                group=f"harmbench:{row['behavior_id']}",
                label=row["prompt_label"],
                refusal=REFUSAL_INDEX["none"] if complied else None,
                reply_harm=1.0 if complied else 0.0,
                meta={"model": row.get("model"), "id": row["id"]},
            )
        )
    return out


def window_text(messages: list[dict[str, Any]]) -> str:
    """The window format the conversation tracker scores (``role: text`` lines, oldest first, each turn cut where the
    gateway cuts it): the gateway's own ``escalation.window_text``, so training windows read as served ones."""
    return escalation.window_text([(m["role"], m["content"]) for m in messages])


def windows_ending_at(messages: list[dict[str, Any]], index: int, k: int = WINDOW_TURNS) -> list[dict[str, Any]]:
    return messages[max(0, index - k + 1) : index + 1]


def load_conversations(
    data: Path, rng: random.Random, chat_turns: bool = False, chat_replies: bool = False
) -> list[Example]:
    """ActorAttack escalation windows and MT-Bench-101 benign windows; with ``chat_turns`` also every MT-Bench user
    turn on its own (source ``mtbench101_turns``, half weight, its dialogue's group), the input the per-turn check
    sees. Without them the model never saw a follow-up such as "Now turn that into a series of tweets" alone as
    harmless, and flagged about 1% of MT-Bench's user turns, its own training dialogues' included. With
    ``chat_replies`` also every (user turn, reply) pair of each dialogue as a reply that is no refusal
    (``chat_reply_pairs``, source ``mtbench101_replies``)."""
    out: list[Example] = []
    for row in read_jsonl(data / "conversations" / "safemtdata_attack600.jsonl"):
        out.extend(_escalation_windows(row, "safemtdata_attack600", f"goal:{row.get('group_id') or row['id']}"))
    for row in read_jsonl(data / "conversations" / "mtbench101.jsonl"):
        out.extend(_benign_windows(row, "mtbench101", f"dialog:{row['id']}", rng))
        if chat_turns:
            out.extend(_benign_turns(row, "mtbench101_turns", f"dialog:{row['id']}"))
        if chat_replies:
            out.extend(chat_reply_pairs(row, CHAT_REPLY_SOURCES[0], f"dialog:{row['id']}"))
    return out


def _escalation_windows(row: dict[str, Any], source: str, group: str) -> list[Example]:
    messages = row["messages"]
    user_idx = [i for i, m in enumerate(messages) if m["role"] == "user"]
    cid, weight = map_category(source, row.get("harm_category"), row.get("plain_query") or window_text(messages))
    out = []
    for end in user_idx[-2:]:  # the later turns: by then the window carries the goal
        out.append(
            Example(
                text=window_text(windows_ending_at(messages, end)),
                newest=window_text([messages[end]]),
                source=source,
                group=group,
                label="escalation",
                harm=1.0,
                category=category_index(cid),
                category_weight=weight,
                meta={"id": row["id"], "turn": end},
            )
        )
    return out


def _labelled_escalation_windows(row: dict[str, Any], source: str, group: str) -> list[Example]:
    """Authored escalations mark the first clearly harmful user turn: windows before it are harmless openings."""
    first = row.get("first_harmful_index")
    if first is None:
        return _escalation_windows(row, source, group)
    messages = row["messages"]
    cid, weight = map_category(source, row.get("harm_category"), row.get("goal") or window_text(messages))
    out = []
    for end in (i for i, m in enumerate(messages) if m["role"] == "user"):
        harmful = end >= first
        out.append(
            Example(
                text=window_text(windows_ending_at(messages, end)),
                newest=window_text([messages[end]]),
                source=source,
                group=group,
                label="escalation" if harmful else "benign",
                harm=1.0 if harmful else 0.0,
                category=category_index(cid) if harmful else NONE_CATEGORY,
                category_weight=weight,
                meta={"id": row["id"], "turn": end},
            )
        )
    return out


def _benign_windows(
    row: dict[str, Any], source: str, group: str, rng: random.Random, per_conversation: int = 2
) -> list[Example]:
    messages = row["messages"]
    user_idx = [i for i, m in enumerate(messages) if m["role"] == "user"]
    out = []
    for end in rng.sample(user_idx, k=min(per_conversation, len(user_idx))):
        window = windows_ending_at(messages, end)
        if rng.random() < 0.5:  # user-only windows too: ActorAttack has no assistant turns
            window = [m for m in messages[: end + 1] if m["role"] == "user"][-WINDOW_TURNS:]
        out.append(
            Example(
                text=window_text(window),
                newest=window_text(window[-1:]),
                source=source,
                group=group,
                label="benign",
                harm=0.0,
                category=NONE_CATEGORY,
                jailbreak=0.0,
                # the window's messages: a harmless context for augment.context_asks
                meta={"id": row["id"], "turn": end, "window": window},
            )
        )
    return out


def chat_reply_pairs(row: dict[str, Any], source: str, group: str) -> list[Example]:
    """Each (user turn, the assistant's reply) of a harmless chat as a pair: refusal ``none``, no reply harm.

    The refusal head's other pairs come from refusal data sets, where a reply that declines is common and a short
    answer, a clarifying question ("Which celebrity do you mean?") or a helpful reply in another language is rare;
    the shipped model read 24% of the dev authored chats' replies and 6% of MT-Bench's as refusals
    (``bench.helpful_replies``). A chat's replies are written as help, so they teach what a refusal is not. The pair
    keeps its chat's group (so its split), and a pair never joins a text group, so no split moves."""
    msgs = row["messages"]
    return [
        Example(
            text=user["content"],
            reply=reply["content"],
            source=source,
            group=group,
            label="benign",
            refusal=REFUSAL_INDEX["none"],
            reply_harm=0.0,
            meta={"id": row["id"], "turn": i + 1},
        )
        for i, (user, reply) in enumerate(zip(msgs, msgs[1:], strict=False))
        if user["role"] == "user"
        and reply["role"] == "assistant"
        and isinstance(user.get("content"), str)
        and isinstance(reply.get("content"), str)
        and user["content"].strip()
        and reply["content"].strip()
    ]


def _benign_turns(row: dict[str, Any], source: str, group: str) -> list[Example]:
    """Each user turn of a harmless chat (authored, or MT-Bench's with ``--chat-turns``) as a prompt on its own, at
    half weight.

    The dark-but-benign chats (a nurse revising overdose recognition, a mystery novelist) are where long harmless
    conversations get flagged, and mostly by one turn's own score; their windows alone never showed the per-turn
    head those turns. Half weight: a few lean on their context ("and how much would be too much?")."""
    return [
        Example(
            text=m["content"],
            source=source,
            group=group,
            label="benign",
            harm=0.0,
            harm_weight=BENIGN_TURN_WEIGHT,
            category=NONE_CATEGORY,
            jailbreak=0.0,
            meta={"id": row["id"], "turn": i},
        )
        for i, m in enumerate(row["messages"])
        if m["role"] == "user" and isinstance(m.get("content"), str) and m["content"].strip()
    ]


def load_authored(directory: Path = AUTHORED_DIR, chat_replies: bool = False) -> list[Example]:
    """Rows written for this project (``family`` groups reframings of one intent): prompts, pairs, conversations;
    with ``chat_replies`` also the replies of the harmless chats as pairs (source ``authored/chat_replies``)."""
    out: list[Example] = []
    if not directory.is_dir():
        return out
    rng = random.Random(0)
    for path in sorted(directory.glob("*.jsonl")):
        source = f"authored/{path.stem}"
        for row in read_jsonl(path):
            try:
                out.extend(_authored_rows(row, source, rng, chat_replies))
            except (KeyError, ValueError) as exc:
                log.warning("%s: skipped row %s: %s", path.name, row.get("id"), exc)
    return out


def _authored_rows(row: dict[str, Any], source: str, rng: random.Random, chat_replies: bool = False) -> list[Example]:
    group = f"family:{row['family']}" if row.get("family") else text_group(str(row.get("prompt") or row["id"]))
    if "messages" in row:
        if row.get("label") == "escalation":
            return _labelled_escalation_windows(row, source, group)
        replies = chat_reply_pairs(row, CHAT_REPLY_SOURCES[1], group) if chat_replies else []
        return (
            _benign_windows(row, source, group, rng, per_conversation=6) + _benign_turns(row, source, group) + replies
        )
    if row.get("response") is not None:
        prompt_label = row.get("prompt_label") or row.get("label") or "unknown"
        refusal = row.get("refusal")
        reply_harm = row.get("reply_harm")
        if reply_harm is None and refusal in ("partial", "full"):
            reply_harm = 0.0
        if reply_harm is None and prompt_label == "benign":
            reply_harm = 0.0  # an answer to a harmless request carries no harmful assistance
        return [
            Example(
                text=row["prompt"],
                reply=row["response"],
                source=source,
                group=group,
                label=prompt_label,
                refusal=REFUSAL_INDEX[refusal] if refusal in REFUSAL_INDEX else None,
                reply_harm=None if reply_harm is None else float(reply_harm),
                meta={"id": row.get("id"), "keyword_free": row.get("keyword_free"), "family": row.get("family")},
            )
        ]
    ex = _prompt_example(row, source)
    ex.group = group
    return [ex]


def load_all(
    data: Path, *, authored: bool = True, seed: int = 0, chat_turns: bool = False, chat_replies: bool = False
) -> list[Example]:
    rng = random.Random(seed)
    examples = load_prompts(data) + load_responses(data) + load_conversations(data, rng, chat_turns, chat_replies)
    if authored:
        examples += load_authored(chat_replies=chat_replies)
    return examples


def load_refusal_targets(path: Path) -> tuple[str, dict[int, tuple[float, float, float]]]:
    """A label-noise correction for one source's refusal labels: ``{"source": S, "targets": {"none": [p_none,
    p_partial, p_full], "partial": [...], "full": [...]}}``, each row the chance of each class given that label
    (``python -m bench.refusal_audit targets`` writes one). Raises ValueError naming the file on any other shape."""
    try:
        doc = json.loads(path.read_text())
        source, rows = doc["source"], doc["targets"]
        if not isinstance(source, str) or not isinstance(rows, dict) or set(rows) != set(REFUSAL_INDEX):
            raise ValueError(f"'targets' must map each of {list(REFUSAL_INDEX)} to three probabilities")
        targets: dict[int, tuple[float, float, float]] = {}
        for label, probs in rows.items():
            p = tuple(float(x) for x in probs)
            if len(p) != len(REFUSAL_INDEX) or min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
                raise ValueError(f"targets[{label!r}] must be three non-negative numbers summing to 1, got {probs}")
            targets[REFUSAL_INDEX[label]] = (p[0], p[1], p[2])
    except (OSError, KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: {detail}") from exc
    return source, targets


def apply_refusal_targets(examples: list[Example], source: str, targets: dict[int, tuple[float, float, float]]) -> int:
    """Give every refusal-labelled row of ``source`` its label's soft target; returns how many rows got one."""
    n = 0
    for ex in examples:
        if ex.source == source and ex.refusal is not None:
            ex.refusal_target = targets[ex.refusal]
            n += 1
    return n
