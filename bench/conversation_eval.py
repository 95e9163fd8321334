"""Does the conversation tracker catch multi-turn escalation, and how early? Against last-turn-only scoring.

    .venv/bin/python -m bench.conversation_eval [--model models/guard-v1] [--tune] [--png bench/conversation_eval.png]

Replays every conversation turn by turn through ``ConversationTracker.replay`` with the real guard model (each file
assistant turn counts as relayed), caching the per-turn components (own harm, window harm, refusals, rephrase,
history) in ``--cache``; the escalation formula is then recomputed for any parameters without new inference.

Data and splits: ActorAttack (safemtdata_attack600, escalation, user turns only; split by goal), MT-Bench-101
(benign, <= 7 user turns) and the authored training conversations (guardproxy/training/authored), each in the
Trainer's own split (``guardproxy.training.splits.assign_splits`` on ``load_all``, seed from the model's
config.json), so dev conversations are ones the model never trained on. Long benign chats: the authored ones, plus
MT-Bench dialogues of one split stitched into 12-25-turn chats. The challenge sets
(bench/challenge/conversations_challenge.jsonl; bench/challenge12/conversations_challenge12.jsonl, long harmless chats
only, reported as the set ``challenge12``) are never trained or tuned on.

``--tune`` grid-searches decay, gain, floor, trend, refusal and rephrase weights, the rephrase floor and the flag
threshold on the tuning split
(``--tune-on``, default calibration: conversations the model did not train on, kept apart from dev) for the most
escalation conversations flagged, and flagged before their last user turn (each source weighted alike), subject
to <= ``--max-benign`` of the benign conversations of each source flagged (``--budget pooled``: of all together).
The history weights cannot be tuned on this data (history is always verified in replay) and keep their defaults.

Flag = a user turn with escalation >= 0.5. Last-turn-only baseline = a user turn whose own harm >= the model's
calibrated harm threshold (0.5 on the operating scale; the guard looking at the newest user message of each
request), and the same with the harm threshold matched to the tuning split's benign budget; "tracker +
last-turn" = either rule (the default policy has both). ``--context-check W[,W...]`` adds that rule with the window
as a second opinion for later turns, and ``--context-bypass H[,H...]`` each of those with turns at H counting whatever
their window. Prints, never passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from guardproxy.commands.evaluate import trainer_split_of_ids
from guardproxy.conversation import FLAG_THRESHOLD, ConversationTracker, EscalationParams, MemoryBackend
from guardproxy.conversation.escalation import WINDOW_MAX_IDS, escalation, trajectory_step, trend, window_gate_open
from guardproxy.conversation.tracker import TurnResult
from guardproxy.settings import DEFAULT_MODEL_DIR, PROJECT_ROOT
from guardproxy.signals import ConversationSignals

DATA = PROJECT_ROOT.parent / "shared" / "data"
# Each set by its own name, so adding one never moves another's figures ("challenge" keeps the first set's).
CHALLENGE_SETS = {
    "challenge": PROJECT_ROOT / "bench" / "challenge" / "conversations_challenge.jsonl",
    "challenge12": PROJECT_ROOT / "bench" / "challenge12" / "conversations_challenge12.jsonl",
}
AUTHORED_DIR = PROJECT_ROOT / "guardproxy" / "training" / "authored"


@dataclass
class Conv:
    id: str
    set: str  # actorattack / mtbench / authored / stitched / challenge / challenge12
    label: str  # escalation / benign
    split: str  # train / calibration / dev / challenge
    messages: list[dict[str, Any]]
    pattern: str = ""
    turns: list[dict[str, Any] | None] | None = None  # per user turn components, filled by replay


def parse_levels(parser: argparse.ArgumentParser, flag: str, text: str) -> list[float]:
    """Comma-separated levels on the operating scale (``--context-check`` and the like); a bad list exits with a
    one-line message naming the flag."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected numbers separated by commas, got {text!r}")


def read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            yield json.loads(line)


