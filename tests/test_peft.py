"""PEFT methods on tiny lmcraft models: frozen base, identity at init, merge, save/load, NF4, AdaLoRA, switching."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch

from lmcraft import peft
from lmcraft.errors import ConfigError
from lmcraft.models import LanguageModel, preset
from lmcraft.peft.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, nf4_code, quantize_nf4

VOCAB = 128


@pytest.fixture
def tiny(tiny_model) -> Callable[..., LanguageModel]:
    """`tiny(kind, head)`: a 2-layer llama or gpt2 model with norm weights moved away from 1."""

    def build(kind: str = "llama", head: str | None = None) -> LanguageModel:
        if kind == "llama":
            cfg = preset("llama-14m", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96,
                         vocab_size=VOCAB, tie_word_embeddings=False)
        else:
            cfg = preset("gpt2-tiny", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                         vocab_size=VOCAB)
        model = tiny_model(cfg, head)
        with torch.no_grad():  # norms away from 1 so that biases/scales matter
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        return model.eval()

    return build


METHODS = {
    "lora": {"method": "lora", "r": 4, "lora_alpha": 8},
    "rslora": {"method": "lora", "r": 4, "use_rslora": True, "target_modules": "all-linear"},
    "lora_regex": {"method": "lora", "r": 2, "target_modules": r"model\.layers\.1\.mlp\.(up|down)_proj"},
    "dora": {"method": "dora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "qlora": {"method": "qlora", "r": 4, "blocksize": 32},
    "adalora": {"method": "adalora", "init_r": 6, "target_r": 2, "total_step": 10},
    "houlsby": {"method": "adapter", "style": "houlsby", "reduction_factor": 8},
    "pfeiffer": {"method": "adapter", "style": "pfeiffer", "reduction_factor": 8, "activation": "gelu"},
    "prefix": {"method": "prefix", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
    "prefix_direct": {"method": "prefix", "num_virtual_tokens": 3, "prefix_projection": False},
    "prompt": {"method": "prompt", "num_virtual_tokens": 3, "init": "vocab"},
    "ptuning_mlp": {"method": "ptuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
    "ptuning_lstm": {"method": "ptuning", "num_virtual_tokens": 3, "encoder_hidden_size": 8,
                     "encoder_reparameterization_type": "LSTM"},
    "ptuning_v2": {"method": "ptuning_v2", "num_virtual_tokens": 3},
    "bitfit": {"method": "bitfit", "add_missing_biases": True},
    "ia3": {"method": "ia3"},
    "unipelt": {"method": "unipelt", "lora_r": 2, "num_virtual_tokens": 2, "prefix_hidden_size": 8,
                "adapter_reduction_factor": 8},
}
IDENTITY_AT_INIT = {"lora", "rslora", "lora_regex", "dora", "qlora", "adalora", "houlsby", "pfeiffer", "bitfit",
                    "ia3"}
NOT_MERGEABLE = {"houlsby", "pfeiffer", "unipelt"}


def perturb(model: peft.PeftModel, scale: float = 0.2) -> None:
    """Move every adapter parameter away from its init so merges and round trips are tested on real values."""
    with torch.no_grad():
        for _, p in model.named_adapter_parameters():
            p.add_(torch.randn_like(p) * scale)


def ids(b: int = 2, t: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_only_adapter_trains_and_base_is_frozen(name: str, tiny) -> None:
    model = peft.apply(tiny(), METHODS[name]).train()
    adapter = {id(p) for _, p in model.named_adapter_parameters()}
    trainable = {id(p) for _, p in peft.trainable_parameters(model)}
    assert adapter and trainable == adapter
    model(ids()).logits.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if id(p) not in adapter:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.named_adapter_parameters())


@pytest.mark.parametrize("name", sorted(IDENTITY_AT_INIT))
def test_output_equals_base_at_init(name: str, tiny) -> None:
    base = tiny()
    reference = copy.deepcopy(base)
    if name == "qlora":  # the base of QLoRA is the quantised model
        peft.quantize_model(reference, blocksize=32)
    x = ids()
    expected = reference(x).logits
    model = peft.apply(base, METHODS[name])
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merge(name: str, tiny) -> None:
    model = peft.apply(tiny(), METHODS[name])
    perturb(model)
    x = ids()
    before = model(x).logits
    if name in NOT_MERGEABLE:
        with pytest.raises(peft.PeftError):
            peft.merge(model)
        return
    merged = peft.merge(model)
    torch.testing.assert_close(merged(x).logits, before, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, peft.model.AdapterLayer) for m in merged.modules())
    if name.startswith(("prefix", "prompt", "ptuning")):
        provider = merged.providers["default"]
        assert isinstance(merged, peft.PeftModel) and getattr(provider, "transform", None) is None
        assert getattr(provider, "reparam", None) is None
    else:
        assert isinstance(merged, LanguageModel)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_load_round_trip(name: str, tmp_path, tiny) -> None:
    base = tiny()
    fresh = copy.deepcopy(base)
    model = peft.apply(base, METHODS[name])
    perturb(model)
    x = ids()
    expected = model(x).logits
    peft.save_adapter(model, tmp_path / "ad", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert ("peft_type" in config) != ("lmcraft_method" in config)
    loaded = peft.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-6)
    adapter = {id(p) for _, p in loaded.named_adapter_parameters()}
    assert {id(p) for _, p in peft.trainable_parameters(loaded)} == adapter


def test_peft_layout_names(tmp_path, tiny) -> None:
    from safetensors.torch import load_file

    model = peft.apply(tiny(), {"method": "dora", "r": 4})
    peft.save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] and config["task_type"] == "CAUSAL_LM"
    model = peft.apply(tiny(), {"method": "prefix", "num_virtual_tokens": 3, "encoder_hidden_size": 8})
    peft.save_adapter(model, tmp_path / "prefix")
    tensors = load_file(str(tmp_path / "prefix" / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tuple(tensors["prompt_embeddings"].shape) == (3, 2 * 2 * 32)


def test_multiple_lora_adapters_switch_and_disable(tiny) -> None:
    base = tiny()
    x = ids()
    expected = base(x).logits
    model = peft.apply(base, {"method": "lora", "r": 4}, adapter_name="sft")
    perturb(model)
    peft.apply(model, {"method": "lora", "r": 2, "target_modules": ["k_proj"]}, adapter_name="dpo")
    perturb(model)
    assert model.active_adapter == "dpo"
    dpo = model(x).logits
    model.set_adapter("sft")
    sft = model(x).logits
    assert not torch.allclose(sft, dpo) and not torch.allclose(sft, expected)
    assert all("sft" in n for n, _ in peft.trainable_parameters(model))
    with model.disable_adapters():
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x).logits, sft, rtol=0, atol=0)
    model.set_adapter("dpo")
    torch.testing.assert_close(model(x).logits, dpo, rtol=0, atol=0)
    with pytest.raises(peft.PeftError):
        model.set_adapter("nope")


def test_disable_adapters_for_prompt_methods(tiny) -> None:
    base = tiny()
    x = ids()
    expected = base(x).logits
    model = peft.apply(base, METHODS["prefix"])
    assert not torch.allclose(model(x).logits, expected)
    with model.disable_adapters():
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)


def test_print_trainable_parameters(capsys, tiny) -> None:
    model = peft.apply(tiny(), {"method": "lora", "r": 4})
    line = peft.print_trainable_parameters(model)
    trainable, total = peft.count_parameters(model)
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # 2 layers; q: 64 -> 64, v: 64 -> 32
    assert total == tiny().num_parameters() + trainable
    assert capsys.readouterr().out.strip() == line
    assert line.startswith(f"trainable params: {trainable:,} / total {total:,} (")


@pytest.mark.parametrize("name", ["prompt", "ptuning_mlp", "prefix", "unipelt"])
def test_kv_cache_decoding_matches_full_forward(name: str, tiny) -> None:
    model = peft.apply(tiny(), METHODS[name])
    perturb(model)
    x = ids(2, 7)
    full = model(x).logits[:, -1]
    cache = model.new_cache(2, 16)
    model(x[:, :5], past_key_values=cache)
    model(x[:, 5:6], past_key_values=cache)
    step = model(x[:, 6:7], past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_prompt_outputs_align_with_input_and_mask(tiny) -> None:
    model = peft.apply(tiny(), {"method": "prompt", "num_virtual_tokens": 4, "init": "text",
                                "init_token_ids": [5, 6, 7]})
    table = model.providers["default"].embeddings()
    emb = model.base_model.get_input_embeddings().weight
    torch.testing.assert_close(table, emb[[5, 6, 7, 5]])
    x = ids(2, 5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model(x, attention_mask=mask)
    assert out.logits.shape == (2, 5, VOCAB) and out.hidden_states.shape == (2, 5, 64)
    torch.testing.assert_close(out.logits[1], model(x[1:]).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0, 2:], model(x[:1, 2:]).logits[0], rtol=1e-4, atol=1e-5)


def test_bitfit_on_model_with_biases_and_head(tiny) -> None:
    base = tiny("gpt2", head="cls")
    model = peft.apply(base, {"method": "bitfit", "train_head": True})
    names = [n for n, _ in model.named_adapter_parameters()]
    assert any(n.endswith("q_proj.bias_delta") for n in names)
    assert any(n.endswith("attn_norm.bias_delta") for n in names)
    assert "head.classifier.weight" in names
    with pytest.raises(peft.PeftError, match="add_missing_biases"):
        peft.apply(tiny(), {"method": "bitfit"})


def test_gpt2_family_lora_and_merge(tiny) -> None:
    model = peft.apply(tiny("gpt2"), {"method": "lora", "r": 2, "target_modules": ["q_proj", "up_proj"]})
    perturb(model)
    x = ids()
    before = model(x).logits
    torch.testing.assert_close(peft.merge(model)(x).logits, before, rtol=1e-4, atol=1e-5)


def test_config_errors(tiny) -> None:
    with pytest.raises(ConfigError, match="Did you mean|unknown key"):
        peft.config_from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ConfigError, match="unknown peft method"):
        peft.config_from_dict({"method": "loraa"})
    with pytest.raises(ConfigError, match="total_step"):
        peft.config_from_dict({"method": "adalora"})
    with pytest.raises(peft.PeftError, match="no module matches"):
        peft.apply(tiny(), {"method": "lora", "target_modules": ["c_attn"]})


# ---- NF4 / QLoRA -----------------------------------------------------------------------------------------
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]  # bitsandbytes' hard-coded NF4 table


def test_nf4_code_values() -> None:
    torch.testing.assert_close(nf4_code(), torch.tensor(BNB_NF4), rtol=0, atol=1e-6)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_dequantisation_error_bound(double_quant: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.linspace(0.1, 3, 80)  # varied block scales
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel() // 2
    err = (dequantize_nf4(q) - w).abs().view(-1, 64)
    absmax = w.abs().view(-1, 64).amax(1)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    bound = absmax * half_gap
    if double_quant:
        assert q.absmax_q.dtype == torch.int8
        absmax_err = (q.block_absmax() - absmax).abs()
        assert (absmax_err <= q.absmax_scale.max() / 2 + 1e-6).all()
        bound = bound + absmax_err
    assert (err.amax(1) <= bound * (1 + 1e-5) + 1e-7).all()
    # values on the code grid survive exactly; zeros stay zero
    grid = NF4_CODE[torch.randint(0, 16, (64,))] * 2.5
    grid[0] = 2.5
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(grid, 64, False)), grid)
    assert dequantize_nf4(quantize_nf4(torch.zeros(64), 64, double_quant)).abs().max() == 0


def test_nf4_linear_forward_and_odd_sizes() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(33, 7)
    q = NF4Linear(lin, blocksize=16)
    x = torch.randn(3, 33)
    expected = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(q(x), expected)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.1
    assert q.weight_numel == 33 * 7 and not any(p.requires_grad for p in q.parameters())


def test_qlora_counts_quantised_weights_and_merges_to_dense(tiny) -> None:
    base = tiny()
    n_full = base.num_parameters()
    model = peft.apply(base, METHODS["qlora"])
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    trainable, total = peft.count_parameters(model)
    assert total == n_full + trainable
    merged = peft.merge(model)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())


# ---- AdaLoRA -------------------------------------------------------------------------------------------
def test_adalora_allocation_schedule_and_regulariser(tmp_path, tiny) -> None:
    cfg = {"method": "adalora", "init_r": 6, "target_r": 2, "total_step": 8, "tinit": 1, "tfinal": 2,
           "target_modules": ["q_proj", "v_proj", "up_proj"]}
    base = tiny()
    fresh = copy.deepcopy(base)
    model = peft.apply(base, cfg).train()
    opt = torch.optim.SGD([p for _, p in peft.trainable_parameters(model)], lr=0.05)
    x = ids()
    budgets = []
    for step in range(1, 9):
        loss = model(x).logits.float().logsumexp(-1).mean() + peft.regularization_loss(model)
        loss.backward()
        opt.step()
        budgets.append(peft.update_and_allocate(model, step))
        opt.zero_grad()
    assert budgets[0] == 6 * 6 and budgets[-1] == 2 * 6
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    pattern = model.peft_configs["default"].rank_pattern
    assert len(pattern) == 6 and sum(sum(v) for v in pattern.values()) <= 2 * 6
    for layer in (m for _, m in model.adapter_layers()):
        kept = torch.tensor(pattern[f"{layer_path(model, layer)}.lora_E"])
        assert (layer.lora_E["default"][~kept] == 0).all()
    # orthogonality penalty: positive now, zero for orthonormal P and Q
    assert peft.regularization_loss(model) > 0
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            a.copy_(torch.linalg.qr(torch.randn(a.shape[1], a.shape[0]))[0].T)
            b.copy_(torch.linalg.qr(torch.randn(b.shape[0], b.shape[1]))[0])
    assert peft.adalora.orthogonal_regularizer(model, "default") < 1e-10
    # saved with only the surviving triplets, loads back to the same outputs
    model.eval()
    expected = model(x).logits
    peft.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == pattern
    loaded = peft.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-6)
    sizes = [m.lora_E["default"].shape[0] for _, m in loaded.adapter_layers()]
    assert sum(sizes) == sum(sum(v) for v in pattern.values())


def layer_path(model: peft.PeftModel, layer: torch.nn.Module) -> str:
    return next(peft.model.clean_path(p) for p, m in model.adapter_layers() if m is layer)


@pytest.mark.parametrize("name", ["prompt", "prefix", "lora"])
def test_generate_with_adapter_and_left_padding(name: str, tiny) -> None:
    """lmcraft.generate on a PeftModel (KV cache, left-padded batch) = greedy full forwards row by row."""
    from lmcraft.generate import GenerationConfig, generate

    model = peft.apply(tiny(), METHODS[name])
    perturb(model, 1.0)
    prompts = [[1, 5, 9, 33, 70], [2, 40]]
    result = generate(model, prompts, GenerationConfig(max_new_tokens=6, eos_token_ids=()))
    for row, prompt in zip(result.tokens, prompts, strict=True):
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(6):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert row == seq[0, len(prompt):].tolist()


def test_adalora_hook_needs_gradients(tiny) -> None:
    model = peft.apply(tiny(), METHODS["adalora"])
    with pytest.raises(peft.PeftError, match="after loss.backward"):
        peft.update_and_allocate(model, 1)


@pytest.mark.parametrize("name", ["lora", "prefix", "prompt", "houlsby", "ia3", "ptuning_v2"])
@pytest.mark.parametrize("head", ["cls", "token_cls"])
def test_encoder_with_task_heads(name: str, head: str) -> None:
    torch.manual_seed(0)
    cfg = preset("bert-tiny", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=VOCAB,
                 num_labels=3)
    model = peft.apply(LanguageModel(cfg, head).eval(), METHODS[name])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = model(ids(), attention_mask=mask, token_type_ids=torch.zeros(2, 6, dtype=torch.long))
    assert out.logits.shape == ((2, 3) if head == "cls" else (2, 6, 3))
    assert out.hidden_states.shape == (2, 6, 64)


def test_qlora_bfloat16_compute(tiny) -> None:
    model = peft.apply(tiny(), {"method": "qlora", "r": 2, "compute_dtype": "bfloat16"})
    assert all(p.dtype == torch.bfloat16 for _, p in model.named_adapter_parameters())
    out = model(ids()).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_stacking_different_wrappers_on_one_module_is_refused(tiny) -> None:
    model = peft.apply(tiny(), {"method": "ia3"}, adapter_name="a")
    with pytest.raises(peft.PeftError, match="cannot be stacked"):
        peft.apply(model, {"method": "lora", "target_modules": ["k_proj"]}, adapter_name="b")
    model = peft.apply(tiny(), {"method": "lora"}, adapter_name="a")
    with pytest.raises(peft.PeftError, match="LoRALinear adapter of another method"):
        peft.apply(model, {"method": "dora"}, adapter_name="b")
