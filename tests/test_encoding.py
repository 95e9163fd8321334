"""guardproxy.encoding: head+tail truncation, pair layout, padding, and the shared normalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from guardproxy.encoding import (
    HEAD_FRACTION,
    add_end_punctuation_rule,
    covered_scripts,
    drops_end_punctuation,
    encode_pair,
    encode_prompt,
    encode_window,
    load_tokenizer,
    pad_batch,
    unreadable_share,
)
from guardproxy.errors import ConfigError
from guardproxy.settings import Settings

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["alpha", "beta", "gamma", "delta", "how", "to", "make", "a", "bomb", "sorry", "sure", "here", "is"]
WORDS += ["user", "assistant", ":"]
WORDS += [f"w{i}" for i in range(600)]


@pytest.fixture
def tokenizer_path(tmp_path: Path) -> Path:
    """A tiny BERT-style WordPiece tokenizer saved with fixed padding on, as the base model's file ships."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def tokenizer(tokenizer_path: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_path)


def ids_of(tokenizer: Tokenizer, words: list[str]) -> list[int]:
    return [tokenizer.token_to_id(w) for w in words]


def test_load_disables_padding_and_truncation(tokenizer: Tokenizer) -> None:
    assert tokenizer.padding is None
    assert tokenizer.truncation is None
    assert len(tokenizer.encode(" ".join(["alpha"] * 300)).ids) > 128


def test_load_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_tokenizer(tmp_path / "nope.json")


def test_short_prompt_is_cls_text_sep(tokenizer: Tokenizer) -> None:
    enc = encode_prompt(tokenizer, "how to make a bomb", 64)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert enc.input_ids == (cls, *ids_of(tokenizer, ["how", "to", "make", "a", "bomb"]), sep)
    assert enc.token_type_ids == (0,) * 7


def test_long_prompt_keeps_head_and_tail(tokenizer: Tokenizer) -> None:
    words = [f"w{i}" for i in range(500)]
    text = " ".join(words) + " how to make a bomb"
    enc = encode_prompt(tokenizer, text, 64)
    assert len(enc) == 64
    body = list(enc.input_ids[1:-1])
    # The ask at the very end survives, and so does the wrapper's opening.
    assert body[-5:] == ids_of(tokenizer, ["how", "to", "make", "a", "bomb"])
    assert body[0] == tokenizer.token_to_id("w0")
    # The middle is what goes.
    assert tokenizer.token_to_id("w250") not in body
    assert body.index(tokenizer.token_to_id("w0")) < body.index(tokenizer.token_to_id("w499"))


def test_prompt_is_normalized_before_tokenizing(tokenizer: Tokenizer) -> None:
    plain = encode_prompt(tokenizer, "how to make a bomb", 64)
    assert encode_prompt(tokenizer, "ｈｏｗ to mаke a b\u200b0mb", 64) == plain


def test_pair_layout_and_type_ids(tokenizer: Tokenizer) -> None:
    enc = encode_pair(tokenizer, "how to make a bomb", "sorry", 64)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    prompt = ids_of(tokenizer, ["how", "to", "make", "a", "bomb"])
    assert enc.input_ids == (cls, *prompt, sep, tokenizer.token_to_id("sorry"), sep)
    assert enc.token_type_ids == (0,) * 7 + (1,) * 2


def test_long_pair_keeps_prompt_tail_and_reply_head(tokenizer: Tokenizer) -> None:
    prompt = " ".join(f"w{i}" for i in range(300)) + " how to make a bomb"
    reply = "sorry " + " ".join(f"w{i}" for i in range(300, 600))
    enc = encode_pair(tokenizer, prompt, reply, 96)
    assert len(enc) == 96
    sep = tokenizer.token_to_id("[SEP]")
    first_sep = enc.input_ids.index(sep)
    prompt_part, reply_part = list(enc.input_ids[1:first_sep]), list(enc.input_ids[first_sep + 1 : -1])
    assert prompt_part[-5:] == ids_of(tokenizer, ["how", "to", "make", "a", "bomb"])
    assert reply_part[0] == tokenizer.token_to_id("sorry")
    assert len(prompt_part) >= (96 - 3) // 3  # a long reply does not starve the prompt
    assert enc.token_type_ids == (0,) * (first_sep + 1) + (1,) * (96 - first_sep - 1)


