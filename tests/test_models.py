"""Model invariants: KV cache == full forward, padding == no padding, GQA, sliding window, prefix, embeddings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmcraft.models import LanguageModel, ModelConfig, preset

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=None, head_dim=None,
             intermediate_size=64, max_position_embeddings=64)
CONFIGS = {
    "llama-gqa": dict(SMALL, num_kv_heads=2),
    "mistral-window": dict(SMALL, model_type="mistral", num_kv_heads=2, sliding_window=3),
    "gpt2": {**preset("gpt2-tiny").to_dict(), **SMALL},
}
T = 10


@pytest.fixture
def make(tiny_model) -> Callable[..., LanguageModel]:
    """`make(fields, head, seed)`: a model with weights ~ N(0, 0.1) (norm gains 1 + N(0, 0.1)): logits O(1), so
    1e-5 is a real bound."""

    def build(fields: dict, head: str | None = None, seed: int = 0) -> LanguageModel:
        model = tiny_model(ModelConfig(**fields), head, seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                gain = name.endswith("norm.weight")
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if gain else 0.0))
        return model.eval()

    return build


def ids(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max() < 1e-5, float((a - b).abs().max())


@torch.no_grad()
@pytest.mark.parametrize("case", list(CONFIGS))
def test_kv_cache_incremental_equals_full_forward(case: str, make) -> None:
    model, x = make(CONFIGS[case]), ids()
    full = model(x).logits
    cache = model.new_cache(2, capacity=4)  # smaller than the sequence: the cache must grow
    steps = [model(x[:, :5], past_key_values=cache).logits]
    steps += [model(x[:, t:t + 1], past_key_values=cache).logits for t in range(5, T)]
    assert cache.length == T
    close(torch.cat(steps, dim=1), full)


@torch.no_grad()
@pytest.mark.parametrize("case", list(CONFIGS))
def test_kv_cache_with_left_padding(case: str, make) -> None:
    """Generation of a left-padded batch step by step equals the full forward at every real position."""
    model, x = make(CONFIGS[case]), ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    full = model(x, attention_mask=mask).logits
    out = model(x[:, :5], attention_mask=mask[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, T):
        steps.append(model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values).logits)
    real = mask.bool()
    close(torch.cat(steps, dim=1)[real], full[real])


@torch.no_grad()
@pytest.mark.parametrize("case", list(CONFIGS))
def test_left_padding_equals_unpadded(case: str, make) -> None:
    model, x = make(CONFIGS[case]), ids()
    padded = x.clone()
    padded[0, :4] = 0
    mask = (torch.arange(T) >= 4).long().expand(2, -1).clone()
    mask[1] = 1
    out = model(padded, attention_mask=mask).logits
    close(out[0, 4:], model(x[:1, 4:]).logits[0])
    close(out[1], model(x[1:]).logits[0])


@torch.no_grad()
def test_encoder_right_padding_equals_unpadded(make) -> None:
    model = make({**preset("bert-tiny").to_dict(), **SMALL})
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -3:] = 0
    out = model(x, attention_mask=mask).logits
    close(out[0, :-3], model(x[:1, :-3]).logits[0])
    close(out[1], model(x[1:]).logits[0])


@torch.no_grad()
@pytest.mark.parametrize("padding", ["left", "right"])
def test_decoder_classifier_reads_last_real_token(padding: str, make) -> None:
    model, x = make(dict(SMALL, num_labels=3), head="cls"), ids(1, 6)
    pads = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([pads, x] if padding == "left" else [x, pads], dim=1)
    mask = (padded != 0).long()
    close(model(padded, attention_mask=mask).logits, model(x).logits)


@torch.no_grad()
def test_gqa_equals_multi_head_with_repeated_kv(make) -> None:
    """num_kv_heads=2 of 4: each key/value head serves two query heads, i.e. MHA with k/v heads repeated."""
    gqa = make(dict(SMALL, num_kv_heads=2))
    mha = LanguageModel(ModelConfig(**dict(SMALL, num_kv_heads=4))).eval()
    state = gqa.state_dict()
    for key in list(state):
        if ".k_proj." in key or ".v_proj." in key:
            w = state[key]
            state[key] = w.view(2, -1, *w.shape[1:]).repeat_interleave(2, dim=0).reshape(-1, *w.shape[1:])
    mha.load_state_dict(state)
    x = ids()
    close(gqa(x).logits, mha(x).logits)


@torch.no_grad()
def test_sliding_window_sees_only_the_last_w_tokens(make) -> None:
    """One layer, window 3: the logits at t equal those of the model run on tokens t-2..t alone."""
    w = 3
    model = make(dict(SMALL, num_layers=1, sliding_window=w))
    x = ids()
    full = model(x).logits
    for t in range(w, T):
        alone = model(x[:, t - w + 1:t + 1], position_ids=torch.arange(t - w + 1, t + 1).expand(2, -1)).logits
        close(full[:, t], alone[:, -1])
    unwindowed = LanguageModel(ModelConfig(**dict(SMALL, num_layers=1))).eval()
    unwindowed.load_state_dict(model.state_dict())
    assert (unwindowed(x).logits[:, w:] - full[:, w:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("case", ["llama-gqa", "gpt2"])
def test_prefix_key_values_act_like_a_cached_prompt(case: str, make) -> None:
    """Per-layer prefix keys/values (prefix tuning) taken from a prompt's cache reproduce the full forward."""
    model, x = make(CONFIGS[case]), ids()
    out = model(x[:, :4], use_cache=True)
    cache = out.past_key_values
    prefix = [(cache.keys[i][:, :, :4], cache.values[i][:, :, :4]) for i in range(model.config.num_layers)]
    rest = model(x[:, 4:], prefix=prefix, position_ids=torch.arange(4, T).expand(2, -1)).logits
    close(rest, model(x).logits[:, 4:])


@torch.no_grad()
def test_shared_prefix_broadcasts_and_respects_padding(make) -> None:
    """A (1, kv_heads, P, D) prefix serves the whole batch; a left-padded row matches its unpadded run."""
    model, x = make(CONFIGS["llama-gqa"]), ids()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    prefix = [(torch.randn(1, cfg.num_kv_heads, 5, cfg.head_dim, generator=g),
               torch.randn(1, cfg.num_kv_heads, 5, cfg.head_dim, generator=g)) for _ in range(cfg.num_layers)]
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    batched = model(x.masked_fill(mask == 0, 0), attention_mask=mask, prefix=prefix).logits
    close(batched[0, 4:], model(x[:1, 4:], prefix=prefix).logits[0])
    close(batched[1], model(x[1:], prefix=prefix).logits[0])
    assert (model(x[1:]).logits - batched[1:]).abs().max() > 1e-3  # the prefix is attended to


@torch.no_grad()
@pytest.mark.parametrize("case", ["llama-gqa", "gpt2"])
def test_inputs_embeds_equal_input_ids(case: str, make) -> None:
    model, x = make(CONFIGS[case]), ids()
    close(model(inputs_embeds=model.get_input_embeddings()(x)).logits, model(x).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model(x, inputs_embeds=model.get_input_embeddings()(x))


@torch.no_grad()
def test_logits_to_keep(make) -> None:
    model, x = make(CONFIGS["llama-gqa"]), ids()
    close(model(x, logits_to_keep=1).logits, model(x).logits[:, -1:])
