"""The decode fast path: equivalent, faster arithmetic for single-token steps, swapped in for a generation run.

`fast_decoding(model)` replaces, for the duration of a `with` block, every plain `Attention` (`Attention.plain`:
no q/k norms, RoPE on the layer, default scale, no soft cap; the others keep the reference path) by a
`DecodeAttention` around it and (with `fuse=True`) every gated `MLP` by a `FusedGatedMLP`; on exit the
original modules are put back. The model files keep one reference path; only generation uses these.

For one new token per row (x: (B, 1, H), eval mode, with a KV cache) `DecodeAttention` computes:

- q/k/v in one matrix product with the weights stacked [W_q; W_k; W_v] (`fuse=True`, plain `nn.Linear`s only;
  an adapter-wrapped projection keeps its own forward and q, k, v are computed separately);
- the rotation of q and k as one matrix per row, shared by all layers of the step:
  rope(x) = x * cos + rotate_half(x) * sin = x @ M,  M = diag(cos) + P diag(sin), where P is the signed
  permutation with x @ P = rotate_half(x); every query and key head rotates in one batched product;
- grouped-query attention as rows: the `groups` query heads sharing one key/value head become `groups` query
  rows of that head, so the cached keys/values are read in place instead of being repeated per query head.

`FusedGatedMLP` computes gate and up in one product with [W_gate; W_up] while gradients are off. Every other call
(prefill, training, gradients on) goes to the original module.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.models.layers import MLP, Attention, AttentionMask, KVCache, LayerPrefix, with_prefix
from lmcraft.models.rope import RoPE

__all__ = ["DecodeAttention", "FusedGatedMLP", "RotationMatrix", "fast_decoding", "stack_linears"]

StackedLinear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias) of several linears stacked on dim 0


def stack_linears(*layers: nn.Module) -> StackedLinear | None:
    """(weights stacked along the output dim, biases likewise or None); None unless all are plain nn.Linear."""
    if not all(type(layer) is nn.Linear for layer in layers):
        return None
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])
        has_bias = [layer.bias is not None for layer in layers]
        if any(has_bias) and not all(has_bias):
            return None
        bias = torch.cat([layer.bias for layer in layers]) if all(has_bias) else None
    return weight, bias


@functools.cache
def _half_rotation(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """P (D, D) with x @ P = rotate_half(x) = [-x2, x1]."""
    half = dim // 2
    p = torch.zeros(dim, dim, dtype=dtype, device=device)
    idx = torch.arange(half, device=device)
    p[idx + half, idx] = -1.0
    p[idx, idx + half] = 1.0
    return p


class RotationMatrix:
    """M = diag(cos) + P diag(sin) (B or 1, D, D) of a single-token step, built once per step for all layers.

    Every layer of one forward pass receives the same `cos` tensor, so the matrix is rebuilt only when a new
    one arrives.
    """

    def __init__(self) -> None:
        self._cos: torch.Tensor | None = None
        self._matrix: torch.Tensor | None = None

    def __call__(self, rope: RoPE) -> torch.Tensor:
        cos_table, sin_table = rope
        if cos_table is not self._cos or self._matrix is None:
            cos, sin = cos_table[:, 0, 0], sin_table[:, 0, 0]  # (B, D)
            self._matrix = torch.diag_embed(cos) + _half_rotation(cos.shape[-1], cos.dtype, cos.device) * sin[:, None]
            self._cos = cos_table
        return self._matrix


class DecodeAttention(nn.Module):
    """`attention` with the fast path for single-token cached steps in eval mode (see the module docstring)."""

    def __init__(self, attention: Attention, rotation: RotationMatrix, fuse: bool) -> None:
        super().__init__()
        self.attention = attention
        self.rotation = rotation
        self.fused = stack_linears(attention.q_proj, attention.k_proj, attention.v_proj) if fuse else None

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: RoPE | None = None,
        cache: KVCache | None = None,
        prefix: LayerPrefix | None = None,
    ) -> torch.Tensor:
        attn = self.attention
        if x.shape[1] != 1 or cache is None or attn.training:
            return attn(x, mask, rope, cache, prefix)
        b = x.shape[0]
        h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        if self.fused is not None and not torch.is_grad_enabled():
            qkv = F.linear(x, *self.fused).view(b, h + 2 * kv, 1, d)  # T = 1: heads need no transpose
            qk, v = qkv.split((h + kv, kv), dim=1)
        else:
            qk = torch.cat((attn.q_proj(x), attn.k_proj(x)), dim=-1).view(b, h + kv, 1, d)
            v = attn.v_proj(x).view(b, kv, 1, d)
        if rope is not None:
            qk = torch.bmm(qk.view(b, h + kv, d), self.rotation(rope).expand(b, d, d)).view(b, h + kv, 1, d)
        q, k = qk.split((h, kv), dim=1)
        k, v = cache.update(attn.layer_idx, k, v)
        if prefix is not None:
            k, v = with_prefix(k, v, prefix)
        q = q.reshape(b, kv, h // kv, d)  # GQA as rows: the query heads of one kv head are its query rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask)
        return attn.o_proj(out.reshape(b, 1, h * d))


class FusedGatedMLP(nn.Module):
    """`mlp` (gated) with gate and up computed in one product while gradients are off."""

    def __init__(self, mlp: MLP, fused: StackedLinear) -> None:
        super().__init__()
        self.mlp = mlp
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.mlp(x)
        gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)
        return self.mlp.down_proj(self.mlp.act(gate) * up)


def _fast_module(module: nn.Module, rotation: RotationMatrix, fuse: bool) -> nn.Module | None:
    """The fast stand-in for `module`, or None when it has none."""
    if isinstance(module, Attention) and module.plain:
        return DecodeAttention(module, rotation, fuse).train(module.training)
    if fuse and isinstance(module, MLP) and module.gated:
        fused = stack_linears(module.gate_proj, module.up_proj)
        return None if fused is None else FusedGatedMLP(module, fused).train(module.training)
    return None


@contextmanager
def fast_decoding(model: nn.Module, fuse: bool = True) -> Iterator[None]:
    """Install the decode fast path in `model` for the block; `fuse=False` skips the stacked weight copies
    (saving their memory) but keeps the single-token attention path."""
    rotation = RotationMatrix()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, module in list(model.named_modules()):
            fast = _fast_module(module, rotation, fuse)
            if fast is None:
                continue
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, attr, fast)
            swapped.append((parent, attr, module))
        yield
    finally:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
