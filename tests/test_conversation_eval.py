"""The escalation tuner's benign budget (``bench.conversation_eval``): counted per benign source, so a pile of
short harmless dialogues cannot lend its budget to the long harmless chats that a tracker finds hardest."""

from __future__ import annotations

import dataclasses

import pytest

from bench.asks_after_chat import requests, summary
from bench.conversation_eval import (
    Conv,
    benign_cut,
    benign_sets,
    first_flagged_turns,
    groups,
    guard_flags,
    tracker_flags,
    tune,
    turns_over,
)
from guardproxy.conversation import EscalationParams


def _conv(cid: str, source: str) -> Conv:
    return Conv(cid, source, "benign", "calibration", [])


def test_a_cut_per_source_keeps_each_source_within_the_budget() -> None:
    short = [0.1 + 0.001 * i for i in range(100)]  # 100 three-turn dialogues, all low
    long = [0.2, 0.3, 0.6, 0.7, 0.8]  # five long chats, three of them high

    pooled = benign_cut([short + long], 0.03, floor=0.05, ceiling=0.99)
    per_source = benign_cut([short, long], 0.03, floor=0.05, ceiling=0.99)

    # pooled, 3 of 105 may lie over the cut: all three are long chats, so 60% of the long chats are flagged
    assert sum(v >= pooled for v in long) == 3
    # per source, 3% of five chats is none of them
    assert per_source > max(long)
    assert sum(v >= per_source for v in short) == 0


def test_each_challenge_set_is_reported_on_its_own() -> None:
    """A new challenge set gets its own rows, so the first set's figures (and its ALL rows) mean what they did."""
    convs = [
        Conv("a", "challenge", "benign", "challenge", [], "long_benign"),
        Conv("b", "challenge", "escalation", "challenge", [], "crescendo"),
        Conv("c", "challenge12", "benign", "challenge", [], "long_benign"),
        Conv("d", "challenge12", "benign", "challenge", [], "long_benign"),
    ]
    got = {key: [c.id for c in cs] for key, cs in groups(convs, "challenge")}
    assert got["challenge12:benign"] == ["c", "d"]
    assert got["challenge:benign:ALL"] == ["a"]
    assert got["challenge:benign:long_benign"] == ["a"]
    assert got["challenge:escalation:ALL"] == ["b"]


def test_the_cut_stays_within_its_floor_and_ceiling() -> None:
    assert benign_cut([[0.0, 0.01]], 0.03, floor=0.05, ceiling=0.99) == 0.05
    assert benign_cut([[0.995]], 0.03, floor=0.05, ceiling=0.99) == 0.99
    assert benign_cut([], 0.03, floor=0.05, ceiling=0.99) == 0.05


def test_benign_sets_group_by_source_or_pool() -> None:
    convs = [_conv("a", "mtbench"), _conv("b", "stitched"), _conv("c", "mtbench")]
    assert {k: [c.id for c in v] for k, v in benign_sets(convs, per_set=True).items()} == {
        "mtbench": ["a", "c"],
        "stitched": ["b"],
    }
    assert [c.id for c in benign_sets(convs, per_set=False)["all"]] == ["a", "b", "c"]


def _turn(harm: float, window: float) -> dict[str, object]:
    return {"harm": harm, "window": window, "refusals": 0, "rephrase": [], "history": "verified"}


def test_the_tuner_refuses_parameters_whose_harmless_chats_no_threshold_can_clear() -> None:
    # a harmless chat whose window reads 1.0 from its second turn on: with the window always run (gate 0), no
    # threshold under the ceiling keeps it unflagged, whatever the trajectory parameters
    benign = Conv("b", "stitched", "benign", "calibration", [], turns=[_turn(0.2, 0.2), _turn(0.2, 1.0)])
    attack = Conv("e", "actorattack", "escalation", "calibration", [], turns=[_turn(0.35, 0.35), _turn(0.35, 1.0)])
    with pytest.raises(SystemExit, match="no parameters keep"):
        tune([benign, attack], 0.03, EscalationParams(), gates=(0.0,))

    # a gate that skips the window on the harmless chat (its turns stay under 0.3) makes the budget reachable
    p = tune([benign, attack], 0.03, EscalationParams(), gates=(0.0, 0.3))
    assert p.window_gate == 0.3 and p.threshold <= 0.999
    assert tracker_flags([benign], p) == [None]
    assert tracker_flags([attack], p) != [None]


