"""Small server-side SVG charts for the review dashboard.

Plain SVG built as text: no JavaScript, no remote assets, nothing the page's Content-Security-Policy has
to allow (colours are presentation attributes, not inline styles). Every label is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence

ACTION_COLOURS: Mapping[str, str] = {"allow": "#4c9a2a", "flag": "#e0a100", "block": "#c0392b"}
_OTHER = "#7f8c8d"
W, H, PAD_L, PAD_B, PAD_T = 640, 220, 44, 36, 24


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _frame(title: str, body: list[str], legend: Sequence[tuple[str, str]] = (), *, axes: bool = True) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"'
        f' aria-label="{_e(title)}">',
        f'<text x="{PAD_L}" y="16" font-size="13" font-family="sans-serif" fill="#222">{_e(title)}</text>',
    ]
    if axes:
        parts += [
            f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - 8}" y2="{H - PAD_B}" stroke="#999"/>',
            f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#999"/>',
        ]
    x = W - 8
    for name, colour in reversed(legend):
        x -= 8 + 7 * len(name) + 14
        parts.append(f'<rect x="{x}" y="7" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="16" font-size="11" font-family="sans-serif">{_e(name)}</text>')
    return "".join(parts + body + ["</svg>"])


def _stacked(
    title: str, columns: Sequence[tuple[str, Mapping[str, int]]], keys: Sequence[str], colours: Mapping[str, str]
) -> str:
    if not columns:
        return _frame(title, [_empty()])
    top = max(sum(c.values()) for _, c in columns) or 1
    plot_w, plot_h = W - PAD_L - 8, H - PAD_B - PAD_T
    bar_w = plot_w / len(columns)
    body: list[str] = [
        f'<text x="{PAD_L - 4}" y="{PAD_T + 4}" font-size="10" text-anchor="end" font-family="sans-serif">{top}</text>',
        f'<text x="{PAD_L - 4}" y="{H - PAD_B}" font-size="10" text-anchor="end" font-family="sans-serif">0</text>',
    ]
    label_every = max(1, len(columns) // 8)
    for i, (label, counts) in enumerate(columns):
        x = PAD_L + i * bar_w
        y = float(H - PAD_B)
        for key in keys:
            n = counts.get(key, 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            body.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}"'
                f' fill="{colours.get(key, _OTHER)}"><title>{_e(label)} {_e(key)}: {n}</title></rect>'
            )
        if i % label_every == 0:
            body.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{H - PAD_B + 14}" font-size="10" text-anchor="middle"'
                f' font-family="sans-serif">{_e(label)}</text>'
            )
    return _frame(title, body, [(k, colours.get(k, _OTHER)) for k in keys])


def _empty() -> str:
    return f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="12" fill="#777">no drills yet</text>'


def decisions_over_time(rows: Sequence[tuple[float, str]], *, buckets: int = 24) -> str:
    """Stacked bars of active decisions per hour (or per day when the drills span more than 3 days)."""
    if not rows:
        return _frame("Active decisions over time", [_empty()])
    times = [t for t, _ in rows]
    span = max(times) - min(times)
    step = 3600 if span <= 3 * 86400 else 86400
    fmt = "%m-%d %H:00" if step == 3600 else "%Y-%m-%d"
    last = int(max(times) // step)
    first = max(int(min(times) // step), last - buckets + 1)
    cols: dict[int, dict[str, int]] = {b: {} for b in range(first, last + 1)}
    for t, action in rows:
        b = int(t // step)
        if b in cols:
            cols[b][action] = cols[b].get(action, 0) + 1
    columns = [(time.strftime(fmt, time.gmtime(b * step)), c) for b, c in cols.items()]
    keys = [k for k in ACTION_COLOURS if any(k in c for _, c in columns)]
    keys += sorted({k for _, c in columns for k in c} - set(keys))
    return _stacked(f"Active decisions over time (UTC, per {'hour' if step == 3600 else 'day'})", columns, keys,
                    ACTION_COLOURS)  # fmt: skip


def score_histogram(title: str, values: Sequence[tuple[float, str]], *, bins: int = 20) -> str:
    """Histogram of a score in [0, 1], stacked by active decision."""
    cols: list[dict[str, int]] = [{} for _ in range(bins)]
    for v, action in values:
        i = min(bins - 1, max(0, int(v * bins)))
        cols[i][action] = cols[i].get(action, 0) + 1
    if not values:
        return _frame(title, [_empty()])
    columns = [(f"{i / bins:.2f}", c) for i, c in enumerate(cols)]
    keys = [k for k in ACTION_COLOURS if any(k in c for c in cols)]
    return _stacked(title, columns, keys, ACTION_COLOURS)


def agreement_bars(agreement: Mapping[str, Mapping[tuple[str, str], int]]) -> str:
    """One bar per shadow policy: the share of drills where it decided what the active policy decided."""
    title = "Active vs shadow agreement"
    if not agreement:
        return _frame(title, [_empty()])
    plot_w = W - PAD_L - 150
    row_h = min(28.0, (H - PAD_T - 10) / len(agreement))
    body: list[str] = []
    for i, (policy, cells) in enumerate(sorted(agreement.items())):
        total = sum(cells.values()) or 1
        same = sum(n for (a, s), n in cells.items() if a == s)
        share = same / total
        y = PAD_T + 6 + i * row_h
        body.append(f'<rect x="{PAD_L}" y="{y:.1f}" width="{plot_w}" height="{row_h - 6:.1f}" fill="#eee"/>')
        body.append(
            f'<rect x="{PAD_L}" y="{y:.1f}" width="{plot_w * share:.1f}" height="{row_h - 6:.1f}" fill="#2e86c1">'
            f"<title>{_e(policy)}: {same}/{total}</title></rect>"
        )
        body.append(
            f'<text x="{PAD_L + plot_w + 6}" y="{y + row_h / 2:.1f}" font-size="11" font-family="sans-serif">'
            f"{_e(policy)} {share:.0%} of {total}</text>"
        )
    return _frame(title, body, axes=False)
