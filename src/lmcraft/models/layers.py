"""Transformer building blocks shared by decoders and encoders.

    attention:  softmax(s Q K^T + mask) V, s = 1/sqrt(d) by default   (torch scaled_dot_product_attention)
    gated MLP:  down(act(gate x) * up x)                (SwiGLU when act = silu, GeGLU when gelu)
    plain MLP:  down(act(up x))                         (GPT-2, BERT)
    sparse MoE: sum over the top-k experts of p_e * gated MLP_e(x)   (Qwen3-MoE layers; `models.moe`)
    pre-norm block:   x = x + m attn(norm1 x);  x = x + m mlp(norm2 x)       (m = residual_multiplier, 1 mostly)
    sandwich block:   x = x + m out1(attn(norm1 x));  x = x + m out2(mlp(norm2 x))   (Gemma 2/3)
    output-norm block: x = x + m out1(attn x);  x = x + m out2(mlp x)            (OLMo 2)
    post-norm block:  x = norm1(x + attn x);  x = norm2(x + mlp x)  (BERT)

Keys/values may be extended in two ways without touching these modules from outside:
a `KVCache` (generation) and per-layer `prefix` key/values (prefix tuning), both passed to forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmcraft.models.config import ModelConfig
from lmcraft.models.moe import SparseMoE
from lmcraft.models.rope import RoPE, apply_rope

LayerPrefix = tuple[torch.Tensor, torch.Tensor]  # one layer's prefix (keys, values), each (1 or B, kv_heads, P, D)

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,  # the BERT/RoBERTa pooler
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32.

    With `unit_offset` (Gemma) the gain is (1 + w), w starting at 0, and the product is taken in fp32 before
    casting back: y = (x / sqrt(mean(x^2) + eps) * (1 + w)).to(dtype).
    """

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same math in one call
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The family's norm over `dim` features (default: hidden_size); q/k norms pass their width."""
    dim = dim or cfg.hidden_size
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_unit_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


class KVCache:
    """Pre-allocated keys/values for every layer: (B, kv_heads, capacity, D), filled left to right.

    `update(layer, k, v)` writes the new positions and returns the filled part; `advance(n)` is
    called once per forward, after every layer has written its `n` new positions.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[2]
        end = self.length + n
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, self.length, n).copy_(k)
        values.narrow(2, self.length, n).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.length += n

    def _grow(self, capacity: int) -> None:
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                grown = t.new_zeros((*t.shape[:2], capacity, t.shape[3]))
                grown[:, :, : t.shape[2]] = t
                store[i] = grown


@dataclass
class AttentionMask:
    """What a forward pass needs to mask attention; `mask` is None when SDPA flags suffice."""

    mask: torch.Tensor | None  # bool (B, 1, T, S), True = may attend
    is_causal: bool


def build_attention_mask(
    padding_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    prefix_len: int,
    causal: bool,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionMask:
    """Combine causality, padding (B, past_len + q_len; 1 = real token), prefix and sliding window.

    A sliding window w lets a causal query see its last w keys (itself included), a bidirectional one the keys
    within w // 2 on either side (ModernBERT's local attention, w = local_attention).

    Keys are laid out as [prefix | past | current]. Prefix keys are visible to every real query. A query
    always sees its own key, so rows of padding queries never become all-masked (which gives NaN).

    A 4-D `padding_mask` (B or 1, 1, q_len, prefix_len + past_len + q_len), bool with True = may attend, is an
    explicit mask (e.g. block-diagonal causal attention over documents packed in one window): it is used as
    given, without adding causality, padding or window rules.
    """
    kv_len = past_len + q_len
    if padding_mask is not None and padding_mask.dim() == 4:
        expected = (1, q_len, prefix_len + kv_len)
        if padding_mask.dtype != torch.bool or tuple(padding_mask.shape[1:]) != expected:
            raise ValueError(f"an explicit attention mask must be bool of shape (B, {', '.join(map(str, expected))}); "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        return AttentionMask(padding_mask, False)
    reach = None if sliding_window is None else sliding_window - 1 if causal else sliding_window // 2
    window_matters = reach is not None and kv_len - 1 > reach  # the farthest key distance exceeds the reach
    if padding_mask is None and prefix_len == 0 and not window_matters:
        if not causal or q_len == 1:
            return AttentionMask(None, False)
        if past_len == 0:
            return AttentionMask(None, True)
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = k_pos <= q_pos
    if window_matters:
        allowed = allowed & ((q_pos - k_pos).abs() <= reach)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, -kv_len:].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    if prefix_len:
        prefix = torch.ones(*allowed.shape[:3], prefix_len, dtype=torch.bool, device=device)
        allowed = torch.cat([prefix.expand(allowed.shape[0], -1, -1, -1), allowed], dim=-1)
    return AttentionMask(allowed, False)


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads, RoPE, KV cache and prefix keys.

        q, k, v = W_q x, W_k x, W_v x           (B, heads, T, D); k, v have kv_heads <= heads heads
        q, k    = n_q(q), n_k(k)                 (`qk_norm`: RMSNorm over each head's D, or over all heads)
        q, k    = rope(q), rope(k)               (RoPE models, except `nope_layers`; `rope` = (cos, sin))
        k, v    = [prefix | cache | k, v]        (keys/values seen by the new queries)
        out     = W_o softmax(s q k^T + mask) v   (s = attention_scale, default 1 / sqrt(D))

    With `attn_logit_softcap` c the scores become c tanh(s q k^T / c) before the mask; SDPA has no hook for
    that, so this one case computes softmax(scores) v explicitly (`softcapped_attention`).

    Query head h reads key/value head h // (heads / kv_heads). Generation swaps in a faster equivalent for
    single-token steps of plain attentions (`lmcraft.generate.fast_decode`); this is the one reference path.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.out_bias)
        self.dropout = cfg.attention_dropout
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, cfg.head_dim if per_head else cfg.num_heads * cfg.head_dim)
            self.k_norm = make_norm(cfg, cfg.head_dim if per_head else cfg.num_kv_heads * cfg.head_dim)
        self.use_rope = layer_idx not in cfg.nope_layers
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap

    @property
    def plain(self) -> bool:
        """q, k, v are bare projections, rotated (if at all) on every layer, scored by 1/sqrt(D) without a cap:
        the attention the decode fast path reproduces."""
        return self.qk_norm is None and self.use_rope and self.scale is None and self.softcap is None

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: RoPE | None = None,
        cache: KVCache | None = None,
        prefix: LayerPrefix | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None and self.use_rope:
            q, k = apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if prefix is not None:
            k, v = with_prefix(k, v, prefix)
        dropout = self.dropout if self.training else 0.0
        if self.softcap is None:
            k, v, gqa = sdpa_kv_heads(q, k, v, mask)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, dropout_p=dropout, scale=self.scale,
                enable_gqa=gqa,
            )
        else:
            out = softcapped_attention(q, k, v, mask, self.scale or self.head_dim**-0.5, self.softcap, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


def repeat_kv(k: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, KV, S, D) -> (B, KV * groups, S, D): kv head j copied for query heads j * groups .. (j+1) * groups - 1,
    i.e. query head h reads kv head h // groups."""
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def sdpa_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k, v, enable_gqa) for SDPA with q (B, H, T, D) and k, v (B, KV, S, D).

    SDPA reads kv head h // groups for query head h itself (`enable_gqa`: nothing copied), but on CUDA only its
    flash and math kernels do. Flash takes no explicit mask (a padded batch), which would leave the math kernel
    and its whole T x S score matrix in memory; there, for more than one query row, the kv heads are copied
    (`repeat_kv`) so the memory-efficient kernel runs. One query row (decoding) keeps `enable_gqa`: its scores are
    one row."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.is_cuda and mask.mask is not None and q.shape[2] > 1:
        return *repeat_kv(k, v, groups), False
    return k, v, groups > 1


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float,
                         softcap: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(c tanh(s q k^T / c) + mask) v for q (B, H, T, D) and k, v (B, KV, S, D); softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = repeat_kv(k, v, groups)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * (scale / softcap)) * softcap
    allowed = mask.mask
    if mask.is_causal:
        t, s = scores.shape[-2:]
        allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.float().softmax(-1), dropout).to(q.dtype)
    return torch.matmul(probs, v)