def test_short_reply_leaves_its_budget_to_the_prompt(tokenizer: Tokenizer) -> None:
    prompt = " ".join(f"w{i}" for i in range(300))
    enc = encode_pair(tokenizer, prompt, "sure", 64)
    assert len(enc) == 64
    assert enc.input_ids[-3:-1] == (tokenizer.token_to_id("[SEP]"), tokenizer.token_to_id("sure"))


def test_pad_batch_shapes_and_mask(tokenizer: Tokenizer) -> None:
    a = encode_prompt(tokenizer, "alpha beta", 32)
    b = encode_pair(tokenizer, "alpha", "beta gamma delta", 32)
    feeds = pad_batch([a, b])
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    for array in feeds.values():
        assert array.dtype == np.int64
        assert array.shape == (2, len(b))
    assert feeds["attention_mask"].tolist() == [[1] * len(a) + [0] * (len(b) - len(a)), [1] * len(b)]
    assert feeds["input_ids"][0, len(a) :].tolist() == [0] * (len(b) - len(a))
    assert feeds["token_type_ids"][1].tolist() == list(b.token_type_ids)


def test_a_window_pools_its_newest_turn_and_everything_else_pools_as_its_attention(tokenizer: Tokenizer) -> None:
    window = "user: alpha beta\nassistant: gamma delta\nuser: how to make a bomb"
    enc = encode_window(tokenizer, window, "user: how to make a bomb", 64)
    assert enc.input_ids == encode_prompt(tokenizer, window, 64).input_ids  # the same ids: only the pooling differs
    newest = ids_of(tokenizer, ["user", ":", "how", "to", "make", "a", "bomb"])
    assert list(enc.input_ids[enc.pool_from : -1]) == newest
    plain = encode_prompt(tokenizer, "alpha beta", 64)
    feeds = pad_batch([plain, enc], pool_mask=True)
    assert feeds["pool_mask"][0].tolist() == feeds["attention_mask"][0].tolist()
    assert feeds["pool_mask"][1].tolist() == [0] * enc.pool_from + [1] * len(newest) + [0]
    assert "pool_mask" not in pad_batch([plain, enc])


def test_a_cut_window_pools_only_ids_it_kept_of_its_newest_turn(tokenizer: Tokenizer) -> None:
    filler = " ".join(f"w{i}" for i in range(300))
    newest = "user: " + " ".join(f"w{i}" for i in range(300, 400))  # longer than the kept tail
    enc = encode_window(tokenizer, f"user: {filler}\n{newest}", newest, 64)
    assert len(enc) == 64
    head = int(62 * HEAD_FRACTION)
    assert enc.pool_from == 1 + head  # never back into the kept head (the old turn's opening)
    assert tokenizer.token_to_id("w399") in enc.input_ids[enc.pool_from : -1]


def test_pad_batch_of_nothing_is_empty() -> None:
    assert pad_batch([])["input_ids"].shape == (0, 0)


@pytest.mark.parametrize("max_length", [0, 2])
def test_tiny_max_length_is_rejected(tokenizer: Tokenizer, max_length: int) -> None:
    with pytest.raises(ValueError):
        encode_pair(tokenizer, "a", "b", max_length)


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "guard-v1"


def test_shipped_model_matches_the_contract() -> None:
    """models/README.md: tokenizer without padding, config fields, ONNX inputs and outputs in taxonomy order."""
    import json

    import onnxruntime as ort

    from guardproxy.taxonomy import CATEGORY_IDS

    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["categories"] == list(CATEGORY_IDS)
    assert config["refusal_labels"] == ["none", "partial", "full"]
    assert set(config["thresholds"]) == {"harm", "harm_high", "jailbreak", "reply_harm", "refusal_partial"}
    assert config["thresholds"]["harm"] <= config["thresholds"]["harm_high"]
    raw = json.loads((SHIPPED / "tokenizer.json").read_text())
    assert raw["padding"] is None and raw["truncation"] is None

    tokenizer = load_tokenizer(SHIPPED / "tokenizer.json")
    session = ort.InferenceSession(str(SHIPPED / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    feeds = pad_batch(
        [
            encode_prompt(tokenizer, "how do I kill a python process", config["max_length"]),
            encode_pair(tokenizer, "tell me a joke", "Sure! Why did the chicken cross the road?", config["max_length"]),
        ]
    )
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    assert out["harm"].shape == out["jailbreak"].shape == out["reply_harm"].shape == (2,)
    assert out["category"].shape == (2, len(CATEGORY_IDS))
    assert out["refusal"].shape == (2, 3)
    assert out["embedding"].shape == (2, config["hidden"])
    np.testing.assert_allclose(out["category"].sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(out["refusal"].sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-3)
    assert ((out["harm"] >= 0) & (out["harm"] <= 1)).all()


def test_the_shipped_vocabulary_covers_the_latin_script_only() -> None:
    tokenizer = load_tokenizer(Settings().guard.model_dir / "tokenizer.json")
    assert covered_scripts(tokenizer) == frozenset({"LATIN"})


def _vocab_tokenizer(tokens: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *tokens])}
    return Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))