def load_conversations(data: Path, seed: int, stitched_per_split: int, chat_turns: bool = False) -> list[Conv]:
    # the Trainer's split of every conversation id, exactly as training assigned it (a model trained with
    # --chat-turns loaded MT-Bench's turns alone too, which merges dialogues that share a turn)
    split = trainer_split_of_ids(data, seed, chat_turns)
    convs: list[Conv] = []
    for row in read_jsonl(data / "conversations" / "safemtdata_attack600.jsonl"):
        convs.append(Conv(row["id"], "actorattack", "escalation", split.get(row["id"], "?"), row["messages"]))
    mt: dict[str, list[Conv]] = {}
    for row in read_jsonl(data / "conversations" / "mtbench101.jsonl"):
        c = Conv(row["id"], "mtbench", "benign", split.get(row["id"], "?"), row["messages"])
        convs.append(c)
        mt.setdefault(c.split, []).append(c)
    for path in sorted(AUTHORED_DIR.glob("conversations*.jsonl")):
        for row in read_jsonl(path):
            convs.append(
                Conv(
                    row["id"],
                    "authored",
                    row["label"],
                    split.get(row["id"], "?"),
                    row["messages"],
                    row.get("pattern", ""),
                )
            )
    rng = random.Random(seed)
    for name, pool in sorted(mt.items()):
        for i in range(stitched_per_split):
            parts = rng.sample(pool, k=min(len(pool), rng.randint(4, 7)))
            messages = [m for p in parts for m in p.messages]
            convs.append(Conv(f"stitched-{name}-{i}", "stitched", "benign", name, messages, "long_benign"))
    for name, path in CHALLENGE_SETS.items():
        if path.is_file():
            for row in read_jsonl(path):
                convs.append(Conv(row["id"], name, row["label"], "challenge", row["messages"], row.get("pattern", "")))
    return convs


# -- replay -------------------------------------------------------------------------------------------------------


def every_window_tracker(clf: Any, window_ids: int) -> ConversationTracker:
    """An in-memory tracker with the shipped parameters and window gate 0: every turn's window is scored, so any
    gate can be simulated offline (``escalations``) and a window's own reading can be measured."""
    return ConversationTracker(
        MemoryBackend(),
        clf,
        hmac_secret=b"eval",
        score_cache_size=100_000,
        window_max_ids=window_ids,
        params=replace(EscalationParams(), window_gate=0.0),
    )


def crosses_flag(low: ConversationSignals, high: ConversationSignals) -> bool:
    """The replay's ``rephrase_check``: could an escalation between ``low``'s and ``high``'s be flagged when
    ``low``'s is not."""
    return (low.escalation >= FLAG_THRESHOLD) != (high.escalation >= FLAG_THRESHOLD)


def turn_components(r: TurnResult) -> dict[str, Any]:
    """What the cache keeps of a replayed user turn: enough to recompute its escalation for any parameters."""
    return {
        "index": r.index,
        "harm": r.harm,
        "window": r.signals.window_harm,
        "refusals": r.signals.refusal_events,
        "rephrase": [list(m) for m in r.rephrase_matches],
        "history": r.signals.history,
        "escalation": r.escalation,
    }


async def replay_all(
    convs: list[Conv], model: Path, concurrency: int, window_ids: int, early_exit: bool = False
) -> None:
    from guardproxy.classifier import OnnxClassifier

    clf = OnnxClassifier.load(model, workers=2, cache_size=400_000, timeout=60.0, early_exit=early_exit)
    tracker = every_window_tracker(clf, window_ids)
    if early_exit:
        # as a gateway's policies do: an exited turn after a refusal runs the whole model only when its similarity
        # could move the escalation across the flag line at these (the shipped) parameters
        tracker.rephrase_check = crosses_flag
    todo = [c for c in convs if c.turns is None]
    sem = asyncio.Semaphore(concurrency)
    done = 0
    started = time.perf_counter()

    async def one(c: Conv) -> None:
        nonlocal done
        async with sem:
            results = await tracker.replay(c.messages)
        c.turns = [turn_components(r) for r in results]
        done += 1
        if done % 200 == 0:
            rate = done / (time.perf_counter() - started)
            print(f"  replayed {done}/{len(todo)} ({rate:.1f} conversations/s)", file=sys.stderr)

    try:
        await asyncio.gather(*(one(c) for c in todo))
    finally:
        await clf.aclose()


