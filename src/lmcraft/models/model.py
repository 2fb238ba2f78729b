"""`LanguageModel`: the backbone (embeddings -> blocks -> final norm) plus one head; the single model class.

Decoders (`arch="decoder"`, causal attention) and encoders (`arch="encoder"`, bidirectional) share it.
Contract (see ARCHITECTURE.md):

    forward(input_ids, attention_mask=None, position_ids=None, inputs_embeds=None,
            past_key_values=None, prefix=None, use_cache=False) -> ModelOutput(logits, hidden_states, past_key_values,
                                                                              router)

- `past_key_values`: a `KVCache`; with `use_cache=True` and none given, one is created for this call.
- `prefix`: per-layer (key, value) tensors (1 or B, kv_heads, P, head_dim) seen by every query (prefix tuning).
- `inputs_embeds`: used instead of the token embeddings (prompt tuning).
- `router`: a mixture-of-experts model's routing in this call (`models.moe.RouterOutput`: the load-balancing
  `aux_loss()` and the per-expert `expert_load()`, over the tokens a 2-D `attention_mask` marks real); None when dense.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmcraft.models.config import ModelConfig
from lmcraft.models.heads import LMHead, MLMHead, make_head
from lmcraft.models.layers import Block, KVCache, LayerPrefix, build_attention_mask, make_norm
from lmcraft.models.moe import Experts, RouterOutput, collect_routing
from lmcraft.models.rope import RotaryEmbedding

Prefix = list[LayerPrefix]  # one (keys, values) pair per layer
Checkpointing = Literal["none", "full", "attention", "mlp"]
CHECKPOINTING = ("none", "full", "attention", "mlp")


def model_input(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """The input a forward call was given (`input_ids`, else `inputs_embeds`): its first two dimensions are the batch
    size and the number of new tokens, and it is on the model's device."""
    return input_ids if input_ids is not None else inputs_embeds


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Positions of the new tokens: counting only real tokens when a padding mask is given (left padding)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, -q_len:]


class Backbone(nn.Module):
    """The trunk shared by every model: embeddings -> blocks -> final norm.

        h_0 = m E_tok[x] (+ E_pos[p + offset] if learned positions) (+ E_type[s] if token types), then LN (BERT)
        h_0 = W_p h_0 + b_p             (ELECTRA, when the embedding width E != hidden_size)
        h_l = Block_l(h_{l-1})          (RoPE models rotate q/k inside attention instead of E_pos)
        h   = norm(h_L)                 (pre-norm models only)

    m = `embedding_multiplier` (1; Gemma: sqrt(hidden_size)). Layers of `layer_types` "sliding_attention" get
    the sliding-window mask and, with `rope_local_theta`, a rotary table of that base (Gemma 3); the others
    the full mask and the global table.

    Activation checkpointing (`checkpointing`, set with `set_checkpointing`): "full" keeps only each block's
    input and recomputes the block in the backward pass; "attention"/"mlp" recompute only that sub-layer; the
    gradients are the same as without (non-reentrant `torch.utils.checkpoint`, RNG state replayed for dropout).
    It applies only when gradients are recorded.
    """

    checkpointing: Checkpointing = "none"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        width = cfg.embedding_size or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, width, padding_idx=None)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, width)
        else:
            self.rotary = RotaryEmbedding(cfg)
            if cfg.rope_local_theta is not None:
                self.rotary_local = RotaryEmbedding(dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta,
                                                                        rope_scaling=None))
        if cfg.type_vocab_size:
            self.embed_types = nn.Embedding(cfg.type_vocab_size, width)
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg, width)
        if width != cfg.hidden_size:
            self.embed_proj = nn.Linear(width, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        if cfg.final_norm:
            self.norm = make_norm(cfg)

    def set_checkpointing(self, mode: Checkpointing) -> None:
        """Recompute "full" blocks, only their "attention" or "mlp" sub-layers, or nothing ("none") in backward."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
        self.checkpointing = mode
        for layer in self.layers:
            layer.checkpointed = mode if mode in ("attention", "mlp") else None

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
              position_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        if self.config.position == "learned":
            h = h + self.embed_positions(position_ids + self.config.position_offset)
        if self.config.type_vocab_size:
            types = torch.zeros_like(position_ids) if token_type_ids is None else token_type_ids
            h = h + self.embed_types(types)
        if self.config.embed_norm:
            h = self.embed_norm(h)
        h = self.embed_dropout(h)
        return self.embed_proj(h) if hasattr(self, "embed_proj") else h

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
        ref = model_input(input_ids, inputs_embeds)
        b, t = ref.shape[:2]
        past_len = past_key_values.length if past_key_values is not None else 0
        explicit = attention_mask is not None and attention_mask.dim() == 4
        shared_positions = position_ids is None and (explicit or attention_mask is None)  # every row 0..T-1
        if position_ids is None:
            position_ids = default_position_ids(None if explicit else attention_mask, b, t, past_len, ref.device)
        h = self.embed(input_ids, inputs_embeds, position_ids, token_type_ids)
        if (not explicit and attention_mask is not None and not torch.compiler.is_compiling()
                and bool(attention_mask.all())):  # compiled: no data-dependent branch (a graph break); mask kept
            attention_mask = None  # nothing to mask: keep the fast SDPA paths
        cfg = self.config
        windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
        masks = {w: build_attention_mask(attention_mask, t, past_len, prefix[0][0].shape[2] if prefix else 0,
                                         cfg.is_causal, w, ref.device) for w in set(windows)}
        rope = local_rope = None
        if cfg.position == "rope":  # rows sharing positions share one (1, 1, T, D) table, broadcast
            rope_positions = position_ids[:1] if shared_positions else position_ids
            rope = local_rope = self.rotary(rope_positions, h.dtype)
            if cfg.rope_local_theta is not None:
                local_rope = self.rotary_local(rope_positions, h.dtype)
        ropes = [local_rope if w is not None else rope for w in windows]  # sliding layers: the local table
        full = self.checkpointing == "full" and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (h, masks[windows[i]], ropes[i], past_key_values, prefix[i] if prefix else None)
            h = checkpoint(layer, *args, use_reentrant=False) if full else layer(*args)
        if past_key_values is not None:
            past_key_values.advance(t)
        return self.norm(h) if self.config.final_norm else h


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden_states: torch.Tensor
    past_key_values: KVCache | None = None
    router: RouterOutput | None = None


class LanguageModel(nn.Module):
    """The backbone plus one head. `chunked_loss` ("auto", True, False; set by the trainer) is read by the causal-LM
    losses (`objectives.lm_head.next_token_loss`): whether they go through the LM head in chunks."""

    chunked_loss: bool | str = "auto"

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
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)

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
        """`logits_to_keep=n` computes logits for the last n positions only (generation's prefill).

        `use_cache=True` without a cache creates one holding this call's positions; it grows (doubling) as later
        calls append to it. Callers that know the final length (generation) pass `new_cache(batch, length)`.
        """
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(*model_input(input_ids, inputs_embeds).shape[:2])
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds, past_key_values, prefix,
                            token_type_ids)
        head_input = hidden[:, -logits_to_keep:] if logits_to_keep and self.head_kind == "lm" else hidden
        logits = self.head(head_input, attention_mask)
        padding = attention_mask[:, -hidden.shape[1]:] if attention_mask is not None and attention_mask.dim() == 2 \
            else None  # an explicit 4-D mask marks no padding: every token counts for the router statistics
        router = collect_routing(self.model.layers, padding, self.config.router_aux_loss_coef)
        cache = past_key_values if use_cache or past_key_values is not None else None
        return ModelOutput(logits, hidden, cache, router)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
