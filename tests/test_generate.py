"""Generation: cached decoding equals full recomputation, left padding is invisible, processors, stop rules."""

from __future__ import annotations

import pytest
import torch

from lmcraft.errors import ConfigError
from lmcraft.generate import (
    Generation,
    GenerationConfig,
    GenerationError,
    TokenChooser,
    apply_repetition_penalty,
    fast_decoding,
    generate,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)
from lmcraft.models import LanguageModel, preset
from lmcraft.models.layers import MLP, Attention

NEG = float("-inf")


TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
            tie_word_embeddings=False, initializer_range=0.2)


def argmax_without_cache(model: LanguageModel, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_with_cache_equals_full_recompute(family: str, tiny_model) -> None:
    model = tiny_model(**TINY).eval() if family == "llama" else LanguageModel(preset(
        "gpt2-tiny", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        initializer_range=0.2, tie_word_embeddings=False)).eval()
    prompt = [5, 17, 3, 88, 42]
    result = generate(model, [prompt], GenerationConfig(max_new_tokens=12, eos_token_ids=()))
    assert result.tokens[0] == argmax_without_cache(model, prompt, 12)
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=12, eos_token_ids=()), fuse=False).tokens == \
        result.tokens
    assert result.finish_reasons == ["length"]
    assert result.num_new_tokens == 12 and result.tokens_per_second > 0


def test_left_padded_batch_equals_each_prompt_alone(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8], [50, 60, 70]]
    config = GenerationConfig(max_new_tokens=10, eos_token_ids=())
    batched = generate(model, prompts, config)
    alone = [generate(model, [p], config).tokens[0] for p in prompts]
    assert batched.tokens == alone
    assert batched.prompt_lengths == [1, 8, 3]


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "num_kv_heads": 4},
                                       {"mlp": "plain", "activation": "gelu"}])
def test_fast_decoding_gives_the_same_logits(overrides: dict, tiny_model) -> None:
    model = tiny_model(**{**TINY, **overrides}).eval()
    ids = torch.tensor([[3, 9, 27, 81], [5, 25, 1, 2]])
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        expected = [model(ids, past_key_values=cache).logits, model(ids[:, :1], past_key_values=cache).logits]
        with fast_decoding(model):
            cache = model.new_cache(2, 8)
            got = [model(ids, past_key_values=cache).logits, model(ids[:, :1], past_key_values=cache).logits]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert all(type(layer.self_attn) is Attention and type(layer.mlp) is MLP for layer in model.model.layers)


def test_prefix_reaches_every_decoding_step(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    cfg = model.config
    torch.manual_seed(1)
    prefix = [(torch.randn(1, cfg.num_kv_heads, 3, cfg.head_dim), torch.randn(1, cfg.num_kv_heads, 3, cfg.head_dim))
              for _ in range(cfg.num_layers)]
    prompt, ids = [4, 8, 15], [4, 8, 15]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]), prefix=prefix).logits[0, -1].argmax()))
    result = generate(model, [prompt], GenerationConfig(max_new_tokens=6, eos_token_ids=()), prefix=prefix)
    assert result.tokens[0] == ids[3:]
    assert result.tokens[0] != generate(model, [prompt], GenerationConfig(max_new_tokens=6, eos_token_ids=())).tokens[0]