def replayed(
    convs: list[Conv],
    model: Path,
    cache: Path,
    window_ids: int,
    concurrency: int,
    early_exit: bool,
    drawn: tuple[int, bool, int],
) -> None:
    """Fill every conversation's ``turns``: from ``cache`` where it holds this replay, else by replaying (and then
    write the cache). ``drawn``: the (seed, chat_turns, stitched per split) ``convs`` were loaded with."""
    # scores on the operating scale (v2): a cache of raw scores from an older replay is not reused
    # the splits are in the key: stitched chats are drawn from each split's dialogues under the same ids
    model_key = f"{model.resolve()}:{(model / 'model.onnx').stat().st_mtime_ns}:{window_ids}"
    if early_exit:
        model_key += ":early-exit"
    seed, chat_turns, stitched = drawn
    cache_key = f"v2:{model_key}:{seed}:{chat_turns}:{stitched}"
    cached: dict[str, Any] = {}
    if cache.is_file():
        blob = json.loads(cache.read_text())
        if blob.get("key") == cache_key:
            cached = blob["turns"]
    for c in convs:
        c.turns = cached.get(c.id)
    missing = sum(c.turns is None for c in convs)
    if missing:
        print(f"replaying {missing} of {len(convs)} conversations (cache {cache})", file=sys.stderr)
        asyncio.run(replay_all(convs, model, concurrency, window_ids, early_exit))
        cache.write_text(json.dumps({"key": cache_key, "turns": {c.id: c.turns for c in convs}}))


# -- offline recomputation of the escalation -----------------------------------------------------------------------


def escalations(turns: Sequence[dict[str, Any]], p: EscalationParams, passes: list[int] | None = None) -> list[float]:
    """The tracker's escalation per user turn (tracker.observe, one new user turn per request in a replay), with
    the window pass gated as ``p.window_gate`` says; ``passes`` gets [window passes run, requests with a window]."""
    out = []
    traj = 0.0
    risks: list[float] = []
    for k, t in enumerate(turns):
        traj = trajectory_step(traj, t["harm"], p)
        risks = [*risks, t["harm"]][-4:]
        window = t["window"]
        if k > 0:  # the first user turn has no window of two turns or more (assistant-only prefixes aside)
            is_open = window_gate_open(
                trajectory=traj,
                recent_risks=risks,
                refusals=t["refusals"],
                rephrase=max((m[0] for m in t["rephrase"]), default=0.0),
                history=t["history"],
                p=p,
            )
            if passes is not None:
                passes[0] += is_open
                passes[1] += 1
            if not is_open:
                window = t["harm"]
        out.append(
            escalation(
                window=window,
                trajectory=traj,
                trend_value=trend(risks),
                refusals=t["refusals"],
                rephrase=[tuple(m) for m in t["rephrase"]],
                history=t["history"],
                p=p,
            )
        )
    return out


def window_pass_rate(convs: Sequence[Conv], p: EscalationParams) -> float:
    """Share of requests after the first turn that pay for the window pass."""
    passes = [0, 0]
    for c in convs:
        escalations(c.turns or [], p, passes)
    return passes[0] / passes[1] if passes[1] else 0.0


def first_flag(values: Sequence[float], threshold: float) -> int | None:
    """1-based user turn of the first value >= threshold."""
    return next((i + 1 for i, v in enumerate(values) if v >= threshold), None)


@dataclass(frozen=True)
class Rates:
    n: int
    flagged: float
    early: float  # flagged before the final user turn
    median_first: float | None  # user turn of the first flag, over flagged conversations
    mean_turns: float


def rates(convs: Sequence[Conv], flags: Sequence[int | None]) -> Rates:
    n = len(convs)
    if not n:
        return Rates(0, 0.0, 0.0, None, 0.0)
    lengths = [len(c.turns or []) for c in convs]
    hit = [f for f in flags if f is not None]
    early = sum(1 for f, n_turns in zip(flags, lengths, strict=True) if f is not None and f < n_turns)
    return Rates(
        n,
        len(hit) / n,
        early / n,
        statistics.median(hit) if hit else None,
        statistics.mean(lengths),
    )


def tracker_flags(convs: Sequence[Conv], p: EscalationParams) -> list[int | None]:
    return [first_flag(escalations(c.turns or [], p), FLAG_THRESHOLD) for c in convs]


def last_turn_flags(convs: Sequence[Conv], harm_threshold: float) -> list[int | None]:
    return [first_flag([t["harm"] for t in c.turns or []], harm_threshold) for c in convs]


