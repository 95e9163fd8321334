"""Reporting a bench run: terminal tables, the JSON document, PNG charts (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardproxy.benchmark.load import early_exits, windows_estimated

# The gateway's stage labels, in request order. What each holds (guardproxy.chat, guardproxy.guard):
STAGE_ORDER = (
    "parse",
    "input_check",
    "state",
    "state_lookup",
    "state_store",
    "inference",
    "history",
    "tokenize",
    "model",
    "policy",
    "upstream",
    "output_check",
)
STAGE_LEGEND = (
    "stages: parse = JSON + validation; input_check = the whole input hook (state + policy + tool-result scoring); "
    "state = conversation lookup + scoring the new user turn(s) and the window (tokenize + inference inside) + "
    "storing the turn; state_lookup = the hash chain over the request, the state read and the prefix match; "
    "state_store = each write of conversation state (the request's, in its Server-Timing too, and the one that "
    "records the reply, inside output_check for a plain reply; a request's header holds only its own); "
    "inference = guard model calls outside the tracker (reply scoring, tool results); history = reading the "
    "assistant turns the gateway did not relay as replies, beside inference (both walls, so they overlap); "
    "policy = every policy's "
    "decisions; output_check = reply scoring + policy; upstream = time to upstream headers. tokenize (normalisation "
    "+ tokenization) and model (the ONNX run) are the classifier thread's own time for every model call, wherever "
    "it was made (inside state, inference and output_check), so they overlap those stages and exclude queueing; "
    "the store (decision log, drills) runs after the response, off the request path."
)


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_f(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(obj: dict[str, Any] | None) -> list[Any]:
    if not obj:
        return ["-", "-", "-"]
    return [obj["p50"], obj["p90"], obj["p99"]]


def render(result: dict[str, Any]) -> str:
    """The whole run as terminal tables."""
    sections = [_header(result), _failure(result), _latency(result), _own_account(result), _client(result),
                _server_timing(result), _stages(result), _length(result), _sweep(result), _rss(result),
                _targets(result)]  # fmt: skip
    notes = [f"note: {note}" for note in result["notes"]]
    return "\n\n".join([s for s in sections if s] + ["\n".join(notes)] if notes else [s for s in sections if s])


def _header(result: dict[str, Any]) -> str:
    m, cfg = result["machine"], result["config"]
    pace = f"{cfg['tokens_per_s']:g} tokens/s" if cfg["tokens_per_s"] else "reply at once"
    upstream = cfg["upstream"] or f"FAKE upstream (TTFT {cfg['ttft_ms']:g} ms, {pace})"
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, loadavg {m.get('loadavg_at_start')}\n"
        f"upstream: {upstream}; guard model: {cfg['model_dir'] or 'default (models/guard-v1)'}; "
        f"policy: {cfg['policy'] or 'default'}; guard threads: {cfg.get('threads') or 'default (1)'}; "
        f"workers: {cfg.get('workers') or 'default ({})'.format(m.get('default_workers', 1))}"
        + ("; window pass beside the turn pass" if cfg.get("concurrent_window") else "")
        + ("; upstream called while the window is scored" if cfg.get("speculative_window") else "")
        + {True: "; early exit on", "auto": "; early exit auto"}.get(cfg.get("early_exit"), "")
        + (f"; window ids: {cfg['window_ids']}" if cfg.get("window_ids") else "")
    )


def _failure(result: dict[str, Any]) -> str:
    """Why the run stopped (``run.failure_report``): per target what came back, the first distinct errors, and what
    to check. Empty for a run that went through."""
    failure = result.get("failure")
    if not failure:
        return ""
    targets = failure["targets"]
    rows = [[name, t["requests"], t["failed"], ", ".join(f"{k} x{n}" for k, n in t["statuses"].items())]
            for name, t in targets.items()]  # fmt: skip
    errors = [f"  [{name}] {e}" for name, t in targets.items() for e in t["errors"]]
    return (
        f"Nothing measured: the {failure['phase']} phase stopped, a target answered none of its requests\n"
        + _table(["target", "sent", "failed", "statuses"], rows)
        + ("\nfirst errors (keys cut out):\n" + "\n".join(errors) if errors else "")
        + "\nwhat to check:\n"
        + "\n".join(f"  - {c}" for c in failure["checks"])
    )


def _n(obj: dict[str, Any] | None) -> int:
    return int(obj["n"]) if obj else 0


def _stamped(result: dict[str, Any]) -> bool:
    """Whether the upstream stamped its own time on its replies (the FAKE upstream does, a real one does not)."""
    return any(r["plain"]["overhead_ms"] or r["stream"]["ttft_overhead_ms"] for r in result["latency"])


def _failed(r: dict[str, Any]) -> int:
    return int(r.get("failed", r["requests"] - r["ok"]))


def _latency(result: dict[str, Any]) -> str:
    if not result["latency"]:
        return ""
    rows = [
        [r["concurrency"], r["target"], _n(r["plain"]["overhead_ms"]), *_pct(r["plain"]["overhead_ms"]),
         _n(r["stream"]["ttft_overhead_ms"]), *_pct(r["stream"]["ttft_overhead_ms"]), r["requests"], r["ok"],
         r["blocked"], r.get("flagged", 0), _failed(r)]
        for r in result["latency"]
    ]  # fmt: skip
    head = ["c", "target", "plain n", "p50", "p90", "p99", "stream n", "TTFT p50", "p90", "p99", "sent", "ok",
            "blocked", "flagged", "failed"]  # fmt: skip
    title = "Overhead per request, ms (client time minus the upstream's stamp for the same request)"
    legend = (
        "plain n, stream n: the requests each row's percentiles are over (answered with the upstream's stamp, not "
        "blocked); sent: every request to the target (each target got the same planned requests); blocked: by the "
        "decision header or a reply's finish_reason content_filter (a stream's output block), no latency sample; "
        "flagged: answered, and flagged for review; failed: neither answered nor blocked (statuses in the JSON)"
    )
    if not _stamped(result):
        legend += (
            ". No overhead here: a real upstream sends no per-request stamp of its own time, so the client cannot "
            "take it out; the gateway's own account below is measured inside the gateway"
        )
    return title + "\n" + _table(head, rows) + "\n" + legend


def _own_account(result: dict[str, Any]) -> str:
    rows = [
        [r["concurrency"], r["target"], _n(r["plain"].get("gateway_ms")), *_pct(r["plain"].get("gateway_ms")),
         _n(r["stream"].get("gateway_ms")), *_pct(r["stream"].get("gateway_ms"))]
        for r in result["latency"]
        if r["plain"].get("gateway_ms") or r["stream"].get("gateway_ms")
    ]  # fmt: skip
    if not rows:
        return ""
    title = ("The gateway's own account of the same requests, ms (Server-Timing 'gateway': its time outside the "
             "upstream, without the client's and loopback share; answered, not blocked)")  # fmt: skip
    head = ["c", "target", "plain n", "p50", "p90", "p99", "stream n", "p50", "p90", "p99"]
    return title + "\n" + _table(head, rows)


def _client(result: dict[str, Any]) -> str:
    if not result["latency"]:
        return ""
    rows = []
    for r in result["latency"]:
        plain, ttft = r["plain"]["total_ms"] or {}, r["stream"]["ttft_ms"] or {}
        rows.append([r["concurrency"], r["target"], plain.get("p50"), plain.get("p99"), ttft.get("p50"),
                     ttft.get("p99"), (r["stream"]["total_ms"] or {}).get("p50")])  # fmt: skip
    head = ["c", "target", "plain p50", "p99", "TTFT p50", "p99", "stream total p50"]
    return "Client-side latency, ms (the upstream's time included)\n" + _table(head, rows)


def _server_timing(result: dict[str, Any]) -> str:
    timed = [r for r in result["latency"] if r.get("server_timing_ms")]
    if not timed:
        return ""
    names = [n for n in STAGE_ORDER if any(n in r["server_timing_ms"] for r in timed)]
    names += sorted({n for r in timed for n in r["server_timing_ms"]} - set(names))
    rows = []
    for r in timed:
        st = r["server_timing_ms"]
        cells = [f"{_f(st[n]['p50'])} / {_f(st[n]['p99'])}" if st.get(n) else "-" for n in names]
        rows.append([r["concurrency"], r["target"], *cells])
    title = "Per-request stage times from the gateway's Server-Timing header, ms (p50 / p99; plain and streams)"
    return title + "\n" + _table(["c", "target", *names], rows)


def _stages(result: dict[str, Any]) -> str:
    if not result["stages"]:
        return ""
    names = [n for n in STAGE_ORDER if any(s["stage"] == n for st in result["stages"] for s in st["stages"])]
    names += sorted({s["stage"] for st in result["stages"] for s in st["stages"]} - set(names))
    early = result["config"].get("early_exit") in (True, "auto")
    rows = []
    for st in result["stages"]:
        per = {s["stage"]: s["per_request_ms"] for s in st["stages"]}
        row = [st["phase"], st["gateway"], st["requests"], *[per.get(n) for n in names], st.get("cpu_ms_per_request")]
        if early:
            counters = st.get("counters") or {}
            row += [_exits(counters), _exits(counters, windows=True), windows_estimated(counters)]
        rows.append(row)
    title = "Gateway stages, ms per request (its /metrics histograms diffed over each phase: stage time / requests)"
    exit_heads = ["exited", "windows exited", "windows estimated"]
    head = ["phase", "gateway", "requests", *names, "CPU ms/req", *(exit_heads if early else [])]
    legend = STAGE_LEGEND + " CPU ms/req: the gateway process's user+system CPU per request (/proc), load-independent."
    if early:
        legend += (
            " exited: per-turn checks that exited early / all that could (a turn already in the score cache is "
            "not checked again, so this can be fewer than the requests). windows exited: the same for conversation "
            "window passes (a window whose turns read risky alone runs the whole model and is not counted). windows "
            "estimated: requests whose window pass did not run at all, its estimate from the user turns' own states "
            "below the gate (guardproxy.early_exit.WindowEstimate)."
        )
    return title + "\n" + _table(head, rows) + "\n" + legend


def _exits(counters: dict[str, float], *, windows: bool = False) -> str:
    exited, went_on = early_exits(counters, windows=windows)
    return f"{exited}/{exited + went_on}" if exited + went_on else "-"


def _length(result: dict[str, Any]) -> str:
    length = result["length"]
    if not length:
        return ""
    single = length["single_turn_ms"] or {}
    wanted = set(length["reported"])
    grows = sorted({name for p in length["points"] for name in p.get("stage_p50_ms", {})})
    rows = [[p["history_turns"], p["n"], p["p50_ms"], p["ratio_to_single"],
             *(p.get("stage_p50_ms", {}).get(name) for name in grows)]
            for p in length["points"] if p["history_turns"] in wanted]  # fmt: skip
    lo, hi = length["tail_history_turns"]
    return (
        f"Cost against conversation length ({length['target']}, plain, c=1"
        + (
            f", each conversation round robin over {length['replicas']} replicas sharing Redis"
            if length.get("replicas", 1) > 1
            else ""
        )
        + (f", upstream TTFT {_f(length['upstream_ttft_ms'])} ms" if length.get("upstream_ttft_ms") else "")
        + "): overhead p50 ms"
        + ("; the gateway's own p50 ms in the stages that grow with the history (Server-Timing)" if grows else "")
        + "; "
        f"single-turn reference p50 {_f(single.get('p50'))} ms\n"
        + _table(["history turns", "n", "p50", "x single", *(f"{name} p50" for name in grows)], rows)
        + f"\nhistory {lo}..{hi}: p50 {_f(length['tail_p50_ms'])} ms = {_f(length['ratio_at_longest'])}x single turn, "
        f"{_f(length.get('ratio_to_second_turn'))}x the second turn (the first with a window to score, "
        f"p50 {_f(length.get('second_turn_p50_ms'))} ms)"
        + (f"; {length['blocked_turns']} turns blocked (no sample)" if length.get("blocked_turns") else "")
        + (f"; {length['blocked_twins']} twins blocked" if length.get("blocked_twins") else "")
        + (f"; {length['flagged']} requests flagged" if length.get("flagged") else "")
        + (
            f"\nper pair (each request at history {lo}..{hi} over its single-turn twin, the same new turn alone): "
            f"median {_f(length['paired_ratio_at_longest'])}x over {length['paired_n']} pairs"
            if length.get("paired_ratio_at_longest") is not None
            else ""
        )
        + _own_time(length, lo, hi)
    )


def _own_time(length: dict[str, Any], lo: int, hi: int) -> str:
    """The length phase's figures from the gateway's own Server-Timing, where it sent them."""
    g = length.get
    if g("gateway_tail_p50_ms") is None:
        return ""
    return (
        f"\nthe gateway's own time (Server-Timing 'gateway'), p50: single turn {_f(g('gateway_single_turn_p50_ms'))} "
        f"ms, second turn {_f(g('gateway_second_turn_p50_ms'))} ms, history {lo}..{hi} {_f(g('gateway_tail_p50_ms'))} "
        f"ms = {_f(g('gateway_ratio_at_longest'))}x single turn, "
        f"{_f(g('gateway_ratio_to_second_turn'))}x the second turn"
        + (
            f"; per pair, median {_f(g('gateway_paired_ratio_at_longest'))}x"
            if g("gateway_paired_ratio_at_longest") is not None
            else ""
        )
    )


def _sweep(result: dict[str, Any]) -> str:
    sweep = result["sweep"]
    if not sweep:
        return ""
    rows = [
        [f"{r['concurrency']}{' (overload)' if r.get('overload') else ''}", r["throughput_rps"],
         r.get("allowed_rps"), r["ok"], r.get("blocked"), r.get("flagged"), r["status_503"], r["errors"],
         *_pct(r["latency_ms"]), r.get("classifier_failures"), r.get("cpu_ms_per_request"), r.get("rss_mib")]
        for r in sweep["levels"]
    ]  # fmt: skip
    head = ["c", "req/s", "allowed/s", "ok", "blocked", "flagged", "503", "other", "lat p50", "p90", "p99",
            "clf fail", "CPU ms/req", "RSS MiB"]  # fmt: skip
    return (
        f"Throughput sweep ({sweep['target']}, upstream TTFT {_f(sweep['ttft_ms'], 0)} ms)\n"
        + _table(head, rows)
        + f"\nbest {sweep['best_rps']:.1f} req/s; throughput last grew by > 5% at c={sweep['saturated_at']}"
        + "\nreq/s: answered requests (ok), blocked ones included; allowed/s: without them (a blocked request skips "
        "the upstream and the output check); latency over the allowed ones"
    )


def _rss(result: dict[str, Any]) -> str:
    procs = result["rss"].get("processes", {})
    if not procs:
        return ""
    rows = [[name, r["first_mib"], r["after_warmup_mib"], r["max_mib"], r["end_mib"], r["growth_after_warmup_pct"],
             r["fds_start"], r["fds_end"]] for name, r in procs.items()]  # fmt: skip
    head = ["gateway", "first", "after warm-up", "max", "end", "growth %", "fds", "fds end"]
    return "Gateway RSS (MiB) and open descriptors\n" + _table(head, rows)


_FROM = {"client": "client", "server-timing": "Server-Timing", "throughput": "client"}


def _targets(result: dict[str, Any]) -> str:
    if not result["targets"]:
        return ""
    verdict = {True: "met", False: "NOT met", None: "-"}

    def n(t: dict[str, Any]) -> str:
        if t.get("n") is None:
            return "-"
        return f"{t['n']}/{t['direct_n']}" if t.get("direct_n") is not None else str(t["n"])

    rows = [[t["target"], t["value"], (">= " if t["unit"] == "req/s" else "<= ") + _f(t["limit"]), t["unit"],
             _FROM.get(t.get("source", ""), "-"), n(t),
             verdict[t["met"]] + (" (few samples)" if t.get("few_samples") else "")]
            for t in result["targets"]]  # fmt: skip
    sources = {t.get("source") for t in result["targets"]}
    legend = []
    if "client" in sources:
        legend.append(
            "from client: the client's time minus the upstream's stamp per request; an 'added' figure is the "
            "gateway's p50 minus direct's p50 over the same planned requests"
        )
    if "server-timing" in sources:
        legend.append(
            "from Server-Timing: the gateway's own time outside the upstream, measured inside it: without the "
            "client's and loopback's share, so lower than a client-side figure for the same gateway"
            + ("" if _stamped(result) else " (a real upstream sends no stamp: the 'added' rows can only use it)")
        )
    legend.append("n: the samples under the figure (gateway/reference where it is a difference or a ratio)")
    head = ["target", "measured", "limit", "unit", "from", "n", ""]
    return "Issue 7 targets (reported, not asserted)\n" + _table(head, rows) + "\n" + "\n".join(legend)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def write_pngs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency.png (overhead percentiles vs concurrency), length.png (cost vs conversation length),
    sweep.png (throughput and latency vs concurrency), rss.png (RSS over the run); those with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    latency = result["latency"]
    if latency:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
        targets = list(dict.fromkeys(r["target"] for r in latency))
        levels = sorted({r["concurrency"] for r in latency})
        panels = [("plain", "overhead_ms", "plain replies: overhead to the last byte"),
                  ("stream", "ttft_overhead_ms", "streams: overhead to the first event (TTFT)")]  # fmt: skip
        suptitle = "guardproxy bench: per-request overhead (client time minus the upstream's stamp)"
        if not _stamped(result):  # a real upstream: no stamp, so the gateway's own account is what there is
            panels = [("plain", "gateway_ms", "plain replies: the gateway's own time (Server-Timing)"),
                      ("stream", "gateway_ms", "streams: the gateway's own time (Server-Timing)")]  # fmt: skip
            suptitle = (
                "guardproxy bench: the gateway's own time outside the upstream (Server-Timing; no upstream stamp)"
            )
        for ax, (kind, key, title) in zip(axes, panels, strict=True):
            for target in targets:
                rows = [r for r in latency if r["target"] == target and r[kind].get(key)]
                if not rows:
                    continue
                color = _COLORS.get(target)
                cs = [r["concurrency"] for r in rows]
                ax.plot(cs, [r[kind][key]["p50"] for r in rows], marker="o", color=color, label=f"{target} p50")
                ax.plot(cs, [r[kind][key]["p90"] for r in rows], ls="--", color=color, label=f"{target} p90")
                ax.plot(cs, [r[kind][key]["p99"] for r in rows], ls=":", color=color, label=f"{target} p99")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.set_xlabel("concurrency")
            ax.set_ylabel("ms")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(targets), fontsize=7)
        fig.suptitle(suptitle, fontsize=10)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        written.append(_save(fig, out_dir / "latency.png", plt))

    length = result["length"]
    if length and length["points"]:
        written.append(_length_png(length, out_dir, plt))

    sweep = result["sweep"]
    if sweep and sweep["levels"]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        cs = [r["concurrency"] for r in sweep["levels"]]
        ax.plot(cs, [r["throughput_rps"] for r in sweep["levels"]], marker="o", color="tab:blue", label="req/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_ylim(bottom=0)
        for r in sweep["levels"]:
            bad = r["status_503"] + r["errors"] + int(r.get("classifier_failures") or 0)
            if bad:
                ax.annotate(f"{r['status_503']} x 503, {r.get('classifier_failures') or 0:.0f} guard timeouts",
                            (r["concurrency"], r["throughput_rps"]), fontsize=7, textcoords="offset points",
                            xytext=(-60, -14))  # fmt: skip
        ax.set_xlabel("concurrency")
        ax.set_ylabel("requests/s (ok)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(
            cs,
            [float((r["latency_ms"] or {}).get("p99", "nan")) for r in sweep["levels"]],
            marker="s",
            color="tab:red",
            label="latency p99",
        )
        ax2.set_ylabel("latency p99, ms", color="tab:red")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"throughput sweep ({sweep['target']})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "sweep.png", plt))

    procs = result["rss"].get("processes", {})
    if procs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, r in procs.items():
            ax.plot([s[0] for s in r["samples"]], [s[1] for s in r["samples"]], label=name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS, MiB")
        ax.set_title("gateway RSS over the run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "rss.png", plt))
    return written


_COLORS = {
    "direct": "tab:gray",
    "passthrough": "tab:blue",
    "guarded": "tab:orange",
    "speculative": "tab:green",
    "input-only": "tab:red",
}


def _length_png(length: dict[str, Any], out_dir: Path, plt: Any) -> Path:
    """length.png: request N+1's cost against the history it carries, and each request over its twin."""
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(12, 4.2))
    pts = length["points"]
    xs = [p["history_turns"] for p in pts]
    ax.plot(xs, [p["p50_ms"] for p in pts], marker=".", label="request N+1, p50 over conversations")
    if any(p.get("twin_p50_ms") is not None for p in pts):
        ax.plot(xs, [p.get("twin_p50_ms") for p in pts], color="gray", lw=0.8, label="its twin alone, p50")
    # the gateway's own time in the stages that grow with the history, stacked (Server-Timing, p50 per length)
    grows = sorted({name for p in pts for name in p.get("stage_p50_ms", {})})
    if grows:
        ax.stackplot(
            xs,
            *([p.get("stage_p50_ms", {}).get(name) or 0.0 for p in pts] for name in grows),
            labels=[f"{name} p50 (gateway's own)" for name in grows],
            alpha=0.35,
        )
    single = (length["single_turn_ms"] or {}).get("p50")
    if single:
        ax.axhline(single, color="gray", ls="--", label=f"single turn p50 ({single:.1f} ms)")
        ax.axhline(single * 1.2, color="red", ls=":", label="1.2x single turn")
    ax.set_xlabel("history turns N")
    ax.set_ylabel("overhead, ms")
    ax.set_title(f"cost against conversation length ({length['target']}, plain, c=1)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    if grows:  # between the stages at the bottom and the curves above
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.08))
    else:
        ax.legend(fontsize=8)
    # each request over its twin (the same new turn alone): what the history adds, without the turn mix
    for key, label in (("paired_ratio", "client's overhead"), ("gateway_paired_ratio", "gateway's own time")):
        ys = [p.get(key) for p in pts]
        if any(y is not None for y in ys):
            rx.plot(xs, ys, marker=".", lw=0.8, label=label)
    rx.axhline(1.0, color="gray", ls="--")
    rx.axhline(1.2, color="red", ls=":", label="1.2x")
    rx.set_xlabel("history turns N")
    rx.set_ylabel("request N+1 / its twin alone (median)")
    rx.set_title("per pair: the same new turn with and without its history", fontsize=10)
    rx.grid(alpha=0.3)
    rx.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir / "length.png", plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
