"""Prompt tuning (Lester et al. 2021): P trainable "virtual token" embeddings in front of the input embeddings.

    inputs_embeds = [E_prompt ; E_tok[x]]       (B, P + T, H);  attention mask gets P leading ones

The frozen model sees the virtual tokens at positions 0..P-1. `PeftModel` drops their positions from the output,
so logits line up with `input_ids` and the labels need no change (PEFT keeps the P positions and pads the labels
with -100 there; see `PeftModel` for the one-token difference this makes).

Initialisation of E_prompt (P x H):
- `random`: N(0, sigma^2) with sigma the standard deviation of the model's token embeddings (same scale as words);
- `vocab`: embeddings of P distinct token ids drawn uniformly from the first min(V, 5000) ids (Lester et al. use
  the 5000 most frequent tokens; BPE ids are roughly frequency-ordered);
- `text`: embeddings of a text's tokens (`init_text` + `tokenizer`, or `init_token_ids`), repeated or cut to P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmcraft.peft.layers import PeftError, PromptProvider
from lmcraft.peft.model import PeftModel
from lmcraft.peft.registry import PromptLearningConfig, register


class SoftPrompt(PromptProvider):
    """P virtual-token embeddings, optionally produced by a reparameterisation module (P-tuning's encoder)."""

    def __init__(self, init: torch.Tensor, reparam: nn.Module | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = init.shape[0]
        self.embedding = nn.Embedding.from_pretrained(init.clone(), freeze=False)
        self.reparam = reparam

    def embeddings(self) -> torch.Tensor:
        e = self.embedding.weight
        return e if self.reparam is None else self.reparam(e)

    def load_table(self, table: torch.Tensor) -> None:
        ref = self.embedding.weight
        if tuple(table.shape) != tuple(ref.shape):
            raise PeftError(f"prompt table has shape {tuple(table.shape)}; this model needs {tuple(ref.shape)} "
                            f"= (num_virtual_tokens, hidden_size)")
        self.embedding = nn.Embedding.from_pretrained(table.detach().to(ref.device, ref.dtype).clone(), freeze=False)
        self.reparam = None


def text_token_ids(cfg: PromptConfig) -> list[int]:
    """The token ids of the init text, repeated or cut to `num_virtual_tokens`."""
    if cfg.init_token_ids:
        ids = list(cfg.init_token_ids)
    else:
        from lmcraft.tokenizer.load import load_tokenizer

        ids = load_tokenizer(cfg.tokenizer).encode(cfg.init_text, add_special_tokens=False)
    if not ids:
        raise PeftError("prompt tuning: the init text has no tokens")
    ids = ids * math.ceil(cfg.num_virtual_tokens / len(ids))
    return ids[: cfg.num_virtual_tokens]


def initial_prompt(model: PeftModel, cfg: PromptConfig) -> torch.Tensor:
    """E_prompt at init (P x H), detached; see the module docstring."""
    table = model.base_model.get_input_embeddings().weight.detach()
    p, vocab = cfg.num_virtual_tokens, table.shape[0]
    if cfg.init == "random":
        return torch.randn(p, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
    if cfg.init == "vocab":
        pool = min(vocab, 5000)
        ids = torch.randperm(pool)[:p] if p <= pool else torch.randint(0, pool, (p,))
    else:
        ids = torch.tensor(text_token_ids(cfg))
        if int(ids.max()) >= vocab:
            raise PeftError(f"prompt tuning: init token id {int(ids.max())} is outside the vocabulary ({vocab})")
    return table[ids.to(table.device)].clone()


@register
@dataclass(kw_only=True)
class PromptConfig(PromptLearningConfig):
    """Prompt tuning. `tokenizer`: a tokenizer.json file or model folder, used with `init: text`."""

    method = "prompt"
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"init must be random, vocab or text, got {self.init!r}")
        if self.init == "text" and not self.init_token_ids and not (self.init_text and self.tokenizer):
            raise ValueError("init: text needs init_text and tokenizer (a tokenizer.json or model folder), "
                             "or init_token_ids")

    def inject(self, model: PeftModel, adapter: str) -> None:
        model.providers[adapter] = SoftPrompt(initial_prompt(model, self))
