"""The transformer trunk shared by every model: embeddings -> blocks -> final norm.

    h_0 = E_tok[x] (+ E_pos[p] if learned positions) (+ E_type[s] if token types), then LN (BERT)
    h_l = Block_l(h_{l-1})          (RoPE models rotate q/k inside attention instead of E_pos)
    h   = norm(h_L)                 (pre-norm models only)
"""

from __future__ import annotations

import torch
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.layers import Block, KVCache, Rotation, build_attention_mask, make_norm
from lmcraft.models.rope import RotaryEmbedding

Prefix = list[tuple[torch.Tensor, torch.Tensor]]


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Positions of the new tokens: counting only real tokens when a padding mask is given (left padding)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, -q_len:]


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=None)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        else:
            self.rotary = RotaryEmbedding(cfg)
        if cfg.type_vocab_size:
            self.embed_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        if cfg.final_norm:
            self.norm = make_norm(cfg)

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
              position_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.position == "learned":
            h = h + self.embed_positions(position_ids)
        if self.config.type_vocab_size:
            types = torch.zeros_like(position_ids) if token_type_ids is None else token_type_ids
            h = h + self.embed_types(types)
        if self.config.embed_norm:
            h = self.embed_norm(h)
        return self.embed_dropout(h)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        prefix: Prefix | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, H). `attention_mask` covers past + new tokens (1 = real, 0 = padding).

        A 4-D bool `attention_mask` (B, 1, T, S) is an explicit mask used as given (see `build_attention_mask`);
        positions then default to 0..T-1 unless `position_ids` is passed.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        b, t = ref.shape[:2]
        past_len = past_key_values.length if past_key_values is not None else 0
        explicit = attention_mask is not None and attention_mask.dim() == 4
        shared_positions = position_ids is None and (explicit or attention_mask is None)  # every row 0..T-1
        if position_ids is None:
            position_ids = default_position_ids(None if explicit else attention_mask, b, t, past_len, ref.device)
        h = self.embed(input_ids, inputs_embeds, position_ids, token_type_ids)
        if not explicit and attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: keep the fast SDPA paths
        mask = build_attention_mask(
            attention_mask, t, past_len, prefix[0][0].shape[2] if prefix else 0,
            self.config.is_causal, self.config.sliding_window, ref.device,
        )
        rope = None
        if self.config.position == "rope":  # rows sharing positions share one (1, 1, T, D) table, broadcast
            rope = Rotation(*self.rotary(position_ids[:1] if shared_positions else position_ids, h.dtype))
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, rope, past_key_values, prefix[i] if prefix else None)
        if past_key_values is not None:
            past_key_values.advance(t)
        return self.norm(h) if self.config.final_norm else h
