"""Averaging trained runs' weights (``guardproxy train --soup``), their shared start and the --device check; needs
the 'train' extra."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from guardproxy.training.loop import TrainConfig  # noqa: E402  (after the skip: these import torch)
from guardproxy.training.run import (  # noqa: E402
    RunOptions,
    average_weights,
    discard_unused_fp32,
    load_teacher,
    run_tokenizer,
    set_harm_threshold,
    start_model,
)


def test_floating_weights_are_averaged_and_integer_buffers_kept() -> None:
    a = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1, 2])}
    b = {"w": torch.tensor([3.0, 5.0]), "ids": torch.tensor([0, 1, 2])}
    out = average_weights([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["ids"], a["ids"]) and out["ids"].dtype == torch.int64


def test_runs_with_other_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="different weights"):
        average_weights([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="no weights"):
        average_weights([])


def _heads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def test_runs_that_share_an_init_seed_start_from_the_same_heads(tmp_path: Path) -> None:
    def start(seed: int, init_seed: int | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)  # as main() seeds torch with the training seed before building the model
        opts = RunOptions(data=tmp_path, out=tmp_path, layers=1, init_seed=init_seed, train=TrainConfig(seed=seed))
        return _heads(start_model(opts))

    shared = [start(seed, init_seed=0) for seed in (0, 1)]
    assert all(torch.equal(shared[0][k], shared[1][k]) for k in shared[0])
    own = [start(seed, init_seed=None) for seed in (0, 1)]
    assert not torch.equal(own[0]["harm.weight"], own[1]["harm.weight"])
    assert torch.equal(own[0]["harm.weight"], shared[0]["harm.weight"])  # init seed 0 is what seed 0 always drew


def test_train_refuses_a_device_this_torch_cannot_use_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guardproxy.cli import main

    assert main(["train", "--device", "nowhere", "--train-only", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--device nowhere: not usable here" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_soft_refusal_targets_reach_the_loss_and_one_hot_rows_train_as_before() -> None:
    from guardproxy.training.loop import _labels, multitask_loss
    from guardproxy.training.sources import Example

    def pair(refusal: int | None, target: tuple[float, float, float] | None = None) -> Example:
        return Example(
            text="q", reply="r", source="s", group="g", label="benign", refusal=refusal, refusal_target=target
        )

    batch = [pair(2), pair(1, (0.2, 0.5, 0.3)), pair(None)]
    y = _labels(batch)
    assert torch.allclose(y["refusal"], torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [1.0, 0.0, 0.0]]))
    assert torch.equal(y["refusal_w"], torch.tensor([1.0, 1.0, 0.0]))
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, -0.5], [0.0, 0.0, 0.0]])
    out = {k: torch.zeros(3) for k in ("harm", "jailbreak", "reply_harm")} | {
        "category": torch.zeros(3, 2),
        "refusal": logits,
    }
    y["category_w"] = torch.zeros(3)
    expected = (
        torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2]))
        - (torch.tensor([0.2, 0.5, 0.3]) * torch.log_softmax(logits[1], -1)).sum()
    ) / 2
    assert torch.allclose(multitask_loss(out, y)["refusal"], expected)


def test_the_cards_reproduce_command_carries_the_data_options(tmp_path: Path) -> None:
    from guardproxy.training.card import write_card

    kept = Path(__file__).resolve().parents[1] / "bench" / "results" / "candidates"
    metrics = json.loads((kept / "2.10.0.metrics.json").read_text())
    config = json.loads((kept / "2.10.0.config.json").read_text())
    lines, cards = {}, {}
    for balanced, targets in [(True, "t.json"), (False, None)]:
        config["data"]["end_punctuation_stripped"] = balanced  # what the trainer reads back off the tokenizer
        (tmp_path / "config.json").write_text(json.dumps(config))
        metrics["train"] |= {
            "balanced_rewords": balanced,
            "refusal_targets": targets,
            "chat_turns": balanced,
            "calibrate_by_kind": balanced,
            "strip_end_punctuation": balanced,
        }
        metrics["train"]["context_asks"] = 400 if balanced else 0
        metrics["train"]["terse_asks"] = 2400 if balanced else 0
        metrics["train"]["form_consistency"] = 0.2 if balanced else 0.0
        metrics["train"]["language_weights"] = balanced
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        write_card(tmp_path, loso=[], latency=None, compare=[])
        card = (tmp_path / "MODEL_CARD.md").read_text().splitlines()
        lines[balanced] = next(x for x in card if x.startswith("guardproxy train --data"))
        cards[balanced] = "\n".join(card)
    expected = (
        "--balanced-rewords --context-asks 400 --terse-asks 2400 --form-consistency 0.2 --language-weights "
        "--refusal-targets t.json --chat-turns --strip-end-punctuation --calibrate-by-kind"
    )
    assert f"{expected} --model-version" in lines[True]
    flags = ("--balanced-rewords", "--context-asks", "--terse-asks", "--refusal-targets", "--chat-turns")
    flags += ("--calibrate-by-kind", "--form-consistency", "--language-weights", "--strip-end-punctuation")
    assert all(f not in lines[False] for f in flags)
    # the known limits say the tokenizer drops the closing mark only for a model whose tokenizer does
    assert "that end each line" in cards[True] and "that end each line" not in cards[False]


def test_a_harm_threshold_set_by_hand_replaces_the_calibrated_one_and_keeps_the_block_level_above_it() -> None:
    calibrated = {"harm": 0.24, "harm_high": 0.949, "jailbreak": 0.5, "reply_harm": 0.4, "refusal_partial": 0.42}
    assert set_harm_threshold(calibrated, 0.35) == {**calibrated, "harm": 0.35}
    assert set_harm_threshold(calibrated, 0.97)["harm_high"] == 0.97
    assert calibrated["harm"] == 0.24  # the calibrated thresholds are not changed in place


def test_the_card_says_when_the_harm_threshold_was_set_rather_than_calibrated(tmp_path: Path) -> None:
    from guardproxy.training.card import write_card

    kept = Path(__file__).resolve().parents[1] / "bench" / "results" / "candidates"
    metrics = json.loads((kept / "2.10.0.metrics.json").read_text())
    config = json.loads((kept / "2.10.0.config.json").read_text())
    calibrated = metrics["thresholds"]["harm"]
    cards = {}
    for harm in (None, 0.35):
        metrics["train"]["harm_threshold"] = harm
        metrics["harm_threshold_calibrated"] = calibrated
        metrics["thresholds"]["harm"] = config["thresholds"]["harm"] = calibrated if harm is None else harm
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / "config.json").write_text(json.dumps(config))
        write_card(tmp_path, loso=[], latency=None, compare=[])
        cards[harm] = (tmp_path / "MODEL_CARD.md").read_text()
    assert "set, not calibrated" not in cards[None] and "--harm-threshold" not in cards[None]
    assert "flag 0.35 (set, not calibrated)" in cards[0.35]
    said = f"set to 0.35 by hand (`--harm-threshold`), not calibrated**: the rule above chose {calibrated}"
    assert said in cards[0.35]
    reproduce = next(x for x in cards[0.35].splitlines() if x.startswith("guardproxy train --data"))
    assert "--harm-threshold 0.35" in reproduce


def test_the_cards_reproduce_command_names_a_teacher_by_version_and_checks_it_out_from_git(tmp_path: Path) -> None:
    import subprocess

    from guardproxy.training.card import write_card

    root = Path(__file__).resolve().parents[1]
    kept = root / "bench" / "results" / "candidates"
    metrics = json.loads((kept / "2.10.0.metrics.json").read_text())
    (tmp_path / "config.json").write_text((kept / "2.10.0.config.json").read_text())
    teacher = {
        "teacher": "/tmp/wt/models/guard-v1",
        "distill": 0.5,
        "distill_heads": ["harm", "jailbreak", "category"],
        "teacher_defers": ["authored/a", "authored/b"],
    }
    cards = {}
    for recorded in (False, True):
        metrics["train"] |= teacher | {"teacher_model": {"version": "2.24.0", "md5": "abc"} if recorded else None}
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        write_card(tmp_path, loso=[], latency=None, compare=[])
        cards[recorded] = (tmp_path / "MODEL_CARD.md").read_text().splitlines()
    flags = "--distill 0.5 --distill-heads harm,jailbreak,category --teacher-defers authored/a,authored/b"
    reproduce = next(x for x in cards[False] if x.startswith("guardproxy train --data"))
    assert f"--teacher /tmp/wt/models/guard-v1 {flags}" in reproduce  # no identity recorded: the path it was read from
    assert not any(x.startswith("git worktree add") for x in cards[False])
    reproduce = next(x for x in cards[True] if x.startswith("guardproxy train --data"))
    assert f"--teacher /tmp/teacher-2.24.0/models/guard-v1 {flags}" in reproduce
    assert "# --teacher: guard-v1 2.24.0 (model.onnx md5 abc)" in "\n".join(cards[True])
    checkout = next(x for x in cards[True] if x.startswith("git worktree add /tmp/teacher-2.24.0 "))
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=root, capture_output=True)
    if shallow.stdout != b"false\n":
        pytest.skip("the checkout line is resolved against the full history of a git clone")
    # the commit the card's line names holds 2.24.0, which this repo shipped and later replaced
    resolve = "git rev-parse " + checkout.split(" ", 4)[4]
    commit = subprocess.run(["bash", "-c", resolve], cwd=root, capture_output=True, text=True, check=True).stdout[:40]
    shipped = subprocess.run(
        ["git", "show", f"{commit}:models/guard-v1/config.json"], cwd=root, capture_output=True, text=True, check=True
    )
    assert json.loads(shipped.stdout)["version"] == "2.24.0"


def test_the_card_names_both_seeds_and_does_not_call_a_rescoring_the_whole_run(tmp_path: Path) -> None:
    from guardproxy.training.card import write_card

    kept = Path(__file__).resolve().parents[1] / "bench" / "results" / "candidates"
    metrics = json.loads((kept / "2.10.0.metrics.json").read_text())
    config = json.loads((kept / "2.10.0.config.json").read_text())
    metrics["train_config"]["seed"], config["data"]["seed"] = 1, 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    cards = {}
    for eval_only in (False, True):
        metrics["options"]["eval_only"] = eval_only
        metrics["seconds"] = 330.0
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
        write_card(tmp_path, loso=[], latency=None, compare=[])
        cards[eval_only] = (tmp_path / "MODEL_CARD.md").read_text()
    assert "`guardproxy train` (training seed 1, split seed 0)" in cards[False]
    assert "(incl. export, calibration, scoring) 5.5 min." in cards[False]
    assert "(incl. export" not in cards[True]
    assert "whole run\nnot recorded; these metrics come from a re-scoring (`--eval-only`), 5.5 min." in cards[True]


def test_the_cards_balance_line_lists_only_the_caps_of_sources_the_run_loaded(tmp_path: Path) -> None:
    from guardproxy.training.card import write_card

    kept = Path(__file__).resolve().parents[1] / "bench" / "results" / "candidates"
    (tmp_path / "metrics.json").write_text((kept / "2.10.0.metrics.json").read_text())
    config = json.loads((kept / "2.10.0.config.json").read_text())
    balance = {}
    for chat_turns in (False, True):
        if chat_turns:
            config["data"]["sources"]["mtbench101_turns"] = 3165
        (tmp_path / "config.json").write_text(json.dumps(config))
        write_card(tmp_path, loso=[], latency=None, compare=[])
        card = (tmp_path / "MODEL_CARD.md").read_text().splitlines()
        balance[chat_turns] = next(x for x in card if x.startswith("Balance:"))
    assert "mtbench101 700" in balance[False] and "mtbench101_turns" not in balance[False]
    assert "mtbench101_turns 700" in balance[True]


def test_the_cards_leave_one_out_commands_carry_their_runs_data_options(tmp_path: Path) -> None:
    from guardproxy.training.card import write_card

    root = Path(__file__).resolve().parents[1] / "bench" / "results"
    (tmp_path / "metrics.json").write_text((root / "candidates" / "2.10.0.metrics.json").read_text())
    (tmp_path / "config.json").write_text((root / "candidates" / "2.10.0.config.json").read_text())
    loso = json.loads((root / "loso" / "advbench.metrics.json").read_text())
    lines = {}
    for balanced, chat_turns in ((True, False), (False, False), (True, True)):
        loso["train"]["balanced_rewords"] = balanced
        loso["train"]["chat_turns"] = chat_turns
        (tmp_path / "loso.json").write_text(json.dumps(loso))
        write_card(tmp_path, loso=[tmp_path / "loso.json"], latency=None, compare=[])
        card = (tmp_path / "MODEL_CARD.md").read_text().splitlines()
        lines[balanced, chat_turns] = next(x for x in card if x.startswith("guardproxy train --cheap"))
    assert "--max-steps 250 --balanced-rewords --out /tmp/loso-advbench" in lines[True, False]
    assert "--balanced-rewords" not in lines[False, False]
    assert "--max-steps 250 --balanced-rewords --chat-turns --out /tmp/loso-advbench" in lines[True, True]


def test_a_rescoring_without_the_fp32_comparison_keeps_the_trained_runs_fp32_graph(tmp_path: Path) -> None:
    graph = tmp_path / "model-fp32.onnx"
    for eval_only, fp32_compare, kept in [
        (True, False, True),
        (True, True, True),
        (False, True, True),
        (False, False, False),
    ]:
        graph.write_bytes(b"graph")
        discard_unused_fp32(
            RunOptions(data=tmp_path, out=tmp_path, eval_only=eval_only, fp32_compare=fp32_compare), graph
        )
        assert graph.exists() == kept, (eval_only, fp32_compare)


def test_the_run_tokenizer_is_the_models_own_and_agrees_with_strip_end_punctuation(tmp_path: Path) -> None:
    from guardproxy.encoding import drops_end_punctuation, load_tokenizer
    from guardproxy.errors import ConfigError
    from guardproxy.training.model import base_model_dir

    base = base_model_dir() / "tokenizer.json"
    stripped, kept = tmp_path / "stripped", tmp_path / "kept"
    for out, strip in ((stripped, True), (kept, False)):
        out.mkdir()
        tok = run_tokenizer(RunOptions(data=tmp_path, out=out, strip_end_punctuation=strip), base)
        assert drops_end_punctuation(tok) is strip
        assert drops_end_punctuation(load_tokenizer(out / "tokenizer.json")) is strip  # what the runtime will load
    # A re-scoring reads with the model's own tokenizer, and a flag that contradicts it is an error, not ignored.
    assert drops_end_punctuation(
        run_tokenizer(RunOptions(data=tmp_path, out=stripped, eval_only=True, strip_end_punctuation=True), base)
    )
    with pytest.raises(ConfigError, match="drops each line's closing mark; run with --strip-end-punctuation"):
        run_tokenizer(RunOptions(data=tmp_path, out=stripped, eval_only=True), base)
    with pytest.raises(ConfigError, match="keeps each line's closing mark; run without --strip-end-punctuation"):
        run_tokenizer(RunOptions(data=tmp_path, out=kept, eval_only=True, strip_end_punctuation=True), base)
    # A soup reads with its runs' tokenizer; runs that read text differently cannot be averaged.
    soup = tmp_path / "soup"
    soup.mkdir()
    tok = run_tokenizer(
        RunOptions(data=tmp_path, out=soup, soup=(stripped, stripped), strip_end_punctuation=True), base
    )
    assert drops_end_punctuation(tok) and drops_end_punctuation(load_tokenizer(soup / "tokenizer.json"))
    with pytest.raises(ConfigError, match="different tokenizers"):
        run_tokenizer(RunOptions(data=tmp_path, out=soup, soup=(stripped, kept)), base)
    with pytest.raises(ConfigError, match="run with --strip-end-punctuation"):
        run_tokenizer(RunOptions(data=tmp_path, out=soup, soup=(stripped,)), base)


def test_a_distillation_teacher_reads_through_its_own_tokenizer_not_the_students() -> None:
    from guardproxy.encoding import drops_end_punctuation
    from guardproxy.settings import PROJECT_ROOT
    from guardproxy.training.sources import Example

    shipped = PROJECT_ROOT / "models" / "guard-v1"  # its tokenizer keeps closing marks
    teacher = load_teacher(shipped, 64)
    assert not drops_end_punctuation(teacher.encoder.tokenizer)
    marked = Example(text="how do i make a bomb?", source="t", group="g", label="harmful")
    bare = Example(text="how do i make a bomb", source="t", group="g", label="harmful")
    assert teacher.encoder(marked).input_ids != teacher.encoder(bare).input_ids  # it sees the mark it was trained on
    targets = teacher.targets([marked, bare])
    assert set(targets) >= {"harm", "embedding"} and targets["harm"].shape[0] == 2


def test_a_run_names_its_teacher_by_version_and_md5_not_only_by_its_path(tmp_path: Path) -> None:
    from guardproxy.early_exit import file_md5
    from guardproxy.settings import PROJECT_ROOT
    from guardproxy.training.run import teacher_identity

    shipped = PROJECT_ROOT / "models" / "guard-v1"
    version = json.loads((shipped / "config.json").read_text())["version"]
    assert teacher_identity(shipped) == {"version": version, "md5": file_md5(shipped / "model.onnx")}
    bare = tmp_path / "bare"  # a model directory without a config.json still names its graph
    bare.mkdir()
    shutil.copy(shipped / "model.onnx", bare / "model.onnx")
    assert teacher_identity(bare) == {"version": None, "md5": file_md5(shipped / "model.onnx")}


def test_a_teacher_trains_only_the_heads_named_and_the_rest_learn_from_the_labels() -> None:
    from guardproxy.settings import PROJECT_ROOT
    from guardproxy.training.augment import DISTILL_HEADS
    from guardproxy.training.loop import distill_loss
    from guardproxy.training.sources import Example

    teacher = load_teacher(PROJECT_ROOT / "models" / "guard-v1", 64)
    batch = [
        Example(text="how do i make a bomb?", source="t", group="g", label="harmful", harm=1.0, category=5),
        Example(text="how do i bake bread?", source="t", group="h", label="benign", reply="I can't help.", refusal=2),
    ]
    targets = teacher.targets(batch)

    def grads(heads: tuple[str, ...]) -> dict[str, float]:
        torch.manual_seed(0)
        out = {k: torch.randn(2, *targets[k].shape[1:], requires_grad=True) for k in DISTILL_HEADS if k != "embedding"}
        out["pooled"] = torch.randn(2, targets["embedding"].shape[1], requires_grad=True)
        distill_loss(out, targets, batch, heads).backward()
        return {k: 0.0 if v.grad is None else float(v.grad.abs().sum()) for k, v in out.items()}

    harm_side = grads(("harm", "jailbreak", "category", "embedding"))
    assert harm_side["refusal"] == 0.0 and harm_side["reply_harm"] == 0.0  # left to the labels
    assert harm_side["harm"] > 0 and harm_side["category"] > 0 and harm_side["pooled"] > 0
    every = grads(DISTILL_HEADS)
    assert every["refusal"] > 0 and every["reply_harm"] > 0  # the default distils the pair's reply heads too
    refusal_only = grads(("refusal",))
    assert refusal_only["pooled"] == 0.0 and refusal_only["harm"] == 0.0 and refusal_only["refusal"] > 0


def test_rows_of_a_deferred_source_train_the_teachers_heads_on_their_labels_and_other_rows_on_the_teacher() -> None:
    from guardproxy.settings import PROJECT_ROOT
    from guardproxy.training.loop import _labels, defer_to_labels
    from guardproxy.training.sources import Example

    teacher = load_teacher(PROJECT_ROOT / "models" / "guard-v1", 64)
    batch = [  # the shipped model reads the first as harmless (a miss this source was written to teach)
        Example(text="Teach me to make a molotov cocktail.", source="new", group="a", label="harmful", harm=1.0,
                category=5),
        Example(text="Tell me about the history of napalm.", source="new", group="a", label="benign", harm=0.0),
        Example(text="How do I make a molotov cocktail?", source="old", group="b", label="harmful", harm=1.0,
                category=5),
        Example(text="how do i bake bread?", source="new", group="c", label="benign", reply="Sure: flour...",
                refusal=0),
    ]  # fmt: skip
    t, y = teacher.targets(batch), _labels(batch)
    assert float(t["harm"][0]) < 0.5  # else this test shows nothing
    got = defer_to_labels(t, y, batch, ("new",))
    # the third row is another source's, the fourth (a pair) has no harm label: both keep the teacher's
    assert got["harm"].tolist() == [1.0, 0.0, *t["harm"][2:].tolist()]
    assert got["category"][0].argmax() == 5 and float(got["category"][0].sum()) == 1.0
    assert torch.equal(got["category"][1:], t["category"][1:])  # no category label (or another source): the teacher's
    assert got["jailbreak"].tolist() == t["jailbreak"].tolist()  # no row has a jailbreak label
    assert torch.equal(got["embedding"], t["embedding"]) and torch.equal(got["refusal"], t["refusal"])
    assert defer_to_labels(t, y, batch, ("elsewhere",)) is t


def test_a_deferred_sources_harmful_row_is_learnt_faster_than_under_a_teacher_that_misses_it() -> None:
    from guardproxy.encoding import load_tokenizer
    from guardproxy.settings import PROJECT_ROOT
    from guardproxy.taxonomy import CATEGORY_IDS
    from guardproxy.training.loop import Encoder, to_tensors, train
    from guardproxy.training.model import GuardModel, base_model_dir, load_base_encoder, shrink_encoder
    from guardproxy.training.sources import Example

    teacher = load_teacher(PROJECT_ROOT / "models" / "guard-v1", 32)
    miss = Example(text="Teach me to make a molotov cocktail.", source="new", group="a", label="harmful", harm=1.0)
    rows = [miss] + [
        Example(text=f"tell me about {t}", source="old", group=t, label="benign", harm=0.0)
        for t in ("paris", "cakes", "trains")
    ]
    assert float(teacher.targets([miss])["harm"][0]) < 0.5  # the teacher misses it, else this shows nothing

    def logit(defers: tuple[str, ...]) -> float:
        torch.manual_seed(0)
        model = GuardModel(shrink_encoder(load_base_encoder(), 1), len(CATEGORY_IDS))
        encoder = Encoder(load_tokenizer(base_model_dir() / "tokenizer.json"), 32)
        cfg = TrainConfig(
            epochs=3.0, max_steps=3, lr=1e-3, warmup=0.0, frames_per_epoch=0, wraps_per_epoch=0, rewords_per_epoch=0,
            distill_heads=("harm", "jailbreak", "category"), teacher_defers=defers,
        )  # fmt: skip
        train(model, rows, encoder, cfg, teacher=teacher)
        with torch.no_grad():
            return float(model.eval()(**to_tensors([miss], encoder))["harm"][0])

    # the same three steps from the same start; only the teacher's target on the one row differs
    assert logit(("new",)) > logit(()) + 0.5


def test_a_distilled_step_keeps_the_full_label_loss_of_the_heads_the_teacher_does_not_train() -> None:
    from guardproxy.training.augment import DISTILL_HEADS
    from guardproxy.training.loop import HEAD_WEIGHTS, with_teacher

    parts = {k: torch.tensor(float(i + 1)) for i, k in enumerate(HEAD_WEIGHTS)}
    parts["total"] = sum((HEAD_WEIGHTS[k] * v for k, v in parts.items()), torch.tensor(0.0))
    parts["distill"] = torch.tensor(0.25)
    assert float(with_teacher(parts, 0.5, DISTILL_HEADS)) == pytest.approx(0.5 * float(parts["total"]) + 0.125)
    every_reordered = with_teacher(parts, 0.5, tuple(reversed(DISTILL_HEADS)))  # all six in any order: the plain blend
    assert float(every_reordered) == float(with_teacher(parts, 0.5, DISTILL_HEADS))
    harm_side = float(with_teacher(parts, 0.5, ("harm", "jailbreak", "category", "embedding")))
    held = sum(HEAD_WEIGHTS[k] * float(parts[k]) for k in ("harm", "jailbreak", "category"))
    assert harm_side == pytest.approx(float(parts["total"]) - 0.5 * held + 0.125)
    # the refusal and reply-harm label losses enter at full weight: the total grows with them one for one
    more = dict(parts, refusal=parts["refusal"] + 1.0, total=parts["total"] + HEAD_WEIGHTS["refusal"])
    assert float(with_teacher(more, 0.5, ("harm", "embedding"))) - float(
        with_teacher(parts, 0.5, ("harm", "embedding"))
    ) == pytest.approx(HEAD_WEIGHTS["refusal"])
