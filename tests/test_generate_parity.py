"""Greedy tokens equal transformers' `generate()` on the same tiny random Llama (saved by transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcraft.generate import GenerationConfig, generate
from lmcraft.hub import load_model

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a transformers model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1, bos_token_id=None,
                         eos_token_id=None)  # no EOS: both sides generate exactly n tokens
    model = LlamaForCausalLM(config).eval()
    folder: Path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return model, folder


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:  # noqa: ANN001
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[:, width:].tolist()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("prompts", [[[1, 5, 9, 33, 70]], [[1, 5, 9, 33, 70, 11, 3], [1, 40], [1, 99, 7, 7]]])
def test_greedy_tokens_equal_transformers(hf_llama, prompts: list[list[int]], cache: str) -> None:  # noqa: ANN001
    hf_model, folder = hf_llama
    ours = load_model(folder)
    result = generate(ours, prompts, GenerationConfig(max_new_tokens=20, eos_token_ids=(), cache=cache))
    assert result.path == cache
    assert result.tokens == hf_greedy(hf_model, prompts, 20)


def test_repetition_penalty_matches_transformers_without_padding(hf_llama) -> None:  # noqa: ANN001
    hf_model, folder = hf_llama
    ours = load_model(folder)
    prompt = torch.tensor([[1, 5, 9, 33, 70, 5, 5]])
    with torch.inference_mode():
        expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                                     repetition_penalty=1.8)[:, 7:].tolist()
    config = GenerationConfig(max_new_tokens=16, repetition_penalty=1.8, eos_token_ids=())
    assert generate(ours, prompt, config).tokens == expected