def with_prefix(k: torch.Tensor, v: torch.Tensor, prefix: LayerPrefix) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend per-layer prefix keys/values (1 or B, kv_heads, P, D) to k, v (B, kv_heads, S, D)."""
    b = k.shape[0]
    pk, pv = prefix
    k = torch.cat([pk.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
    return k, v


class MLP(nn.Module):
    """Gated: down(act(gate x) * up x).  Plain: down(act(up x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    """One transformer layer: attention and MLP sub-layers with residuals; pre-, sandwich, output- or post-norm.

    `attn_norm`/`mlp_norm` are the sub-layers' input norms (BERT: the norms after the residual add);
    `attn_out_norm`/`mlp_out_norm` norm the sub-layers' outputs (`post_norms`). `checkpointed` ("attention" or
    "mlp", set by `Backbone.checkpointing`) recomputes that sub-layer (with its norm) in the backward pass instead of
    keeping its intermediate activations (non-reentrant checkpointing).
    """

    checkpointed: str | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm, self.post_norms = cfg.pre_norm, cfg.post_norms
        if cfg.pre_norm or not cfg.post_norms:
            self.attn_norm = make_norm(cfg) if layer_idx or cfg.first_attn_norm else nn.Identity()
            self.mlp_norm = make_norm(cfg)
        if cfg.post_norms:
            self.attn_out_norm = make_norm(cfg)
            self.mlp_out_norm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = SparseMoE(cfg, ACTIVATIONS[cfg.activation]) if cfg.is_moe_layer(layer_idx) else MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(
        self,
        x: torch.Tensor,
        mask: AttentionMask,
        rope: RoPE | None = None,
        cache: KVCache | None = None,
        prefix: LayerPrefix | None = None,
    ) -> torch.Tensor:
        drop = self.dropout if self.training else _identity  # eval: skip the no-op module call
        if not (self.pre_norm or self.post_norms):
            x = self.attn_norm(x + drop(self._part("attention", lambda y: self.self_attn(y, mask, rope, cache, prefix),
                                                   x)))
            return self.mlp_norm(x + drop(self._part("mlp", self.mlp, x)))
        a = self._part("attention", lambda y: self.self_attn(self.attn_norm(y) if self.pre_norm else y, mask, rope,
                                                             cache, prefix), x)
        x = x + self._residual(drop(self.attn_out_norm(a) if self.post_norms else a))
        m = self._part("mlp", lambda y: self.mlp(self.mlp_norm(y) if self.pre_norm else y), x)
        return x + self._residual(drop(self.mlp_out_norm(m) if self.post_norms else m))

    def _part(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed == name and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def _residual(self, f: torch.Tensor) -> torch.Tensor:
        return f if self.residual_multiplier == 1.0 else f * self.residual_multiplier


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
