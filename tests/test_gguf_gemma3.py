"""Slow: the real Gemma 3 270M asset (Q4_K_M GGUF in four PyPI parts) converted to an HF folder.

What the issue asks it to show: greedy decoding continues "The capital of France is" with the tokens llama.cpp
gives, and the converted folder's perplexity in transformers' Gemma3ForCausalLM matches ours. The tests skip,
saying why, until `lmcraft assets fetch gemma3-270m` has run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmcraft import assets
from lmcraft.tokenizer.load import load_tokenizer

pytestmark = pytest.mark.slow
NAME = "gemma3-270m"
GGUF = "gemma-3-270m-q4_k_m.gguf"
PROMPT = "The capital of France is"
LLAMA_CPP_CONTINUATION = " the capital of the country of France. It is the largest"  # llama.cpp, greedy, 12 tokens
# Moby-Dick, chapter 1 (public domain): the held paragraph for the perplexity comparison
PARAGRAPH = (
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse, and "
    "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of "
    "the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself "
    "growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself "
    "involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; and "
    "especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle to "
    "prevent me from deliberately stepping into the street, and methodically knocking people's hats off—then, I "
    "account it high time to get to sea as soon as I can."
)
SAMPLES = [PROMPT, PARAGRAPH, "  two spaces,\n\nnew lines\tand a tab", "naïve café, 東京 😀 <start_of_turn>user\nhi",
           "<bos>x<eos> 1234567 ∑ ﬁ"]


@pytest.fixture(scope="module")
def folder() -> Path:
    if not assets.is_fetched(NAME):
        pytest.skip(f"asset {NAME} is not fetched; run `lmcraft assets fetch {NAME}` (~250 MB from PyPI) first")
    return assets.asset_dir(NAME)


@pytest.fixture(scope="module")
def model(folder: Path):
    import torch

    from lmcraft.hub import load_model

    return load_model(folder, head="lm", dtype=torch.float32).eval()


def test_converted_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    expected = {
        "model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 256, "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1,
    }
    assert {k: config[k] for k in expected} == expected
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert not (folder / "parts").exists() and (folder / GGUF).stat().st_size == 253_113_024


def test_greedy_continuation_matches_llama_cpp(folder: Path, model) -> None:
    from lmcraft.generate.core import GenerationConfig, generate

    tok = load_tokenizer(folder)
    ids = tok.encode(PROMPT)
    assert [tok.id_to_token(i) for i in ids] == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    result = generate(model, [ids], GenerationConfig(max_new_tokens=12), tokenizer=tok)
    assert result.tokens[0] == tok.encode(LLAMA_CPP_CONTINUATION, add_special_tokens=False)
    assert result.texts[0] == LLAMA_CPP_CONTINUATION


def _perplexity(logits, ids) -> float:
    import torch

    loss = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
    return math.exp(loss.item())


@pytest.mark.parity
def test_perplexity_matches_transformers_on_the_converted_folder(folder: Path, model) -> None:
    import torch
    from transformers import Gemma3ForCausalLM

    ids = torch.tensor([load_tokenizer(folder).encode(PARAGRAPH)])
    ref = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ours, theirs = _perplexity(model(ids).logits, ids), _perplexity(ref(ids).logits, ids)
    print(f"perplexity on {ids.shape[1]} tokens: lmcraft {ours:.4f}, transformers {theirs:.4f}")
    assert 1.0 < ours < 100.0  # a real language model on English prose
    assert abs(ours - theirs) / theirs < 1e-3  # the issue asks for 5%; the same weights agree far closer


def test_weights_equal_gguf_py_dequantisation(folder: Path) -> None:
    """gguf-py's own numpy dequantiser (gguf.quants.dequantize) on every tensor of the file, norms minus llama.cpp's
    +1, gives our stored weights bit for bit."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from lmcraft.gguf_layout import hf_name

    reader = gguf.GGUFReader(folder / GGUF)
    with safe_open(folder / "model.safetensors", "np") as ours:
        assert len(list(ours.keys())) == len(reader.tensors) == 236
        for t in reader.tensors:
            ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if t.name.endswith("norm.weight"):
                ref = ref - np.float32(1.0)
            assert np.array_equal(ours.get_tensor(hf_name("gemma3", t.name)[0]), ref), t.name


def test_greedy_tokens_match_llama_cpp_itself(folder: Path) -> None:
    """Direct check against llama.cpp's Python binding, when it is installed."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(folder / GGUF), n_ctx=256, verbose=False, seed=0)
    tok = load_tokenizer(folder)
    for text in SAMPLES:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text
    out = llm.create_completion(PROMPT, max_tokens=12, temperature=0.0, top_k=1)
    assert out["choices"][0]["text"] == LLAMA_CPP_CONTINUATION
