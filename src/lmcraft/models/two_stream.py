"""XLNet two-stream self-attention run with the weights of our own `Block`s (for permutation LM).

Given a factorisation order z (a permutation of 0..T-1) with rank r_i = position of token i in z, every layer
updates two streams with the same projections, MLP and norms:

    content h_i <- Block(Q = h_i, K/V = {h_j : r_j <= r_i})     (sees itself: ordinary representation)
    query   g_i <- Block(Q = g_i, K/V = {h_j : r_j <  r_i})     (never sees token i's content)

g starts from one learned vector w plus the position (and token-type) embedding of i: g_i^0 = embed(w, i).
The two masks alone decide visibility (no causal or sliding-window rule is added).
Positions use the backbone's own scheme (learned embeddings, or RoPE applied to the queries at the query's
position and to the keys at theirs); XLNet's relative positional encoding and segment recurrence are not used.
The query stream is only computed at the K target positions (the ones predicted), so every query has at least
one visible key as long as targets are not first in the order. The logits are the LM head on g.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.models.layers import Block, repeat_kv
from lmcraft.models.model import LanguageModel, ModelOutput
from lmcraft.models.rope import RoPE, rotate

__all__ = ["TwoStreamModel", "permutation_masks", "two_stream_layer"]

def permutation_masks(rank: torch.Tensor, target_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Content mask (B, 1, T, T): r_j <= r_i; query mask (B, 1, K, T): r_j < r_{target_k}. True = may attend."""
    content = rank[:, None, :] <= rank[:, :, None]
    target_rank = rank.gather(1, target_positions)
    query = rank[:, None, :] < target_rank[:, :, None]
    return content[:, None], query[:, None]


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)


def _rotate(x: torch.Tensor, rope: RoPE | None) -> torch.Tensor:
    return x if rope is None else rotate(x, *rope)


def _residual_and_mlp(block: Block, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of `Block.forward` after attention (pre-norm or post-norm)."""
    if block.pre_norm:
        x = x + block.dropout(attn_out)
        return x + block.dropout(block.mlp(block.mlp_norm(x)))
    x = block.attn_norm(x + block.dropout(attn_out))
    return block.mlp_norm(x + block.dropout(block.mlp(x)))


def two_stream_layer(block: Block, h: torch.Tensor, g: torch.Tensor, content_mask: torch.Tensor,
                     query_mask: torch.Tensor, rope_h: RoPE | None = None, rope_g: RoPE | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer on both streams: h (B, T, H) and g (B, K, H); keys/values come from h only."""
    attn = block.self_attn
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h_in = block.attn_norm(h) if block.pre_norm else h
    g_in = block.attn_norm(g) if block.pre_norm else g
    k = _rotate(_heads(attn.k_proj(h_in), nkv, d), rope_h)
    v = _heads(attn.v_proj(h_in), nkv, d)
    if nkv != nh:
        k, v = repeat_kv(k, v, nh // nkv)
    dropout = attn.dropout if block.training else 0.0
    outs = []
    for x_in, mask, rope in ((h_in, content_mask, rope_h), (g_in, query_mask, rope_g)):
        q = _rotate(_heads(attn.q_proj(x_in), nh, d), rope)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        outs.append(attn.o_proj(o.transpose(1, 2).reshape(x_in.shape[0], x_in.shape[1], nh * d)))
    return _residual_and_mlp(block, h, outs[0]), _residual_and_mlp(block, g, outs[1])


class TwoStreamModel(nn.Module):
    """A `LanguageModel` (`lm`, the model to keep) plus the learned query-stream start vector w."""

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__()
        self.lm = lm
        self.query_embed = nn.Parameter(torch.randn(lm.config.hidden_size) * lm.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, content_mask: torch.Tensor, query_mask: torch.Tensor,
                target_positions: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> ModelOutput:
        """Logits (B, K, V) of the query stream at `target_positions` (B, K); hidden_states = final g."""
        backbone, cfg = self.lm.model, self.lm.config
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, -1)
        target_types = token_type_ids.gather(1, target_positions) if token_type_ids is not None else None
        h = backbone.embed(input_ids, None, positions, token_type_ids)
        w = self.query_embed.to(h.dtype).expand(b, target_positions.shape[1], -1)
        g = backbone.embed(None, w, target_positions, target_types)
        rope_h = rope_g = None
        if cfg.position == "rope":
            rope_h, rope_g = backbone.rotary(positions, h.dtype), backbone.rotary(target_positions, h.dtype)
        for layer in backbone.layers:
            h, g = two_stream_layer(layer, h, g, content_mask, query_mask, rope_h, rope_g)
        if cfg.final_norm:
            g = backbone.norm(g)
        return ModelOutput(self.lm.head(g), g)

