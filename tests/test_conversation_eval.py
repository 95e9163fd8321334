"""The escalation tuner's benign budget (``bench.conversation_eval``): counted per benign source, so a pile of
short harmless dialogues cannot lend its budget to the long harmless chats that a tracker finds hardest."""

from __future__ import annotations

from bench.conversation_eval import Conv, benign_cut, benign_sets


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
