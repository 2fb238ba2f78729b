"""`LanguageModel`: the backbone plus one head; the single model class of lmcraft.

Decoders (`arch="decoder"`, causal attention) and encoders (`arch="encoder"`, bidirectional) share it.
Contract (see ARCHITECTURE.md):

    forward(input_ids, attention_mask=None, position_ids=None, inputs_embeds=None,
            past_key_values=None, prefix=None, use_cache=False) -> ModelOutput(logits, hidden_states, past_key_values)

- `past_key_values`: a `KVCache`; with `use_cache=True` and none given, one is created for this call.
- `prefix`: per-layer (key, value) tensors (1 or B, kv_heads, P, head_dim) seen by every query (prefix tuning).
- `inputs_embeds`: used instead of the token embeddings (prompt tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmcraft.models.backbone import Backbone, Prefix
from lmcraft.models.config import ModelConfig
from lmcraft.models.heads import LMHead, MLMHead, make_head
from lmcraft.models.layers import KVCache


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor
    past_key_values: KVCache | None = None


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, head: str | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.head_kind = head or ("lm" if cfg.arch == "decoder" else "mlm")
        self.model = Backbone(cfg)
        self.head = make_head(self.head_kind, cfg)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def tie_weights(self) -> None:
        """Share the token embedding with the output projection (LM head, MLM decoder) when configured."""
        if isinstance(self.head, LMHead) and self.config.tie_word_embeddings:
            self.head.weight = self.model.embed_tokens.weight
        elif isinstance(self.head, MLMHead) and self.config.tie_word_embeddings:
            self.head.decoder.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        param = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, capacity, dtype or param.dtype, param.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        prefix: Prefix | None = None,
        use_cache: bool = False,
        token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """`logits_to_keep=n` computes logits for the last n positions only (generation's prefill)."""
        if use_cache and past_key_values is None:
            ref = input_ids if input_ids is not None else inputs_embeds
            past_key_values = self.new_cache(ref.shape[0], ref.shape[1] + 256)
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds, past_key_values, prefix,
                            token_type_ids)
        head_input = hidden[:, -logits_to_keep:] if logits_to_keep and self.head_kind == "lm" else hidden
        logits = self.head(head_input, attention_mask)
        return ModelOutput(logits, hidden, past_key_values if use_cache or past_key_values is not None else None)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
