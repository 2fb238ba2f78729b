"""Qwen3-MoE parity with transformers: a tiny random Qwen3MoeForCausalLM (4 experts, top-2, one dense layer via
mlp_only_layers, norm_topk_prob) loads into lmcraft with the same logits (unpadded, left- and right-padded rows),
saves back in the per-expert HF layout that transformers reads, decodes through the KV cache to transformers'
greedy tokens, and gives transformers' load-balancing loss (`load_balancing_loss_func`, padding masked) and the
same per-expert routing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lmcraft import hub
from lmcraft.models.moe import SparseMoE
from test_parity_hf import MEASURED, ROPE, batch, diff, hf_to_ours, our_logits, positions

pytestmark = pytest.mark.parity

MOE = dict(ROPE, head_dim=16, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           norm_topk_prob=True, mlp_only_layers=[1], router_aux_loss_coef=0.02)


@pytest.fixture(scope="module")
def transformers():  # noqa: ANN201 - the module
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def report() -> None:
    yield
    print("\nmax abs logit diff vs transformers:", {k: f"{v:.1e}" for k, v in sorted(MEASURED.items())})


def hf_moe(transformers, **keys):  # noqa: ANN001, ANN201
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**MOE, **keys}))


def test_qwen3_moe_from_hf_and_back(transformers, tmp_path: Path) -> None:
    hf_model = hf_moe(transformers)
    ours = hf_to_ours(tmp_path, hf_model)
    cfg = ours.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob,
            cfg.mlp_only_layers, cfg.router_aux_loss_coef) == (4, 2, 32, True, (1,), 0.02)
    assert [isinstance(layer.mlp, SparseMoE) for layer in ours.model.layers] == [True, False, True]
    assert ours.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 64, 64)
    for padding in (None, "left", "right"):
        ids, mask = batch(padding)
        with torch.no_grad():
            theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        diff(f"qwen3_moe:{padding}", our_logits(ours, ids, mask), theirs, mask)

    # saved by lmcraft in the per-expert layout, read by transformers and by lmcraft unchanged
    hub.save_model(ours, tmp_path / "out")
    keys = set(hub.hf_state_dict(ours))
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in keys and "model.layers.1.mlp.up_proj.weight" in keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = batch("right")
    with torch.no_grad():
        theirs = again(input_ids=ids, attention_mask=mask).logits
    diff("qwen3_moe:save", our_logits(ours, ids, mask), theirs, mask)
    reread = hub.load_model(tmp_path / "out")
    assert {**reread.config.to_dict(), "extra": {}} == {**cfg.to_dict(), "extra": {}}
    for (name, a), (_, b) in zip(ours.state_dict().items(), reread.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_qwen3_moe_generation_and_cache(transformers, tmp_path: Path) -> None:
    from lmcraft.generate import GenerationConfig, generate
    from test_parity_hf import cached_logits

    hf_model = hf_moe(transformers, norm_topk_prob=False)
    ours = hf_to_ours(tmp_path, hf_model)
    ids, mask = batch("left")
    diff("qwen3_moe:cache", cached_logits(ours, ids, mask, 6), our_logits(ours, ids, mask), mask)
    prompt = batch(None)[0][:, :6]
    tokens = generate(ours, prompt, GenerationConfig(max_new_tokens=6, eos_token_ids=())).tokens
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, 6:]
    assert tokens == expected.tolist()


@pytest.mark.parametrize("padding", [None, "right"])
def test_aux_loss_equals_transformers(transformers, tmp_path: Path, padding: str | None) -> None:
    hf_model = hf_moe(transformers)
    ours = hf_to_ours(tmp_path, hf_model)
    ids, mask = batch(padding)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        out = ours(ids, attention_mask=mask)
    aux = out.router.aux_loss()
    assert abs(float(aux) - float(theirs.aux_loss)) < 1e-5, (float(aux), float(theirs.aux_loss))
    assert abs(float(aux) - 2.0) > 1e-3  # not the uniform-routing value k: the test can see a wrong formula
    # the per-expert load: each layer's share of top-k assignments, from transformers' router logits
    real = torch.ones(ids.numel()) if mask is None else mask.reshape(-1).float()
    for layer, logits in enumerate(theirs.router_logits):
        chosen = logits.softmax(-1).topk(2, dim=-1).indices
        load = torch.zeros(4).index_add(0, chosen.reshape(-1), real.repeat_interleave(2))
        assert torch.allclose(out.router.expert_load()[layer], load / load.sum())


def test_clm_objective_adds_the_weighted_aux_loss(transformers, tmp_path: Path) -> None:
    """The pre-training loss of a MoE model is transformers' `loss` (CE + coef * aux), per target token."""
    from lmcraft.objectives.clm import CausalLM

    hf_model = hf_moe(transformers)
    ours = hf_to_ours(tmp_path, hf_model)
    ids, mask = batch("right")
    objective = CausalLM()
    example = objective.transform({"input_ids": ids, "attention_mask": mask})
    ours.train()  # the aux loss is a training term (dropout is 0: the same logits)
    with torch.no_grad():
        out = objective.loss(ours, example)
        theirs = hf_model(input_ids=ids, attention_mask=mask, labels=example["labels"], output_router_logits=True)
    assert abs(float(out.loss_sum) / out.num_targets - float(theirs.loss)) < 1e-5
    assert abs(float(out.metrics["aux_loss"]) - float(theirs.aux_loss)) < 1e-5
    loads = [float(out.metrics[f"expert_load/{e}"]) for e in range(4)]
    assert abs(sum(loads) - 1.0) < 1e-6 and len(out.metrics) == 5