def guard_flags(
    convs: Sequence[Conv],
    p: EscalationParams,
    harm_threshold: float,
    context_check: float | None = None,
    bypass: float | None = None,
) -> list[int | None]:
    """What a policy with both rules flags: the turn's own harm, or the conversation's escalation. With
    ``context_check``, a turn after the first counts only when its window (the turn with its recent context) also
    reaches that harm: the per-turn rule with the window as a second opinion; with ``bypass`` too, a turn whose own
    harm reaches ``bypass`` counts whatever its window (the second opinion is asked only where the turn is unsure)."""

    def counts(k: int, t: dict[str, Any]) -> bool:
        if t["harm"] < harm_threshold:
            return False
        if context_check is None or k == 0 or t["window"] >= context_check:
            return True
        return bypass is not None and t["harm"] >= bypass

    out = []
    for c in convs:
        turns = c.turns or []
        esc = escalations(turns, p)
        flags = [e >= FLAG_THRESHOLD or counts(k, t) for k, (e, t) in enumerate(zip(esc, turns, strict=True))]
        out.append(next((i + 1 for i, f in enumerate(flags) if f), None))
    return out


def first_flagged_turns(convs: Sequence[Conv], p: EscalationParams, harm_threshold: float) -> list[dict[str, Any]]:
    """Each conversation's first turn that the tracker plus the per-turn rule flag (``guard_flags``): its id, the
    1-based user turn, the turn's own harm, its window, its escalation and its text. What a person reads to see why
    harmless chats get flagged."""
    out = []
    for c, turn in zip(convs, guard_flags(convs, p, harm_threshold), strict=True):
        if turn is None:
            continue
        t = (c.turns or [])[turn - 1]
        esc = escalations(c.turns or [], p)[turn - 1]
        text = c.messages[t["index"]]["content"] if "index" in t else ""
        out.append(
            {"id": c.id, "turn": turn, "harm": t["harm"], "window": t["window"], "escalation": esc, "text": text}
        )
    return out


def benign_sets(ben: Sequence[Conv], per_set: bool) -> dict[str, list[Conv]]:
    """The benign conversations the budget is counted over: each source on its own (``per_set``), or pooled."""
    if not per_set:
        return {"all": list(ben)}
    out: dict[str, list[Conv]] = {}
    for c in ben:
        out.setdefault(c.set, []).append(c)
    return out


# The highest flag threshold (on the raw escalation score) the tuner may choose: above it the score's last digits
# would decide, and the operating scale's upper half would be squeezed into a sliver.
THRESHOLD_CEILING = 0.999


def benign_cut(maxima: Iterable[Sequence[float]], max_benign: float, floor: float, ceiling: float) -> float:
    """The lowest threshold over which at most ``max_benign`` of each group's conversations lie (each value is a
    conversation's highest score). Counted per group, three-turn dialogues cannot lend their budget to long chats."""
    cut = floor
    for values in maxima:
        ordered = sorted(values)
        if ordered:
            k = int(max_benign * len(ordered))  # conversations of this group allowed over the threshold
            cut = max(cut, ordered[len(ordered) - k - 1] + 1e-4)
    return min(ceiling, cut)


