"""The drill store's schema, shared by SQLite and PostgreSQL: numbered migrations, the row mapping and the
queue filters as SQL (``?`` placeholders; each store adapts them to its driver).

Types are chosen to mean the same in both databases: TEXT (JSON kept as text, so ``LIKE`` filters and the
rows read back identically), DOUBLE PRECISION (REAL affinity in SQLite), BOOLEAN, and an integer key that
each store spells as its serial type.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guardproxy.drills.record import LABELS, DrillRecord, PolicyDecision, StageDecision

_LABEL_LIST = ", ".join(f"'{label}'" for label in LABELS)
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            # The large texts come last: SQLite reads a row's columns in order, so the queue and the dashboard,
            # which never need the conversation, do not walk its overflow pages.
            "CREATE TABLE drills (id TEXT PRIMARY KEY, request_id TEXT NOT NULL, tenant TEXT NOT NULL,"
            " created DOUBLE PRECISION NOT NULL, model TEXT, reply_from_policy BOOLEAN NOT NULL,"
            " signals TEXT NOT NULL, refusal TEXT, category TEXT NOT NULL, harm DOUBLE PRECISION NOT NULL,"
            " thresholds TEXT NOT NULL, active_policy TEXT NOT NULL, active_version TEXT NOT NULL,"
            " active_action TEXT NOT NULL, active_rule TEXT, shadows TEXT NOT NULL, reasons TEXT NOT NULL,"
            " family TEXT, hashed BOOLEAN NOT NULL, messages TEXT NOT NULL, replies TEXT NOT NULL)",
            "CREATE INDEX drills_created ON drills (created, id)",
            "CREATE INDEX drills_action ON drills (active_action, created)",
            "CREATE INDEX drills_category ON drills (category, created)",
        ),
    ),
    (
        2,
        (
            "CREATE TABLE labels (id {serial}, drill_id TEXT NOT NULL REFERENCES drills (id) ON DELETE CASCADE,"
            f" label TEXT NOT NULL CHECK (label IN ({_LABEL_LIST})), note TEXT NOT NULL DEFAULT '',"
            " reviewer TEXT NOT NULL DEFAULT '', created DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX labels_drill ON labels (drill_id, id)",
        ),
    ),
    (
        3,
        (
            # What each stage of the active policy decided (JSON, ``PolicyDecision.stages``; a shadow's rides in
            # ``shadows``) and the conversation's history verdict. NULL on older drills: read as not recorded.
            "ALTER TABLE drills ADD COLUMN active_stages TEXT",
            "ALTER TABLE drills ADD COLUMN history TEXT",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

COLUMNS = (
    "id, request_id, tenant, created, model, messages, replies, reply_from_policy, signals, refusal, category,"
    " harm, thresholds, active_policy, active_version, active_action, active_rule, shadows, reasons, family, hashed,"
    " active_stages, history"
)
INSERT = f"INSERT INTO drills ({COLUMNS}) VALUES ({', '.join('?' * 23)}) ON CONFLICT DO NOTHING"


@dataclass(frozen=True)
class DrillFilter:
    """Queue filters of the review page (each ``None`` means any). ``action`` is the active policy's action; with
    ``policy``, it is that policy's action, as the active policy or as a shadow (what a shadow alone would block)."""

    reason: str | None = None
    policy: str | None = None
    category: str | None = None
    action: str | None = None
    reviewed: bool | None = None


ANY_DRILL = DrillFilter()


def _like(value: str) -> str:
    return "%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# A shadow decision of the JSON ``shadows`` column with a given policy and action (two parameters), in SQLite's
# dialect; ``PostgresStore.shadow_decision_sql`` is PostgreSQL's.
SHADOW_DECISION_SQL = (
    "EXISTS (SELECT 1 FROM json_each(drills.shadows) AS s"
    " WHERE json_extract(s.value, '$.policy') = ? AND json_extract(s.value, '$.action') = ?)"
)


def filter_sql(f: DrillFilter, shadow_decision_sql: str = SHADOW_DECISION_SQL) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if f.reason:
        where.append("reasons LIKE ? ESCAPE '\\'")
        params.append(_like(json.dumps(f.reason)))
    if f.policy and f.action:
        where.append(f"((active_policy = ? AND active_action = ?) OR {shadow_decision_sql})")
        params += [f.policy, f.action, f.policy, f.action]
    elif f.policy:
        where.append("(active_policy = ? OR shadows LIKE ? ESCAPE '\\')")
        params += [f.policy, _like('"policy": ' + json.dumps(f.policy))]
    elif f.action:
        where.append("active_action = ?")
        params.append(f.action)
    if f.category:
        where.append("category = ?")
        params.append(f.category)
    if f.reviewed is not None:
        exists = "EXISTS (SELECT 1 FROM labels l WHERE l.drill_id = drills.id)"
        where.append(exists if f.reviewed else "NOT " + exists)
    return (" WHERE " + " AND ".join(where)) if where else "", params


def row_params(r: DrillRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.request_id,
        r.tenant,
        r.created,
        r.model,
        json.dumps(list(r.messages), ensure_ascii=False),
        json.dumps(list(r.replies), ensure_ascii=False),
        r.reply_from_policy,
        json.dumps(dict(r.signals)),
        r.refusal,
        r.category,
        r.harm,
        json.dumps(dict(r.thresholds)),
        r.active.policy,
        r.active.version,
        r.active.action,
        r.active.rule,
        json.dumps([d.as_dict() for d in r.shadows]),
        json.dumps(list(r.reasons)),
        r.family,
        r.hashed,
        json.dumps([s.as_dict() for s in r.active.stages]),
        r.history,
    )


def record_from_row(row: Sequence[Any]) -> DrillRecord:
    (id_, request_id, tenant, created, model, messages, replies, from_policy, signals, refusal, category, _harm,
     thresholds, policy, version, action, rule, shadows, reasons, family, hashed, stages, history) = row  # fmt: skip
    return DrillRecord(
        id=id_,
        request_id=request_id,
        tenant=tenant,
        created=float(created),
        model=model,
        messages=tuple(json.loads(messages)),
        replies=tuple(json.loads(replies)),
        reply_from_policy=bool(from_policy),
        signals=json.loads(signals),
        refusal=refusal,
        category=category,
        thresholds=json.loads(thresholds),
        active=PolicyDecision(
            policy=policy,
            version=version,
            action=action,
            rule=rule,
            category=category,
            stages=tuple(StageDecision.from_dict(s) for s in json.loads(stages or "[]")),
        ),
        shadows=tuple(PolicyDecision.from_dict(d) for d in json.loads(shadows)),
        reasons=tuple(json.loads(reasons)),
        family=family,
        hashed=bool(hashed),
        history=history,
    )
