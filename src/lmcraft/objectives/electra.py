"""ELECTRA replaced-token detection ("rtd").

A small generator G (an MLM `LanguageModel`) fills the masked positions M of the corrupted input x~; its
samples replace the originals; the discriminator D labels every real (non-padding) token as original (0) or
replaced (1):

    x^_i = s_i ~ softmax(G(x~)_i)  for i in M (sampled without gradient),   x^_i = x_i otherwise
    r_i  = [x^_i != x_i]            (a sample equal to the original counts as original)
    L    = mean_{i in M} CE(G(x~)_i, x_i)  +  lambda * mean_{i real} BCE(D(x^)_i, r_i),   lambda = 50

returned as the sum (sum_gen + lambda * mean_disc * |M|) over |M| targets. Sampling uses inverse-CDF with a
uniform number per position drawn in `transform` (so the seeded generator fixes the samples too):
s_i = min{v : sum_{u <= v} p_u > U_i}.

Embedding sharing: the token embedding table E (V, H_d) is the discriminator's. When the generator has the
same width it uses E itself (input embeddings and its tied MLM output matrix). When it is narrower (H_g < H_d),
it reads its inputs as E[x] P with a learned projection P (H_d -> H_g, no bias); its own (V, H_g) table then
serves only as its tied MLM output matrix.
The discriminator is a `LanguageModel` with ELECTRA's `rtd` head (one logit per token, w_2 act(W_1 h + b_1) + b_2);
`discriminator` is the model to keep after pre-training. A BERT-layout config becomes model_type `electra` for it,
so that it saves as Hugging Face's `ElectraForPreTraining`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.model import LanguageModel
from lmcraft.objectives.base import IGNORE_INDEX, Batch, LossOutput, TokenizerIds, token_cross_entropy
from lmcraft.objectives.mlm import MaskingConfig, masked_batch, masking_with_token_ids

__all__ = ["ElectraModel", "ElectraOutput", "ReplacedTokenDetection", "discriminator_config", "generator_config",
           "sample_inverse_cdf"]


def discriminator_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` for the discriminator: a BERT-layout encoder becomes an `electra` one (the same backbone, ELECTRA's
    classification-head switches), which saves as `ElectraForPreTraining`; other layouts are kept as they are."""
    if cfg.model_type not in ("bert", "electra"):
        return cfg
    return dataclasses.replace(cfg, model_type="electra", pooler_activation="gelu", pooler_dropout=True,
                               mlm_activation="gelu")


def generator_config(cfg: ModelConfig, width_fraction: float = 0.25) -> ModelConfig:
    """The discriminator config with `width_fraction` of its attention heads (same head_dim), hidden and
    intermediate sizes: ELECTRA's generator 1/4 (small) to 1/3 (base) the discriminator's width."""
    heads = max(1, round(cfg.num_heads * width_fraction))
    groups = cfg.num_heads // cfg.num_kv_heads
    kv_heads = math.gcd(heads, max(1, heads // groups))
    return dataclasses.replace(cfg, num_heads=heads, num_kv_heads=kv_heads, hidden_size=heads * cfg.head_dim,
                               intermediate_size=max(1, round(cfg.intermediate_size * width_fraction)))


def sample_inverse_cdf(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One sample per row of `logits` (N, V) from softmax(logits), given U ~ Uniform[0, 1) per row (N,)."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    idx = torch.searchsorted(cdf, uniform.float()[:, None].contiguous(), right=True).squeeze(1)
    return idx.clamp_max(logits.shape[-1] - 1)


@dataclass
class ElectraOutput:
    generator_logits: torch.Tensor  # (B, T, V)
    discriminator_logits: torch.Tensor  # (B, T)
    is_replaced: torch.Tensor  # (B, T) float, 1 where the discriminator input differs from the original


class ElectraModel(nn.Module):
    """Generator (MLM head) + discriminator (one-logit token head) sharing the token embeddings.

    forward(corrupted, labels, sample_uniform) runs the generator, samples replacements at the positions with
    labels != -100 (no gradient), and runs the discriminator on the result.
    """

    def __init__(self, discriminator_cfg: ModelConfig, generator_cfg: ModelConfig) -> None:
        super().__init__()
        if generator_cfg.vocab_size != discriminator_cfg.vocab_size:
            raise ValueError("generator and discriminator need the same vocabulary")
        self.discriminator = LanguageModel(discriminator_config(discriminator_cfg), "rtd")
        self.generator = LanguageModel(generator_cfg, "mlm")
        if generator_cfg.hidden_size == discriminator_cfg.hidden_size:
            self.generator.model.embed_tokens = self.discriminator.get_input_embeddings()
            self.generator.tie_weights()
            self.embed_proj = None
        else:
            self.embed_proj = nn.Linear(discriminator_cfg.hidden_size, generator_cfg.hidden_size, bias=False)
            nn.init.normal_(self.embed_proj.weight, std=discriminator_cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, sample_uniform: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> ElectraOutput:
        if self.embed_proj is None:
            gen = self.generator(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        else:
            embeds = self.embed_proj(self.discriminator.get_input_embeddings()(input_ids))
            gen = self.generator(inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids)
        selected = labels != IGNORE_INDEX
        original = torch.where(selected, labels, input_ids)
        replaced = original.clone()
        with torch.no_grad():
            replaced[selected] = sample_inverse_cdf(gen.logits[selected], sample_uniform[selected])
        disc = self.discriminator(replaced, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return ElectraOutput(gen.logits, disc.logits, (replaced != original).float())


@dataclass
class ReplacedTokenDetection:
    """ELECTRA pre-training: `build_model` makes the discriminator from `cfg` and a generator
    `generator_width_fraction` as wide; `disc_weight` is lambda."""

    masking: MaskingConfig
    disc_weight: float = 50.0
    generator_width_fraction: float = 0.25
    name: ClassVar[str] = "rtd"

    @classmethod
    def with_token_ids(cls, options: dict[str, Any], tokenizer: TokenizerIds,
                       max_length: int | None = None) -> dict[str, Any]:
        return masking_with_token_ids(options, tokenizer, cls.name)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return ElectraModel(cfg, generator_config(cfg, self.generator_width_fraction))

    def kept_model(self, model: nn.Module) -> LanguageModel:
        """The discriminator (ELECTRA keeps it and drops the generator)."""
        return model.discriminator

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """MLM corruption for the generator plus `sample_uniform` (B, T): the U of inverse-CDF sampling."""
        out = masked_batch(batch, self.masking, generator)
        device = generator.device if generator is not None else out["input_ids"].device
        uniform = torch.rand(out["input_ids"].shape, generator=generator, device=device)
        return {**out, "sample_uniform": uniform.to(out["input_ids"].device)}

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        attention = batch.get("attention_mask")
        out = model(batch["input_ids"], batch["labels"], batch["sample_uniform"], attention,
                    batch.get("token_type_ids"))
        gen_sum, count = token_cross_entropy(out.generator_logits, batch["labels"])
        real = attention.bool() if attention is not None else torch.ones_like(out.is_replaced, dtype=torch.bool)
        disc_logits, is_replaced = out.discriminator_logits[real].float(), out.is_replaced[real]
        disc_mean = F.binary_cross_entropy_with_logits(disc_logits, is_replaced)
        metrics = {"gen_loss": gen_sum.detach() / max(count, 1), "disc_loss": disc_mean.detach(),
                   "disc_accuracy": ((disc_logits > 0).float() == is_replaced).float().mean(),
                   "replaced_fraction": is_replaced.mean()}
        return LossOutput(gen_sum + self.disc_weight * disc_mean * count, count, metrics, int(real.sum()))
