"""Tokenizer training: BPE, WordPiece, Unigram; saved files load in transformers with the chat template."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmcraft.tokenizer.train import (
    CHATML_TEMPLATE,
    DEFAULT_SPECIAL_TOKENS,
    bytes_per_token,
    save_tokenizer,
    train_tokenizer,
)

_WORDS = (
    "the a quick slow old young king queen fox cart river hill people city walked rolled jumped watched near over "
    "under green steep quiet long short house garden morning evening and but with without from into"
).split()
_rng = random.Random(0)
CORPUS = [
    " ".join(_rng.choice(_WORDS) for _ in range(_rng.randint(8, 20))).capitalize() + "." for _ in range(600)
] + ["Ünïcödé text, emojis 🙂 and 日本語 also appear."] * 5


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_train_save_and_round_trip(kind: str, tmp_path: Path) -> None:
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=600, min_frequency=1, show_progress=False)
    specials = DEFAULT_SPECIAL_TOKENS[kind]
    ids = [tok.token_to_id(t) for t in dict.fromkeys(specials.values())]
    assert ids == list(range(len(ids)))  # special tokens first
    assert tok.get_vocab_size() <= 600
    text = "The quick fox walked near the river."
    enc = tok.encode(text, add_special_tokens=False)
    decoded = tok.decode(enc.ids)
    assert decoded.replace(" .", ".") == text
    bpt, n_bytes, n_tokens = bytes_per_token(tok, CORPUS[:10])
    assert n_bytes == sum(len(t.encode()) for t in CORPUS[:10]) and bpt == pytest.approx(n_bytes / n_tokens)
    assert bpt > 2.0  # the training text compresses well
    out = save_tokenizer(tok, tmp_path / kind, specials, CHATML_TEMPLATE if kind != "wordpiece" else None)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert ("chat_template" in config) == (kind != "wordpiece")
    assert (out / "tokenizer.json").is_file() and (out / "special_tokens_map.json").is_file()


def test_byte_level_bpe_has_no_unknowns() -> None:
    tok = train_tokenizer(CORPUS, kind="bpe", vocab_size=600, min_frequency=1, show_progress=False)
    text = "never seen: ∮ ½ 𝔘"
    assert tok.decode(tok.encode(text).ids) == text


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        train_tokenizer(CORPUS, kind="sentencepiece")  # type: ignore[arg-type]


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_transformers_loads_the_saved_tokenizer(kind: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=600, min_frequency=1, show_progress=False)
    specials = DEFAULT_SPECIAL_TOKENS[kind]
    save_tokenizer(tok, tmp_path, specials, CHATML_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf, PreTrainedTokenizerFast)
    text = "The old king rolled over the quiet hill."
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids
    if kind == "wordpiece":
        assert hf.cls_token == "[CLS]" and hf(text)["input_ids"][0] == tok.token_to_id("[CLS]")
    else:
        assert hf.eos_token == specials["eos"]
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
