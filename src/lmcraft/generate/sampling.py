"""From next-token logits to a next token: the logits processors and the final choice.

For one row with logits z over the vocabulary (applied in this order, each one optional):

- repetition penalty r (CTRL / Hugging Face semantics), for every token t already seen in the prompt or
  the output:  z_t <- z_t / r if z_t > 0 else z_t * r   (r > 1 discourages repeats);
- temperature T:  z <- z / T;
- top-k:  keep the k largest z (ties with the k-th are kept), the rest become -inf;
- top-p (nucleus):  sort by probability p_(1) >= p_(2) >= ...; drop token (i) when the mass before it,
  p_(1) + ... + p_(i-1), already reaches p; the most likely token always stays;
- min-p:  drop tokens with p_t < min_p * max_t p_t;
- choice:  greedy = argmax z;  sampling = a draw from softmax(z) with the run's `torch.Generator`.

Greedy decoding applies only the repetition penalty: temperature, top-k, top-p and min-p never change
the argmax.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens marked in `seen` (B, V) by `penalty`."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (and any tied with the k-th); -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches `p`; -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the row's highest probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


class TokenChooser:
    """Turns logits (B, V) into next tokens (B,), keeping the per-row set of seen tokens for the penalty."""

    def __init__(
        self,
        *,
        greedy: bool,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.greedy = greedy
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.generator = generator
        self.seen: torch.Tensor | None = None

    @property
    def tracks_history(self) -> bool:
        return self.repetition_penalty != 1.0

    def observe_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> None:
        """Mark every real (non-padding) prompt token as seen."""
        if not self.tracks_history:
            return
        b = input_ids.shape[0]
        ids = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, vocab_size)
        seen = torch.zeros(b, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
        seen.scatter_(1, ids, True)  # padding lands in the extra last column, dropped below
        self.seen = seen[:, :vocab_size]

    def observe(self, tokens: torch.Tensor) -> None:
        """Mark the tokens just chosen (B,) as seen."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.repetition_penalty)
        if self.greedy:
            return logits.argmax(dim=-1)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logits = top_k_filter(logits, self.top_k)
        logits = top_p_filter(logits, self.top_p)
        logits = min_p_filter(logits, self.min_p)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
