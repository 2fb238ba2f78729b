"""The same code paths on every device this machine has (CPU always, CUDA when present): generation on both
caches, the fused AdamW, `precision: auto`, and on CUDA a fused SDPA kernel (flash or memory-efficient) for the
model's attention. `bench/gpu_check.sh` runs this file on a GPU machine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmcraft.generate import GenerationConfig, generate
from lmcraft.precision import resolve_precision
from lmcraft.train.optim import build_optimizer, param_groups

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13]]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_equal_cpu_fp32(tiny_model: Callable[..., torch.nn.Module], device: str, cache: str) -> None:
    config = GenerationConfig(max_new_tokens=16, eos_token_ids=(), cache=cache)
    reference = generate(tiny_model(vocab_size=97, num_kv_heads=2).eval(), PROMPTS,
                         GenerationConfig(max_new_tokens=16, eos_token_ids=()))
    result = generate(tiny_model(vocab_size=97, num_kv_heads=2).to(device).eval(), PROMPTS, config)
    assert result.path == cache and result.tokens == reference.tokens


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_is_fused_on_the_device(tiny_model: Callable[..., torch.nn.Module], device: str) -> None:
    model = tiny_model().to(device)
    optimizer = build_optimizer(param_groups(model, lr=1e-3, weight_decay=0.0), 1e-3, (0.9, 0.999), 1e-8)
    assert optimizer.defaults["fused"] is True


@cuda_only
def test_auto_precision_is_bf16_on_cuda_with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMCRAFT_AUTO_PRECISION", raising=False)
    want = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda"), workload="decode").precision == want


@cuda_only
def test_attention_runs_on_a_fused_cuda_kernel(tiny_model: Callable[..., torch.nn.Module]) -> None:
    """Causal training attention (GQA, no padding) and padded batches run with only the flash and memory-efficient
    SDPA kernels allowed (no kernel for these inputs raises), in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model(vocab_size=97, num_heads=4, num_kv_heads=2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        model(ids).logits.float().sum().backward()
        with torch.no_grad():
            model(ids, attention_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_copied_kv_heads_give_sdpa_grouped_attention(device: str) -> None:
    """A padded grouped-query batch on CUDA gets its kv heads copied (`repeat_kv`) so a fused kernel takes it: the
    same output as SDPA's own grouped attention; one query row, or a CPU, keeps SDPA's uncopied `enable_gqa`."""
    from lmcraft.models.layers import AttentionMask, repeat_kv, sdpa_kv_heads

    q, k, v = torch.randn(2, 6, 5, 8, device=device), *torch.randn(2, 2, 2, 5, 8, device=device)
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=device).tril()
    allowed[1, ..., :2] = False  # the second row is left-padded by two
    allowed[1, ..., :2, :2] = True  # (padding rows attend to themselves: no empty row)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    copied = torch.nn.functional.scaled_dot_product_attention(q, *repeat_kv(k, v, 3), attn_mask=allowed)
    torch.testing.assert_close(copied, want)
    _, _, gqa = sdpa_kv_heads(q, k, v, AttentionMask(allowed, False))
    assert gqa is (device == "cpu")
    assert sdpa_kv_heads(q[:, :, -1:], k, v, AttentionMask(allowed[:, :, -1:], False))[2] is True