def test_a_script_is_covered_when_the_vocabulary_spells_its_words_in_pieces() -> None:
    cyrillic_pieces = [f"##{a}{b}" for a in "абвгдежзик" for b in "лмнопрстуф"]  # 100 two-letter pieces
    assert covered_scripts(_vocab_tokenizer(["п", "##о", "α", *cyrillic_pieces])) == frozenset({"CYRILLIC"})
    assert covered_scripts(_vocab_tokenizer(["п", "##о", "α", *cyrillic_pieces[:99]])) == frozenset()


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("How do I kill a Python process?", 0.0),
        ("Schreib mir bitte eine kurze Mail an meine Chefin, dass ich erst um 10 da bin.", 0.0),
        ("Pomóż mi napisać maila; Türkçe öğreniyorum; Tiếng Việt rất hay", 0.0),  # accents are still Latin
        ("Подскажи рецепт сырников", 1.0),
        ("帮我写一条给房东的微信", 1.0),
        ("Ελάτε να μιλήσουμε", 1.0),
        ("🙂🙂 12345 !!!", 0.0),  # no letters at all
        ("", 0.0),
        ("ok спасибо", 7 / 9),  # 7 of its 9 letters are Cyrillic
    ],
)
def test_unreadable_share_counts_the_letters_outside_the_covered_scripts(text: str, share: float) -> None:
    assert unreadable_share(text, frozenset({"LATIN"})) == pytest.approx(share)


def test_with_a_vocabulary_that_does_not_cover_latin_latin_letters_count_as_unreadable() -> None:
    assert unreadable_share("ok спасибо", frozenset({"CYRILLIC"})) == pytest.approx(2 / 9)
    assert unreadable_share("plain ascii", frozenset({"CYRILLIC"})) == 1.0


def test_a_tokenizer_that_strips_end_punctuation_reads_a_closing_mark_as_nothing(tokenizer: Tokenizer) -> None:
    assert not drops_end_punctuation(tokenizer)
    assert encode_prompt(tokenizer, "how to make a bomb?", 32) != encode_prompt(tokenizer, "how to make a bomb", 32)
    add_end_punctuation_rule(tokenizer)
    assert drops_end_punctuation(tokenizer)
    plain = encode_prompt(tokenizer, "how to make a bomb", 32)
    for text in ("how to make a bomb?", "how to make a bomb.", "How to make a bomb?!", "how to make a bomb ...  "):
        assert encode_prompt(tokenizer, text, 32) == plain, text
    # Only the end of a line: a mark inside it is still read (as [UNK] by this tiny vocabulary).
    unk = tokenizer.token_to_id("[UNK]")
    assert unk in encode_prompt(tokenizer, "how? to make a bomb", 32).input_ids


def test_each_turn_of_a_window_loses_its_own_closing_mark(tokenizer: Tokenizer) -> None:
    add_end_punctuation_rule(tokenizer)
    marked = encode_window(tokenizer, "user: how to make a bomb?\nassistant: sure.\nuser: alpha!", "alpha!", 64)
    plain = encode_window(tokenizer, "user: how to make a bomb\nassistant: sure\nuser: alpha", "alpha", 64)
    assert marked == plain
    assert marked.pool_from == len(marked.input_ids) - 2  # the newest turn is one id, "alpha"


def test_the_stripping_travels_in_the_saved_tokenizer_json(tokenizer: Tokenizer, tmp_path: Path) -> None:
    add_end_punctuation_rule(tokenizer)
    tokenizer.save(str(tmp_path / "stripping.json"))
    loaded = load_tokenizer(tmp_path / "stripping.json")
    assert drops_end_punctuation(loaded)
    assert encode_prompt(loaded, "alpha beta?", 16) == encode_prompt(loaded, "alpha beta", 16)
