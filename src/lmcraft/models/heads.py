"""Output heads on top of the backbone's hidden states h (B, T, H).

- `lm`:        logits = h W_E^T (tied) or h W^T                       (B, T, V);
               then / logits_scaling (Granite) and c tanh(logits / c) with c = final_logit_softcap (Gemma 2)
- `mlm`:       logits = LN(act(h W_t + b_t)) W_E^T + b                 (B, T, V), BERT's prediction head; W_t maps
               to the embedding width E (ELECTRA's generator: E < H); act = `mlm_activation` or `activation`
- `cls`:       encoder: pooled = act(W_p dropout?(h[:, 0]) + b_p), act = tanh (BERT, RoBERTa), gelu (ELECTRA),
               relu (DistilBERT), the inner dropout for RoBERTa/ELECTRA; decoder: h at the last real token;
               logits = W_c dropout(pooled) (+ b_c)                    (B, num_labels)
               ModernBERT: pooled = LN(act(W_p p + b_p)), p = h[:, 0] or the mean over real tokens (`cls_pooling`)
- `token_cls`: logits = W dropout(h) + b                               (B, T, num_labels); ModernBERT first
               h = LN(act(W_d h + b_d))
- `qa`:        [start, end] logits = h W + b, W: (H, 2)                 (B, T, 2)  (extractive QA span)
- `value`:     v = h w + b, one scalar per token                        (B, T)  (PPO critic)
- `reward`:    r = h_last w, one scalar per sequence at the last real token   (B,)
- `rtd`:       d = w_2 act(W_1 h + b_1) + b_2, one logit per token      (B, T)  (ELECTRA discriminator)
"""

from __future__ import annotations

import torch
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.layers import ACTIVATIONS, make_norm

HEADS = ("lm", "mlm", "cls", "token_cls", "qa", "value", "reward", "rtd")


def last_token_index(
    attention_mask: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Index of the last real token per row; works for left and right padding."""
    if attention_mask is None:
        return torch.full((batch,), seq_len - 1, device=device, dtype=torch.long)
    positions = torch.arange(seq_len, device=device).expand(batch, -1)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values.clamp_min(0)


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of h over the real tokens of each row (B, H)."""
    if attention_mask is None:
        return h.mean(dim=1)
    mask = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * mask).sum(dim=1) / mask.sum(dim=1)


def gather_last(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    idx = last_token_index(attention_mask, h.shape[0], h.shape[1], h.device)
    return h[torch.arange(h.shape[0], device=h.device), idx]


class LMHead(nn.Linear):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.logits_scaling = cfg.logits_scaling
        self.softcap = cfg.final_logit_softcap

    @property
    def plain(self) -> bool:
        """logits = h W^T exactly (no scaling, no cap): what the chunked LM-head loss computes from the weight."""
        return self.logits_scaling == 1.0 and self.softcap is None

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward(h)
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.embedding_size or cfg.hidden_size
        self.transform = nn.Linear(cfg.hidden_size, width, bias=cfg.head_bias)
        self.act = ACTIVATIONS[cfg.mlm_activation or cfg.activation]
        self.norm = make_norm(cfg, width)
        self.decoder = nn.Linear(width, cfg.vocab_size, bias=False)
        if cfg.mlm_decoder_bias:
            self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.decoder(self.norm(self.act(self.transform(h))))
        return logits + self.bias if hasattr(self, "bias") else logits


class SequenceClassificationHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pool_first = cfg.arch == "encoder"
        if self.pool_first:
            self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.head_bias)
            self.pool_act = ACTIVATIONS[cfg.pooler_activation]
            self.pool_dropout = cfg.pooler_dropout
            self.pool_mean = cfg.cls_pooling == "mean"
            if cfg.head_norm:
                self.pool_norm = make_norm(cfg)
        dropout = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=self.pool_first)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pool_first:
            first = mean_pool(h, attention_mask) if self.pool_mean else h[:, 0]
            first = self.dropout(first) if self.pool_dropout else first
            pooled = self.pool_act(self.pooler(first))
            if hasattr(self, "pool_norm"):
                pooled = self.pool_norm(pooled)
        else:
            pooled = gather_last(h, attention_mask)
        return self.classifier(self.dropout(pooled))


class TokenClassificationHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dropout = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.dropout
        self.dropout = nn.Dropout(dropout)
        if cfg.head_norm:  # ModernBERT: norm(act(W h + b)) first
            self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.head_bias)
            self.act = ACTIVATIONS[cfg.pooler_activation]
            self.norm = make_norm(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "dense"):
            h = self.norm(self.act(self.dense(h)))
        return self.classifier(self.dropout(h))


class QuestionAnsweringHead(nn.Module):
    """Start and end logits of an answer span at every token (BERT's `qa_outputs`, no dropout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.qa_outputs(h)


class ValueHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.score = nn.Linear(cfg.hidden_size, 1)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(h).squeeze(-1)


class RewardHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(gather_last(h, attention_mask)).squeeze(-1)


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head: one replaced-or-original logit per token, d = w_2 act(W_1 h + b_1) + b_2."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.activation]
        self.dense_prediction = nn.Linear(cfg.hidden_size, 1)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dense_prediction(self.act(self.dense(h))).squeeze(-1)


def make_head(kind: str, cfg: ModelConfig) -> nn.Module:
    table = {"lm": LMHead, "mlm": MLMHead, "cls": SequenceClassificationHead, "token_cls": TokenClassificationHead,
             "qa": QuestionAnsweringHead, "value": ValueHead, "reward": RewardHead, "rtd": ReplacedTokenHead}
    if kind not in table:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return table[kind](cfg)