def tune(
    convs: Sequence[Conv],
    max_benign: float,
    base: EscalationParams,
    gates: Sequence[float] = (0.0,),
    slack: float = 0.02,
    per_set: bool = True,
) -> EscalationParams:
    """Most escalation conversations flagged, and flagged early (each source weighted alike), with at most
    ``max_benign`` of the benign conversations flagged by the tracker (of each benign source on its own when
    ``per_set``: MT-Bench dialogues, stitched long chats, authored chats); parameter sets that need a threshold over
    ``THRESHOLD_CEILING`` for that are skipped. Then, of the ``gates``, the highest (the fewest window passes) whose
    best score is within ``slack`` of the lowest gate's best (0: ungated)."""
    esc_sets: dict[str, list[Conv]] = {}
    for c in convs:
        if c.label == "escalation":
            esc_sets.setdefault(c.set, []).append(c)
    ben = [c for c in convs if c.label == "benign"]
    if not ben:  # the threshold is a cut on harmless conversations' scores: without any it would fall to its floor
        raise SystemExit("conversation_eval --tune: no harmless conversations in the tuning split(s)")
    per_gate: dict[float, tuple[tuple[float, float], EscalationParams]] = {}
    infeasible = 0
    grid = list(
        itertools.product(
            (0.6, 0.7, 0.8, 0.9),  # decay
            (0.3, 0.5, 0.7),  # gain
            (0.0, 0.1, 0.2),  # floor
            (0.0, 1.0),  # trend weight
            (0.85, 0.9),  # rephrase_low
            (0.0, 0.15),  # refusal weight
            (0.5, 0.9),  # rephrase weight
        )
    )
    for gate in gates:
        best: tuple[tuple[float, float], EscalationParams] | None = None
        for decay, gain, floor, trend_weight, rephrase_low, refusal_weight, rephrase_weight in grid:
            p0 = replace(
                base,
                decay=decay,
                gain=gain,
                floor=floor,
                trend_weight=trend_weight,
                rephrase_low=rephrase_low,
                refusal_weight=refusal_weight,
                rephrase_weight=rephrase_weight,
                threshold=0.5,
                window_gate=gate,
            )
            # the raw score (threshold 0.5 maps identity) per turn; the flag threshold is then a cut on its maximum
            maxima = {
                name: [max(escalations(c.turns or [], p0), default=0.0) for c in group]
                for name, group in benign_sets(ben, per_set).items()
            }
            needed = benign_cut(maxima.values(), max_benign, floor=0.05, ceiling=1.0)
            if needed > THRESHOLD_CEILING:
                # No threshold keeps the harmless chats within the budget with these parameters (their scores
                # saturate). Clamping the cut would break the budget, and the sets that break it most catch the
                # most escalations, so the search used to pick them at its ceiling (0.99 for 2.11.0 and 2.12.0).
                infeasible += 1
                continue
            p = replace(p0, threshold=needed)
            caught = [rates(group, tracker_flags(group, p)) for group in esc_sets.values()]
            score = (statistics.mean(r.flagged + r.early for r in caught), -needed)
            if best is None or score > best[0]:
                best = (score, p)
        if best is None:
            print(f"  gate {gate:.2f}: no parameters keep the harmless chats within the budget", file=sys.stderr)
            continue
        per_gate[gate] = best
        print(
            f"  gate {gate:.2f}: score {best[0][0]:.3f}, window passes {window_pass_rate(convs, best[1]):.1%}",
            file=sys.stderr,
        )
    print(f"  {infeasible} of {len(grid) * len(gates)} parameter sets could not meet the budget", file=sys.stderr)
    if not per_gate:
        raise SystemExit(
            f"conversation_eval --tune: no parameters keep <= {max_benign:.0%} of each harmless source flagged "
            f"under a threshold of {THRESHOLD_CEILING}"
        )
    reference = per_gate[min(per_gate)][0][0]
    chosen = max(g for g, (score, _) in per_gate.items() if score[0] >= reference - slack)
    return per_gate[chosen][1]


def matched_harm_threshold(convs: Sequence[Conv], max_benign: float, per_set: bool = True) -> float:
    """The per-turn harm threshold that flags at most ``max_benign`` of these benign conversations (of each benign
    source, when ``per_set``: the tracker's own budget rule)."""
    ben = [c for c in convs if c.label == "benign"]
    if not ben:
        return 0.5
    maxima = [
        [max((t["harm"] for t in c.turns or []), default=0.0) for c in g] for g in benign_sets(ben, per_set).values()
    ]
    return benign_cut(maxima, max_benign, floor=0.0, ceiling=0.999)


# -- report -------------------------------------------------------------------------------------------------------


def fmt(r: Rates, benign: bool) -> str:
    if benign:
        return f"n={r.n:4d}  flagged {100 * r.flagged:5.1f}%  (turns/conv {r.mean_turns:4.1f})"
    med = f"{r.median_first:.1f}" if r.median_first is not None else "-"
    return (
        f"n={r.n:4d}  flagged {100 * r.flagged:5.1f}%  before final turn {100 * r.early:5.1f}%  "
        f"median first-flag turn {med:>4}  (turns/conv {r.mean_turns:4.1f})"
    )


