"""HTML of the review page, rendered on the server.

Everything that comes from a drill is untrusted (users wrote the prompts, models wrote the replies): it is
only ever inserted through ``_e`` (``html.escape`` with quotes) into text or quoted attribute positions,
never into a URL scheme, a script or a style. The page loads one script and one stylesheet from 'self'
(the Content-Security-Policy forbids everything else) and no images beyond its own inline SVG.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlencode

from guardproxy.drills.record import LABEL_TITLES, LABELS, DrillRecord, PolicyDecision, message_text
from guardproxy.drills.sampling import REASONS
from guardproxy.drills.store.base import StoredDrill
from guardproxy.taxonomy import CATEGORY_IDS

BASE = "/guard/review"
ACTIONS = ("allow", "flag", "block")

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:.5rem 1rem;display:flex;gap:1rem;align-items:center}
header a{color:#cfd8dc;text-decoration:none}header form{margin-left:auto}
main{padding:1rem;max-width:72rem}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border:1px solid #ddd;padding:.3rem .5rem;
text-align:left;vertical-align:top;font-size:.9rem}
pre.msg{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #ddd;padding:.5rem;
margin:.2rem 0 .8rem}
.role{font-weight:600;font-size:.8rem;text-transform:uppercase;color:#555}
.labels button{margin:.2rem;padding:.4rem .7rem}
kbd{background:#eee;border:1px solid #bbb;padding:0 .3rem;border-radius:3px}
.block{color:#c0392b;font-weight:600}.flag{color:#b07d00;font-weight:600}.allow{color:#4c9a2a}
.err{color:#c0392b}.muted{color:#777}.warn{color:#a04000}
form.filters{margin-bottom:1rem}form.filters label{margin-right:.6rem}
textarea{width:100%;min-height:3rem}
"""

