"""P-tuning v1 (Liu et al. 2021, "GPT understands, too") and P-tuning v2 (Liu et al. 2022).

v1: P virtual-token embeddings produced by a prompt encoder from trainable inputs E (P x H), then used like prompt
tuning (prepended to the input embeddings):

    MLP:   h = W_3 relu(W_2 relu(W_1 E + b_1) + b_2) + b_3                       (widths H -> m -> m -> H)
    LSTM:  h = W_2 relu(W_1 BiLSTM(E) + b_1) + b_2                              (widths H -> 2m -> 2m -> H)

(the same encoders as Hugging Face PEFT's `PromptEncoder`). `merge` folds the encoder: h is computed once and kept
as a plain table; PEFT also saves that folded table as `prompt_embeddings`.

v2: "deep prompt tuning": trainable prefixes at every layer through the model's `prefix` argument (as prefix
tuning, without the MLP reparameterisation), with a trainable copy of the task head (`modules_to_save: [head]`).
PEFT has no separate v2 type, so v2 adapters use lmcraft's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmcraft.peft.model import PeftModel
from lmcraft.peft.prefix import make_prefix_encoder
from lmcraft.peft.prompt import SoftPrompt
from lmcraft.peft.registry import PromptLearningConfig, check_choice, register


class LSTMPromptHead(nn.Module):
    """BiLSTM over the virtual tokens, then a two-layer MLP back to the hidden size."""

    def __init__(self, hidden: int, encoder_hidden: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(hidden, encoder_hidden, num_layers=num_layers, dropout=dropout,
                                 bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * encoder_hidden, 2 * encoder_hidden), nn.ReLU(),
                                      nn.Linear(2 * encoder_hidden, hidden))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(e.unsqueeze(0))[0]).squeeze(0)


def mlp_prompt_head(hidden: int, encoder_hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, encoder_hidden),
                         nn.ReLU(), nn.Linear(encoder_hidden, hidden))


@register
@dataclass(kw_only=True)
class PTuningConfig(PromptLearningConfig):
    """P-tuning v1 (prompt encoder: MLP or LSTM). `encoder_num_layers` is the LSTM depth."""

    method = "ptuning"
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int = 256
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("encoder_reparameterization_type", self.encoder_reparameterization_type, ("MLP", "LSTM"))

    def inject(self, model: PeftModel, adapter: str) -> None:
        ref = model.base_model.get_input_embeddings().weight
        hidden = ref.shape[1]
        if self.encoder_reparameterization_type == "MLP":
            head = mlp_prompt_head(hidden, self.encoder_hidden_size)
        else:
            head = LSTMPromptHead(hidden, self.encoder_hidden_size, self.encoder_num_layers, self.encoder_dropout)
        init = torch.randn(self.num_virtual_tokens, hidden)
        model.providers[adapter] = SoftPrompt(init, head).to(device=ref.device, dtype=ref.dtype)


@register
@dataclass(kw_only=True)
class PTuningV2Config(PromptLearningConfig):
    """P-tuning v2: deep prompts at every layer (no reparameterisation) + a trainable task head."""

    method = "ptuning_v2"
    modules_to_save: list[str] = field(default_factory=lambda: ["head"])

    def inject(self, model: PeftModel, adapter: str) -> None:
        model.providers[adapter] = make_prefix_encoder(model, self.num_virtual_tokens, projection_hidden=None)