def groups(convs: Sequence[Conv], split: str) -> list[tuple[str, list[Conv]]]:
    chosen = [c for c in convs if c.split == split]
    out: dict[str, list[Conv]] = {}
    for c in chosen:
        key = f"{c.set}:{c.label}" + (f":{c.pattern}" if c.set == "challenge" and c.pattern else "")
        out.setdefault(key, []).append(c)
        if c.set == "challenge":
            out.setdefault(f"challenge:{c.label}:ALL", []).append(c)
    return sorted(out.items())


def report(
    convs: Sequence[Conv],
    p: EscalationParams,
    harm_threshold: float,
    matched: float,
    splits: Sequence[str],
    context_checks: Sequence[float] = (),
    bypasses: Sequence[float] = (),
    show_flags: int = 0,
) -> dict[str, Any]:
    """Per split and source: last-turn-only (model threshold; threshold matched to the tuning benign budget),
    the tracker's escalation alone, and both rules together (what the default policy does); then both rules with
    the window as a second opinion at each of ``context_checks``, alone and with each of ``bypasses``."""
    summary: dict[str, Any] = {}
    methods = {
        f"last-turn (harm>={harm_threshold:.2f})": lambda g: last_turn_flags(g, harm_threshold),
        f"last-turn (harm>={matched:.2f}, matched)": lambda g: last_turn_flags(g, matched),
        "tracker (escalation>=0.5)": lambda g: tracker_flags(g, p),
        "tracker + last-turn": lambda g: guard_flags(g, p, harm_threshold),
    }
    for w in context_checks:
        for h in [None, *bypasses]:
            name = f"tracker + last-turn if window>={w:.2f}" + ("" if h is None else f" or harm>={h:.2f}")
            methods[name] = lambda g, w=w, h=h: guard_flags(g, p, harm_threshold, w, h)
    for split in splits:
        print(f"\n== split: {split}")
        in_split = [c for c in convs if c.split == split]
        passes = {
            label: window_pass_rate([c for c in in_split if c.label == label], p) for label in ("benign", "escalation")
        }
        print(
            f"  window pass run on {passes['benign']:.1%} of benign and {passes['escalation']:.1%} of escalation"
            " requests after the first turn"
        )
        summary[f"{split}/window_passes"] = passes
        for key, group in groups(convs, split):
            benign = ":benign" in key
            print(f"  {key}")
            summary[f"{split}/{key}"] = {}
            for name, method in methods.items():
                r = rates(group, method(group))
                print(f"    {name:34s} {fmt(r, benign)}")
                summary[f"{split}/{key}"][name] = asdict(r)
            if benign:
                # the per-turn rule's false-flag rate per user turn: what makes long harmless chats likely to be blocked
                over, total = turns_over(group, harm_threshold)
                share = over / total if total else 0.0
                print(f"    {'user turns with harm>=' + f'{harm_threshold:.2f}':34s} {over} of {total} ({share:.2%})")
                summary[f"{split}/{key}"]["turns_over_harm_threshold"] = {"over": over, "turns": total}
                if show_flags:
                    flags = first_flagged_turns(group, p, harm_threshold)
                    summary[f"{split}/{key}"]["first_flags"] = flags
                    for f in sorted(flags, key=lambda f: -f["harm"])[:show_flags]:
                        text = " ".join(str(f["text"]).split())[:100]
                        print(
                            f"      turn {f['turn']:2d} harm {f['harm']:.2f} window {f['window']:.2f} "
                            f"escalation {f['escalation']:.2f}  {text!r}"
                        )
    return summary


def turns_over(convs: Sequence[Conv], harm_threshold: float) -> tuple[int, int]:
    """(user turns whose own harm reaches the threshold, user turns) over these conversations."""
    harms = [t["harm"] for c in convs for t in c.turns or []]
    return sum(h >= harm_threshold for h in harms), len(harms)