JS = """
"use strict";
document.addEventListener("keydown", function (e) {
  var t = e.target;
  if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.tagName === "SELECT")) {
    if (e.key === "Escape") { t.blur(); }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) { return; }
  if (/^[1-5]$/.test(e.key)) {
    var b = document.querySelector('button[data-key="' + e.key + '"]');
    if (b) { e.preventDefault(); b.click(); }
    return;
  }
  if (e.key === "n") {
    var note = document.getElementById("note");
    if (note) { e.preventDefault(); note.focus(); }
    return;
  }
  if (e.key === "j" || e.key === "k") {
    var a = document.getElementById(e.key === "j" ? "next" : "prev");
    if (a && a.getAttribute("href")) { e.preventDefault(); window.location.assign(a.getAttribute("href")); }
  }
});
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def layout(title: str, body: str, *, csrf: str | None = None, reviewer: str = "") -> str:
    nav = ""
    if csrf is not None:
        nav = (
            f'<a href="{BASE}">Queue</a><a href="{BASE}/dashboard">Dashboard</a>'
            f'<span class="muted">{_e(reviewer)}</span>'
            f'<form method="post" action="{BASE}/logout"><input type="hidden" name="csrf" value="{_e(csrf)}">'
            '<button type="submit">Log out</button></form>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta name="referrer" content="same-origin"><title>{_e(title)} · guardproxy review</title>'
        f'<link rel="stylesheet" href="{BASE}/static/review.css"><script src="{BASE}/static/review.js" defer></script>'
        f"</head><body><header><strong>guardproxy review</strong>{nav}</header><main>{body}</main></body></html>"
    )


def login_page(csrf: str, error: str = "") -> str:
    err = f'<p class="err">{_e(error)}</p>' if error else ""
    body = (
        f"<h1>Log in</h1>{err}"
        f'<form method="post" action="{BASE}/login">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<p><label>Admin token <input type="password" name="token" autocomplete="current-password" required>'
        "</label></p>"
        '<p><label>Your name (for labels) <input type="text" name="reviewer" maxlength="64" required></label></p>'
        '<p><button type="submit">Log in</button></p></form>'
    )
    return layout("Log in", body)


def message_page(title: str, text: str) -> str:
    return layout(title, f"<h1>{_e(title)}</h1><p>{_e(text)}</p>")


def filter_query(filters: Mapping[str, str]) -> str:
    return urlencode({k: v for k, v in filters.items() if v})


def _select(name: str, current: str, options: Sequence[str]) -> str:
    opts = ['<option value="">any</option>'] + [
        f'<option value="{_e(o)}"{" selected" if o == current else ""}>{_e(o)}</option>' for o in options
    ]
    return f'<label>{_e(name)} <select name="{_e(name)}">{"".join(opts)}</select></label>'


def queue_page(
    drills: Sequence[StoredDrill],
    filters: Mapping[str, str],
    *,
    total: int,
    page: int,
    per_page: int,
    csrf: str,
    reviewer: str,
) -> str:
    q = filter_query(filters)
    form = (
        f'<form class="filters" method="get" action="{BASE}">'
        + _select("reason", filters.get("reason", ""), REASONS)
        + _select("action", filters.get("action", ""), ACTIONS)
        + _select("reviewed", filters.get("reviewed", ""), ("no", "yes"))
        + f'<label>policy <input name="policy" value="{_e(filters.get("policy", ""))}" size="12"></label>'
        + _select("category", filters.get("category", ""), CATEGORY_IDS)
        + '<button type="submit">Filter</button></form>'
    )
    rows = []
    for d in drills:
        r = d.record
        label = d.label.label if d.label else ""
        text = r.last_user_text()
        preview = text if len(text) <= 140 else text[:140] + "…"
        href = f"{BASE}/drill/{quote(r.id)}" + (f"?{q}" if q else "")
        rows.append(
            f'<tr><td><a href="{_e(href)}">{_e(_when(r.created))}</a></td><td>{_e(", ".join(r.reasons))}</td>'
            f'<td class="{_e(r.active.action)}">{_e(r.active.action)}</td><td>{_e(r.active.policy)}</td>'
            f"<td>{_e(r.category)}</td><td>{r.harm:.2f}</td><td>{_e(label)}</td><td>{_e(preview)}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>sampled</th><th>why</th><th>decision</th><th>policy</th><th>category</th>"
        "<th>harm</th><th>label</th><th>last user turn</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="8" class="muted">no drills match</td></tr>')
        + "</tbody></table>"
    )
    nav = []
    if page > 1:
        nav.append(f'<a id="prev" href="{_e(BASE + "?" + filter_query({**filters, "page": str(page - 1)}))}">newer</a>')
    if page * per_page < total:
        nav.append(f'<a id="next" href="{_e(BASE + "?" + filter_query({**filters, "page": str(page + 1)}))}">older</a>')
    body = f"<h1>Review queue</h1>{form}<p>{total} drills</p>{table}<p>{' · '.join(nav)}</p>"
    return layout("Queue", body, csrf=csrf, reviewer=reviewer)


def _message_html(message: Mapping[str, object]) -> str:
    role = str(message.get("role", "?"))
    text = message_text(message)
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    if not isinstance(message.get("content"), str | list | type(None)) or extra:
        text += ("\n" if text else "") + json.dumps(extra, ensure_ascii=False, indent=1)
    return f'<div class="role">{_e(role)}</div><pre class="msg">{_e(text)}</pre>'


OUTPUT_BLOCK_NOTE = (
    "The policy blocked the upstream's reply at the output check. Label whether that was right: correct refusal "
    "(or missed harm) if the upstream's reply was harmful to send, false refusal (or correct answer) if it was "
    "harmless and should have reached the client."
)
RELAYED_NOTE = (
    "This was a stream: the first {n} characters of the upstream's reply reached the client before the check that "
    "blocked it, then the policy's text. The label judges the block; what the client got is shown as it got it."
)


def reply_titles(r: DrillRecord) -> list[tuple[str, str]]:
    """Each stored reply text with what it is: the upstream's (per choice), or the text the client got instead."""
    status = r.delivered_status
    if r.reply_from_policy:
        title = "Sent to the client (policy text, request blocked)"
        if status:
            title = f"Returned to the client as an HTTP {status} error, not a reply (policy text, request blocked)"
        return [(title, t) for t in r.replies]
    if r.active.action == "block":  # blocked at the output check (``DrillRecord.reply_replaced``)
        upstream = r.upstream_replies
        relayed = relayed_chars(r)
        if relayed and len(upstream) == 1:
            named = [
                ("Reached the client before the block (stream)", upstream[0][:relayed]),
                (
                    "Read from the upstream after that point, before the gateway stopped it (withheld)",
                    upstream[0][relayed:],
                ),
            ]
            if r.reply_replaced:
                named.append(("Sent to the client after the block (policy text)", r.replies[-1]))
            return named
        named = (
            [("Upstream reply (blocked, not sent)", upstream[0])]
            if len(upstream) == 1
            else [(f"Upstream reply, choice {k} (blocked choices were not sent)", t) for k, t in enumerate(upstream)]
        )
        if r.reply_replaced and status:
            title = f"Returned to the client as an HTTP {status} error, in place of the blocked reply (policy text)"
            named.append((title, r.replies[-1]))
        elif r.reply_replaced:
            named.append(("Sent to the client (policy text, in place of the blocked reply)", r.replies[-1]))
        return named
    return [(f"Reply {i}" if len(r.replies) > 1 else "Reply", t) for i, t in enumerate(r.replies)]