def test_tensor_input_with_attention_mask_matches_lists(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    ids = torch.tensor([[0, 0, 9, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    assert generate(model, ids, config, attention_mask=mask).tokens == generate(model, [[9, 8], [1, 2, 3, 4]],
                                                                                  config).tokens
    with pytest.raises(GenerationError, match="left padding"):
        generate(model, ids, config, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_eos_ends_rows_independently_and_streams_none_afterwards(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    prompts = [[5, 17, 3], [60, 2, 9, 11]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=()))
    eos_a, eos_b = free.tokens[0][2], free.tokens[1][5]  # stop row 0 at its 3rd token, row 1 at its 6th
    run = Generation(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=(eos_a, eos_b)))
    steps = list(run)
    result = run.result()
    for row, toks in enumerate(result.tokens):
        assert toks[-1] in (eos_a, eos_b) and toks == free.tokens[row][: len(toks)]
        assert result.finish_reasons[row] == "eos"
        assert [s[row] for s in steps] == toks + [None] * (len(steps) - len(toks))
    assert len(steps) == max(len(t) for t in result.tokens)


def test_eos_defaults_to_model_config(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    first = generate(model, [[4, 5]], GenerationConfig(max_new_tokens=5, eos_token_ids=())).tokens[0][0]
    model.config.eos_token_id = [999, first]
    result = generate(model, [[4, 5]], GenerationConfig(max_new_tokens=5))
    assert result.tokens == [[first]] and result.finish_reasons == ["eos"]


def test_seeded_sampling_is_reproducible(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, seed=123,
                              eos_token_ids=())
    a = generate(model, [[1, 2, 3], [4, 5]], config).tokens
    b = generate(model, [[1, 2, 3], [4, 5]], config).tokens
    other = generate(model, [[1, 2, 3], [4, 5]], GenerationConfig(**{**config.__dict__, "seed": 7})).tokens
    assert a == b and a != other


def test_top_k_one_sampling_is_greedy(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    greedy = generate(model, [[3, 1, 4]], GenerationConfig(max_new_tokens=8, eos_token_ids=())).tokens
    sampled = generate(model, [[3, 1, 4]], GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1, seed=0,
                                                            eos_token_ids=())).tokens
    assert sampled == greedy


def test_training_mode_is_restored_and_zero_tokens_allowed(tiny_model) -> None:
    model = tiny_model(**TINY).eval().train()
    result = generate(model, [[1, 2]], GenerationConfig(max_new_tokens=0))
    assert result.tokens == [[]] and model.training


def test_bad_inputs_are_explained(tiny_model) -> None:
    model = tiny_model(**TINY).eval()
    with pytest.raises(GenerationError, match="prompt 1 has no tokens"):
        generate(model, [[1], []])
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(model, [[1]], GenerationConfig(stop_strings=("x",)))
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=0.0)
    gpt = LanguageModel(preset("gpt2-tiny", num_layers=1, max_position_embeddings=16))
    with pytest.raises(GenerationError, match="learned positions"):
        generate(gpt, [[1] * 10], GenerationConfig(max_new_tokens=10))
    bert = LanguageModel(preset("bert-tiny", num_layers=1))
    with pytest.raises(GenerationError, match="decoder"):
        generate(bert, [[1, 2]])


# ------------------------------------------------------------------------------------------- processors
def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_sees_prompt_but_not_padding() -> None:
    chooser = TokenChooser(greedy=True, repetition_penalty=4.0)
    chooser.observe_prompt(torch.tensor([[0, 0, 2], [1, 3, 3]]), torch.tensor([[0, 0, 1], [1, 1, 1]]), 5)
    logits = torch.tensor([[1.0, 0.9, 1.2, 0.8, 0.1], [1.0, 1.1, 0.5, 3.0, 0.2]])
    # row 0: token 2 penalised (0.3) so token 0 wins (padding id 0 is not 'seen'); row 1: 1 and 3 penalised
    assert chooser(logits).tolist() == [0, 0]
    chooser.observe(torch.tensor([0, 0]))  # now row 1 reads [0.25, 0.275, 0.5, 0.75, 0.2]
    assert chooser(logits).tolist() == [1, 3]


def test_top_k_keeps_k_largest_and_ties() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG, 5.0, 3.0, 3.0, NEG]]
    assert top_k_filter(logits, 0).equal(logits)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = top_p_filter(logits, 0.8).isfinite().tolist()
    assert kept == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(logits, 0.1).isfinite().tolist() == [[True, False, False, False]]  # top token always kept
    shuffled = logits[:, [2, 0, 3, 1]]
    assert top_p_filter(shuffled, 0.8).isfinite().tolist() == [[False, True, False, True]]


def test_min_p_is_relative_to_the_top_probability() -> None:
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    assert min_p_filter(logits, 0.2).isfinite().tolist() == [[True, True, False, False]]  # threshold 0.12


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, -1)
    chooser = TokenChooser(greedy=False, top_p=0.8, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(chooser(logits), minlength=4).float() / 4000
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() - 0.625) < 0.04  # 0.5 / (0.5 + 0.3)