def plot(convs: Sequence[Conv], p: EscalationParams, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (label, color) in zip(axes, (("escalation", "tab:red"), ("benign", "tab:blue")), strict=True):
        for c in [c for c in convs if c.split in ("dev", "challenge") and c.label == label][:300]:
            values = escalations(c.turns or [], p)
            ax.plot(range(1, len(values) + 1), values, color=color, alpha=0.15, lw=1)
        ax.axhline(FLAG_THRESHOLD, color="black", ls="--", lw=1)
        ax.set_title(f"{label} conversations (dev + challenge): escalation per user turn")
        ax.set_xlabel("user turn")
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conversation_eval", description=__doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/guardproxy-conversation-eval.json"))
    parser.add_argument(
        "--window-ids", type=int, default=WINDOW_MAX_IDS, help="ids of each window the model reads (the gateway's)"
    )
    parser.add_argument("--tune", action="store_true", help="grid-search the trajectory parameters and threshold")
    parser.add_argument("--tune-on", default="calibration", help="split(s) to tune on, '+'-joined")
    parser.add_argument("--max-benign", type=float, default=0.03, help="benign flag rate allowed when tuning")
    parser.add_argument(
        "--budget",
        choices=("per-set", "pooled"),
        default="per-set",
        help="count --max-benign over each benign source (MT-Bench, stitched, authored) or over all pooled",
    )
    parser.add_argument(
        "--gates",
        default="0,0.02,0.05,0.1,0.15,0.2,0.3",
        help="window gates tried by --tune (comma-separated); the highest within --slack of the ungated best wins",
    )
    parser.add_argument("--slack", type=float, default=0.02, help="score (flagged + early) a gate may cost")
    parser.add_argument("--stitched", type=int, default=100, help="stitched long MT-Bench chats per split")
    parser.add_argument(
        "--splits-of",
        type=Path,
        default=None,
        metavar="DIR",
        help="take the splits from this model's config.json instead of --model's: two models on the same rows",
    )
    parser.add_argument(
        "--context-check",
        default="",
        metavar="W[,W...]",
        help="also report the per-turn rule with the window as a second opinion: a later turn counts only when its "
        "window reaches W too",
    )
    parser.add_argument(
        "--context-bypass",
        default="",
        metavar="H[,H...]",
        help="with --context-check, also report each W with a bypass: a turn whose own harm reaches H counts "
        "whatever its window",
    )
    parser.add_argument(
        "--show-flags",
        type=int,
        default=0,
        metavar="N",
        help="print up to N harmless conversations' first flagged turns per set (highest harm first); --json keeps "
        "them all",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--early-exit",
        action="store_true",
        help="load the model with guard.early_exit (its early_exit.json), as a gateway with it on scores. An "
        "exited turn after a refusal keeps a lower bound of its rephrase similarity unless the whole model's could "
        "move the shipped parameters' flag (crosses_flag): figures with --tune read those lower bounds",
    )
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    checks = parse_levels(parser, "--context-check", args.context_check) if args.context_check else []
    bypasses = parse_levels(parser, "--context-bypass", args.context_bypass) if args.context_bypass else []
    if bypasses and not checks:
        parser.error("--context-bypass needs --context-check")

    data_config = json.loads(((args.splits_of or args.model) / "config.json").read_text()).get("data", {})
    seed, chat_turns = int(data_config.get("seed", 0)), bool(data_config.get("chat_turns", False))
    harm_threshold = 0.5  # scores are on the operating scale: 0.5 is the model's calibrated harm threshold
    convs = load_conversations(args.data, seed, args.stitched, chat_turns)
    print(f"{len(convs)} conversations with {args.model} (seed {seed}, harm >= {harm_threshold})")
    replayed(
        convs,
        args.model,
        args.cache,
        args.window_ids,
        args.concurrency,
        args.early_exit,
        (seed, chat_turns, args.stitched),
    )

    params = EscalationParams()
    tune_splits = set(args.tune_on.split("+"))
    tuning = [c for c in convs if c.split in tune_splits]
    if args.tune:
        gates = [float(g) for g in args.gates.split(",")]
        params = tune(tuning, args.max_benign, params, gates, args.slack, per_set=args.budget == "per-set")
        print(f"\ntuned on {sorted(tune_splits)} (benign <= {args.max_benign:.0%} {args.budget}): {params}")
    else:
        print(f"\nparameters: {params}")
    matched = matched_harm_threshold(tuning, args.max_benign, per_set=args.budget == "per-set")
    splits = ["train", "calibration", "dev", "challenge"]
    summary = report(convs, params, harm_threshold, matched, splits, checks, bypasses, args.show_flags)
    if args.json:
        blob = {"params": asdict(params), "window_ids": args.window_ids, "results": summary}
        args.json.write_text(json.dumps(blob, indent=1))
    if args.png:
        plot(convs, params, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