def relayed_chars(r: DrillRecord) -> int:
    """Characters of the (first) upstream reply that reached the client before an output block on a stream."""
    return int(r.signals.get("relayed_chars", 0)) if r.active.action == "block" and not r.reply_from_policy else 0


def _replies_html(r: DrillRecord) -> str:
    named = reply_titles(r)
    if not named:
        return '<p class="muted">no reply recorded</p>'
    note = ""
    if r.active.action == "block" and not r.reply_from_policy:
        note = f'<p class="muted">{_e(OUTPUT_BLOCK_NOTE)}</p>'
        if n := relayed_chars(r):
            note += f'<p class="warn"><strong>{_e(RELAYED_NOTE.format(n=n))}</strong></p>'
    return note + "".join(f'<div class="role">{_e(title)}</div><pre class="msg">{_e(t)}</pre>' for title, t in named)


def _stages_html(d: PolicyDecision) -> str:
    """What ``d``'s policy decided at each stage (``PolicyDecision.stages``): the input and the output check can
    both match a rule, and ``rule`` names only the one that set the action."""
    if not d.stages:
        return '<span class="muted">not recorded</span>'
    return "<br>".join(
        f'{_e(s.stage)}: <span class="{_e(s.action)}">{_e(s.action)}</span>{" " + _e(s.rule) if s.rule else ""}'
        for s in d.stages
    )