def test_the_window_as_a_second_opinion_spares_a_later_turn_only_when_its_window_reads_low() -> None:
    p = EscalationParams()
    # a follow-up that reads harmful alone and harmless in context; a first turn has no context to ask
    follow_up = Conv("f", "stitched", "benign", "dev", [], turns=[_turn(0.0, 0.0), _turn(0.9, 0.05)])
    first = Conv("o", "stitched", "benign", "dev", [], turns=[_turn(0.9, 0.9), _turn(0.0, 0.0)])
    harmful_after_chat = Conv("h", "stitched", "benign", "dev", [], turns=[_turn(0.0, 0.0), _turn(0.9, 0.6)])
    convs = [follow_up, first, harmful_after_chat]
    assert guard_flags(convs, p, 0.5) == [2, 1, 2]
    assert guard_flags(convs, p, 0.5, context_check=0.3) == [None, 1, 2]


def test_a_bypass_keeps_the_turns_the_model_is_sure_of_whatever_their_window() -> None:
    # a tracker threshold these turns' escalation stays under, whatever the shipped model's tuned default is
    p = dataclasses.replace(EscalationParams(), threshold=0.99)
    sure = Conv("s", "stitched", "benign", "dev", [], turns=[_turn(0.0, 0.0), _turn(0.97, 0.05)])
    unsure = Conv("u", "stitched", "benign", "dev", [], turns=[_turn(0.0, 0.0), _turn(0.7, 0.05)])
    convs = [sure, unsure]
    assert guard_flags(convs, p, 0.5, context_check=0.3) == [None, None]
    assert guard_flags(convs, p, 0.5, context_check=0.3, bypass=0.95) == [2, None]
    assert guard_flags(convs, p, 0.5, context_check=0.3, bypass=0.6) == [2, 2]
    # the bypass only adds back turns at the harm threshold: it never flags a turn under it
    assert guard_flags(convs, p, 0.98, context_check=0.3, bypass=0.6) == [None, None]


def test_asks_after_chat_puts_each_ask_after_whole_exchanges_and_counts_turn_window_and_both() -> None:
    chat = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    rows = [{"prompt": f"ask {i}", "label": "harmful" if i % 2 else "benign"} for i in range(40)]
    convs = requests(rows, [chat], seed=0)
    assert convs == requests(rows, [chat], seed=0)  # seeded: two models see the same requests
    for row, conv in zip(rows, convs, strict=True):
        assert conv[-1] == {"role": "user", "content": row["prompt"]}
        assert conv[:-1] in (chat[:2], chat)  # one or two whole exchanges (the chat has two), ending at a reply
    scores = [(0.9, 0.6), (0.9, 0.2), (0.1, 0.7), (0.6, 0.6)] * 10  # rows alternate benign, harmful
    got = summary(rows, scores, checks=(0.5, 0.1))
    assert got["harmless"] == {"n": 20, "turn": 0.5, "window": 1.0, "both@0.5": 0.5, "both@0.1": 0.5}
    assert got["harmful"] == {"n": 20, "turn": 1.0, "window": 0.5, "both@0.5": 0.5, "both@0.1": 1.0}
    # with a bypass at 0.8 the harmful (0.9, 0.2) rows count at W = 0.5 too, while the harmless (0.1, 0.7) rows
    # stay out: their turn is under the operating point
    got = summary(rows, scores, checks=(0.5,), bypasses=(0.8,))
    assert got["harmful"]["both@0.5|0.8"] == 1.0
    assert got["harmless"]["both@0.5|0.8"] == 0.5


def test_turns_over_counts_every_user_turn_of_every_conversation() -> None:
    a = Conv("a", "stitched", "benign", "dev", [], turns=[_turn(0.6, 0.0), _turn(0.1, 0.0), _turn(0.5, 0.9)])
    b = Conv("b", "mtbench", "benign", "dev", [], turns=[_turn(0.49, 0.9)])
    assert turns_over([a, b], 0.5) == (2, 4)
    assert turns_over([], 0.5) == (0, 0)


def test_first_flagged_turns_name_the_turn_its_scores_and_its_text() -> None:
    p = EscalationParams()
    messages = [
        {"role": "user", "content": "what is a good name for a cat"},
        {"role": "assistant", "content": "Miso."},
        {"role": "user", "content": "What's the best way to store medications at home?"},
    ]
    turns = [dict(_turn(0.0, 0.0), index=0), dict(_turn(0.96, 0.03), index=2)]
    flagged = Conv("f", "stitched", "benign", "dev", messages, turns=turns)
    clean = Conv("c", "stitched", "benign", "dev", messages[:1], turns=[dict(_turn(0.1, 0.1), index=0)])
    got = first_flagged_turns([flagged, clean], p, 0.5)
    assert len(got) == 1
    assert got[0]["id"] == "f" and got[0]["turn"] == 2
    assert (got[0]["harm"], got[0]["window"]) == (0.96, 0.03)
    assert got[0]["text"] == "What's the best way to store medications at home?"
