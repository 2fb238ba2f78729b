"""Prefix tuning (Li & Liang 2021): P trainable key/value vectors in front of every layer's attention.

Every query of layer l also attends to P virtual positions with keys K_l and values V_l (kv_heads x P x head_dim),
passed to the model through its `prefix` argument; the real tokens take positions P, P+1, ... (as in Hugging Face
PEFT, where the prefix sits in the KV cache).

The prefix table T (P x L*2*kv_heads*head_dim, laid out as PEFT's `prompt_embeddings`: for each virtual token,
[K_0 | V_0 | K_1 | V_1 | ...]) is either a plain parameter or, for stable training, reparameterised by an MLP:

    T = W_2 tanh(W_1 E + b_1) + b_2,        E: P x (kv_heads*head_dim)  (prefix_projection=True)

`merge` folds the MLP away: T is computed once and kept as a plain tensor (identical outputs, no MLP at inference).
Gated (UniPELT): K_l and V_l are scaled by sigmoid(g_l), one learned gate per layer (g starts at 0 -> 0.5). The
paper computes that gate from the layer input; the prefix here is produced before the forward pass through the
model's `prefix` contract, so the gate is a per-layer learned constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmcraft.models.model import Prefix
from lmcraft.peft.layers import PeftError, PrefixProvider
from lmcraft.peft.model import PeftModel
from lmcraft.peft.registry import PromptLearningConfig, register


class PrefixEncoder(PrefixProvider):
    """Produces the per-layer (key, value) prefixes from a table, optionally through an MLP and per-layer gates."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_heads: int, head_dim: int,
                 projection_hidden: int | None = None, gated: bool = False) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        kv_dim, width = kv_heads * head_dim, num_layers * 2 * kv_heads * head_dim
        if projection_hidden:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, projection_hidden), nn.Tanh(),
                                           nn.Linear(projection_hidden, width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
            self.transform = None
        self.gate = nn.Parameter(torch.zeros(num_layers)) if gated else None

    def table(self) -> torch.Tensor:
        t = self.embedding.weight
        if self.transform is not None:
            t = self.transform(t)
        if self.gate is not None:
            g = torch.sigmoid(self.gate)[None, :, None]
            t = (t.view(self.num_virtual_tokens, self.num_layers, -1) * g).flatten(1)
        return t

    def prefix(self) -> Prefix:
        t = self.table().view(self.num_virtual_tokens, self.num_layers * 2, self.kv_heads, self.head_dim)
        t = t.permute(1, 2, 0, 3).unsqueeze(1)  # (2L, 1, kv_heads, P, head_dim)
        return [(t[2 * i], t[2 * i + 1]) for i in range(self.num_layers)]

    def load_table(self, table: torch.Tensor) -> None:
        width = self.num_layers * 2 * self.kv_heads * self.head_dim
        if tuple(table.shape) != (self.num_virtual_tokens, width):
            raise PeftError(f"prefix table has shape {tuple(table.shape)}; this model needs "
                            f"({self.num_virtual_tokens}, {width}) = (P, layers * 2 * kv_heads * head_dim)")
        ref = self.embedding.weight
        self.embedding = nn.Embedding.from_pretrained(table.detach().to(ref.device, ref.dtype).clone(), freeze=False)
        self.transform = None
        self.gate = None


def make_prefix_encoder(model: PeftModel, num_virtual_tokens: int, projection_hidden: int | None,
                        gated: bool = False) -> PrefixEncoder:
    c = model.base_model.config
    ref = next(model.base_model.parameters())
    enc = PrefixEncoder(num_virtual_tokens, c.num_layers, c.num_kv_heads, c.head_dim, projection_hidden, gated)
    return enc.to(device=ref.device, dtype=ref.dtype)


def attach_prefix(model: PeftModel, adapter: str, cfg: PrefixConfig, gated: bool = False) -> None:
    hidden = cfg.encoder_hidden_size if cfg.prefix_projection else None
    model.providers[adapter] = make_prefix_encoder(model, cfg.num_virtual_tokens, hidden, gated)


@register
@dataclass(kw_only=True)
class PrefixConfig(PromptLearningConfig):
    """Prefix tuning; `prefix_projection` trains through the MLP reparameterisation (fold it with `merge`)."""

    method = "prefix"
    prefix_projection: bool = True
    encoder_hidden_size: int = 512

    def inject(self, model: PeftModel, adapter: str) -> None:
        attach_prefix(model, adapter, self)