def drill_page(
    drill: StoredDrill,
    *,
    csrf: str,
    reviewer: str,
    prev_href: str | None,
    next_href: str | None,
    back_query: str,
    error: str = "",
) -> str:
    r: DrillRecord = drill.record
    conv = "".join(_message_html(m) for m in r.messages)
    replies = _replies_html(r)
    signals = "".join(
        f"<tr><th>{_e(k)}</th><td>{v:.3f}</td><td>{_e(r.thresholds.get(k, ''))}</td></tr>"
        for k, v in sorted(r.signals.items())
        if isinstance(v, int | float)
    )
    signals += f"<tr><th>refusal</th><td>{_e(r.refusal or '-')}</td><td></td></tr>"
    signals += f"<tr><th>history</th><td>{_e(r.history or 'not recorded')}</td><td></td></tr>"
    decisions = "".join(
        f'<tr><td>{_e(role)}</td><td>{_e(d.policy)}</td><td>{_e(d.version)}</td><td class="{_e(d.action)}">'
        f"{_e(d.action)}</td><td>{_e(d.rule or '')}</td><td>{_stages_html(d)}</td><td>{_e(d.category or '')}</td>"
        "</tr>"
        for role, d in [("active", r.active), *[("shadow", s) for s in r.shadows]]
    )
    history = "".join(
        f"<li>{_e(_when(lab.created))}: <strong>{_e(lab.label)}</strong> by {_e(lab.reviewer or '?')}"
        f"{' — ' + _e(lab.note) if lab.note else ''}</li>"
        for lab in drill.labels
    )
    disputed = (
        '<p class="err">Reviewers disagree (each one\'s latest label differs): the export leaves this drill out until '
        "they agree.</p>"
        if drill.disputed
        else ""
    )
    buttons = "".join(
        f'<button type="submit" name="label" value="{_e(label)}" data-key="{i}"><kbd>{i}</kbd> '
        f"{_e(LABEL_TITLES[label])}</button>"
        for i, label in enumerate(LABELS, start=1)
    )
    err = f'<p class="err">{_e(error)}</p>' if error else ""
    nav = (
        f'<a id="prev" href="{_e(prev_href or "")}">← newer (k)</a> · '
        if prev_href
        else '<span class="muted">← newer (k)</span> · '
    ) + (
        f'<a id="next" href="{_e(next_href)}">older (j) →</a>'
        if next_href
        else '<span class="muted">older (j) →</span>'
    )
    body = (
        f'<p>{nav} · <a href="{_e(BASE + ("?" + back_query if back_query else ""))}">queue</a></p>'
        f"<h1>Drill {_e(r.id[:12])}</h1>"
        f"<p>sampled {_e(_when(r.created))} · request {_e(r.request_id)} · tenant {_e(r.tenant[:12])} · "
        f"model {_e(r.model or '-')} · why: <strong>{_e(', '.join(r.reasons))}</strong>"
        f"{' · texts stored as hashes' if r.hashed else ''}</p>"
        f"<h2>Conversation</h2>{conv}<h2>Reply</h2>{replies}"
        "<h2>Decisions</h2><table><tr><th>role</th><th>policy</th><th>version</th><th>action</th><th>rule</th>"
        f"<th>by stage</th><th>category</th></tr>{decisions}</table>"
        f"<h2>Signals</h2><table><tr><th>signal</th><th>value</th><th>threshold</th></tr>{signals}</table>"
        f"<h2>Label</h2>{err}"
        f'<form method="post" action="{_e(BASE + "/drill/" + quote(r.id) + "/label")}" class="labels">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        f'<input type="hidden" name="back" value="{_e(back_query)}">'
        f'<p><label>Note (<kbd>n</kbd>) <textarea id="note" name="note" maxlength="2000"></textarea></label></p>'
        f"<p>{buttons}</p></form>"
        f'<p class="muted">Keys: <kbd>1</kbd>-<kbd>5</kbd> label, <kbd>n</kbd> note, <kbd>j</kbd>/<kbd>k</kbd> '
        f"older/newer, <kbd>Esc</kbd> leave the note.</p>"
        f"<h2>Labels so far</h2><ul>{history or '<li class=muted>none</li>'}</ul>{disputed}"
    )
    return layout(f"Drill {r.id[:12]}", body, csrf=csrf, reviewer=reviewer)


def dashboard_page(
    charts: Sequence[str],
    agreement: Mapping[str, Mapping[tuple[str, str], int]],
    labels: Mapping[str, int],
    total: int,
    *,
    csrf: str,
    reviewer: str,
) -> str:
    tables = []
    for policy, cells in sorted(agreement.items()):
        head = "".join(f"<th>shadow {_e(a)}</th>" for a in ACTIONS)
        rows = "".join(
            f"<tr><th>active {_e(a)}</th>" + "".join(f"<td>{cells.get((a, s), 0)}</td>" for s in ACTIONS) + "</tr>"
            for a in ACTIONS
        )
        tables.append(f"<h3>{_e(policy)}</h3><table><tr><th></th>{head}</tr>{rows}</table>")
    label_rows = "".join(f"<tr><th>{_e(LABEL_TITLES[k])}</th><td>{labels.get(k, 0)}</td></tr>" for k in LABELS)
    body = (
        f"<h1>Dashboard</h1><p>{total} drills</p>"
        + "".join(f"<figure>{svg}</figure>" for svg in charts)
        + "<h2>Confusion of actions, active vs each shadow</h2>"
        + ("".join(tables) or '<p class="muted">no shadow policies recorded</p>')
        + f"<h2>Review labels</h2><table>{label_rows}</table>"
    )
    return layout("Dashboard", body, csrf=csrf, reviewer=reviewer)
