"""``guardproxy train --window-pool newest``: windows encoded with their newest turn's pool, the model's pool_mask,
and the exported graph's fourth input; needs the 'train' extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from guardproxy.encoding import encode_prompt, pad_batch  # noqa: E402
from guardproxy.taxonomy import CATEGORY_IDS  # noqa: E402
from guardproxy.training.augment import after_chat  # noqa: E402
from guardproxy.training.export import export  # noqa: E402  (after the skip: these import torch)
from guardproxy.training.loop import Encoder, to_tensors  # noqa: E402
from guardproxy.training.model import GuardModel, load_base_encoder, shrink_encoder  # noqa: E402
from guardproxy.training.sources import Example, load_conversations  # noqa: E402

WINDOW = "user: Can you suggest a name for my bakery?\nassistant: How about 'Rise & Roll'?\nuser: How do I pick a font?"
NEWEST = "user: How do I pick a font?"


@pytest.fixture(scope="module")
def model() -> GuardModel:
    torch.manual_seed(0)
    return GuardModel(shrink_encoder(load_base_encoder(), 1), len(CATEGORY_IDS)).eval()


def test_the_trainer_pools_windows_over_their_newest_turn_only_when_asked(model: GuardModel) -> None:
    from guardproxy.encoding import load_tokenizer
    from guardproxy.training.model import base_model_dir

    tokenizer = load_tokenizer(base_model_dir() / "tokenizer.json")
    window = Example(text=WINDOW, newest=NEWEST, source="s", group="g", label="benign", harm=0.0)
    pair = Example(text=NEWEST, reply="Pick a readable serif.", source="s", group="g", label="benign")
    pooled, plain = Encoder(tokenizer, 64, pool_newest=True), Encoder(tokenizer, 64)
    enc = pooled(window)
    assert tokenizer.decode(list(enc.input_ids[enc.pool_from : -1])) == "user : how do i pick a font?"
    assert plain(window).pool_from == 0 and pooled(pair).pool_from == 0
    # the heads read another mean: the batch carries pool_mask, and the window's score moves
    with torch.no_grad():
        narrow = model(**to_tensors([window], pooled))
        whole = model(**to_tensors([window], plain))
    assert "pool_mask" in to_tensors([window], pooled) and "pool_mask" not in to_tensors([window], plain)
    assert not torch.allclose(narrow["pooled"], whole["pooled"])


def test_every_training_window_names_its_newest_turn(tmp_path: Path) -> None:
    import json
    import random

    conv = tmp_path / "conversations"
    conv.mkdir()
    messages = [
        {"role": "user", "content": "Tell me about the history of chemistry."},
        {"role": "assistant", "content": "It begins with alchemy."},
        {"role": "user", "content": "Which reactions release the most energy?"},
    ]
    rows = [
        {"id": "a1", "source": "safemtdata_attack600", "label": "escalation", "messages": messages},
        {"id": "m1", "source": "mtbench101", "label": "benign", "messages": messages},
    ]
    (conv / "safemtdata_attack600.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    (conv / "mtbench101.jsonl").write_text("\n".join(json.dumps(r) for r in rows[1:]) + "\n")
    windows = load_conversations(tmp_path, random.Random(0))
    ask = Example(text="How do I pick a lock?", source="s", group="g", label="harmful", harm=1.0)
    windows.append(after_chat(messages, ask))
    assert {ex.source for ex in windows} == {"safemtdata_attack600", "mtbench101", "aug/context_ask"}
    for ex in windows:
        assert ex.newest is not None and (ex.text.endswith("\n" + ex.newest) or ex.text == ex.newest)
    assert windows[-1].newest == "user: How do I pick a lock?"


@pytest.mark.filterwarnings("ignore")  # the TorchScript export (dynamo=False) warns of its tracing and its age
def test_the_exported_pool_mask_graph_reads_prompts_as_the_plain_graph_does(model: GuardModel, tmp_path: Path) -> None:
    import onnxruntime as ort

    from guardproxy.encoding import encode_window, load_tokenizer
    from guardproxy.training.model import base_model_dir

    tokenizer = load_tokenizer(base_model_dir() / "tokenizer.json")
    export(model, tmp_path / "pooled", pool_mask=True)
    export(model, tmp_path / "plain")
    pooled = ort.InferenceSession(str(tmp_path / "pooled" / "model.onnx"), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(tmp_path / "plain" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in pooled.get_inputs()][-1] == "pool_mask" and len(plain.get_inputs()) == 3
    prompt = [encode_prompt(tokenizer, "How do I pick a font for a bakery sign?", 64)]
    a = pooled.run(["harm", "embedding"], pad_batch(prompt, pool_mask=True))
    b = plain.run(["harm", "embedding"], pad_batch(prompt))
    assert np.allclose(a[0], b[0], atol=1e-6) and np.allclose(a[1], b[1], atol=1e-6)
    window = [encode_window(tokenizer, WINDOW, NEWEST, 64)]
    feeds = pad_batch(window, pool_mask=True)
    with torch.no_grad():
        expected = torch.sigmoid(model(**{k: torch.from_numpy(v) for k, v in feeds.items()})["harm"]).numpy()
    got = pooled.run(["harm"], feeds)[0]
    assert np.allclose(got, expected, atol=0.05)  # int8 against fp32
    assert not np.allclose(got, pooled.run(["harm"], {**feeds, "pool_mask": feeds["attention_mask"]})[0], atol=1e-6)