# ---- LoRA on experts -------------------------------------------------------------------------------------------
LORA = {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "gate", "experts"]}


def test_lora_on_experts_equals_peft_param_wrapper(transformers, tmp_path: Path) -> None:
    """The same A, B in PEFT's `target_parameters` LoRA (ParamWrapper on the stacked experts and the router) and in
    lmcraft's `LoRAExperts`/`LoRALinear` give the same logits."""
    hf_peft = pytest.importorskip("peft")
    from lmcraft import peft

    hf_model = hf_moe(transformers)
    ours = peft.apply(hf_to_ours(tmp_path, hf_model), LORA)
    wrapped = hf_peft.get_peft_model(hf_model, hf_peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"],
        target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).eval()
    g = torch.Generator().manual_seed(3)
    copied = 0
    for path, module in wrapped.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = (torch.randn(m["default"].weight.shape, generator=g) * 0.3 for m in (module.lora_A, module.lora_B))
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
        name = getattr(module, "parameter_name", "weight")
        target = ours.base_model.get_submodule(".".join(p for p in path.split(".") if p != "base_layer"))
        mine = (target.lora_A["default"][name], target.lora_B["default"][name]) if name.endswith("_proj") else (
            target.lora_A["default"], target.lora_B["default"])
        with torch.no_grad():
            mine[0].weight.copy_(a)
            mine[1].weight.copy_(b)
        copied += 1
    assert copied == 3 + 2 * 3  # q_proj in 3 layers; router, gate_up and down stacks in 2 MoE layers
    ids, mask = batch("right")
    with torch.no_grad():
        theirs = wrapped(input_ids=ids, attention_mask=mask).logits
        with wrapped.disable_adapter():
            base = wrapped(input_ids=ids, attention_mask=mask).logits
    diff("qwen3_moe:lora", our_logits(ours, ids, mask), theirs, mask)
    assert float((theirs - base).abs().max()) > 0.1  # the adapters matter


def test_lora_on_experts_trains_and_merges(transformers, tmp_path: Path) -> None:
    """LoRA on experts + router + q_proj: the loss falls, only adapter tensors change, the adapter saves and loads,
    and merging gives the adapted model's logits."""
    from lmcraft import peft
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.peft.lora import LoRAExperts

    base = hf_to_ours(tmp_path, hf_moe(transformers))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.apply(base, LORA)
    assert sum(isinstance(m, LoRAExperts) for m in model.modules()) == 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts.lora_A.default.gate_up_proj" in n for n in trainable)
    assert all(".lora_" in n for n in trainable)
    ids, mask = batch("right")
    objective = CausalLM()
    example = objective.transform({"input_ids": ids, "attention_mask": mask})
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        out = objective.loss(model, example)
        loss = out.loss_sum / out.num_targets
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    for k, v in model.base_model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k
    adapted = our_logits(model, ids, mask)

    peft.save_adapter(model, tmp_path / "adapter")
    again = peft.load_adapter(hf_to_ours(tmp_path / "again", hf_moe(transformers)), tmp_path / "adapter")
    assert torch.equal(our_logits(again.eval(), ids, mask), adapted)
    merged = peft.merge(model)
    assert not any(isinstance(m, LoRAExperts) for m in merged.modules())
    diff("qwen3_moe:lora-merged", our_logits(merged, ids, mask), adapted, mask)
    plain = our_logits(hf_to_ours(tmp_path / "base", hf_moe(transformers)), ids, mask)
    assert float((adapted - plain).abs().max()) > 1e-3
