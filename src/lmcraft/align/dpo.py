"""Direct preference optimisation (Rafailov et al. 2023) and its IPO / label-smoothed variants.

With log-probabilities of the answers under the policy (pi) and the frozen reference (ref), summed over the answer
tokens, and the implicit rewards r_c = beta (log pi(y_c|x) - log ref(y_c|x)) and
r_r = beta (log pi(y_r|x) - log ref(y_r|x)):

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))
    sigmoid (DPO):           L = -log sigma(beta h)
    sigmoid + smoothing e:   L = -(1 - e) log sigma(beta h) - e log sigma(-beta h)    (conservative DPO: labels
                                                                                        flipped with probability e)
    ipo (Azar et al. 2023):  L = (h' - 1 / (2 beta))^2, h' as h with log-probs averaged over the answer tokens

The reference log-probs are either computed once before training (`reference: precompute`; cached in the run
folder) or on the fly in every step; the reference is the model with its adapters disabled for PEFT runs (no second
copy), else a frozen copy of the start model. Metrics per pair: reward accuracy [r_c > r_r], margin r_c - r_r, and
the mean implicit rewards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmcraft.align.reward import PairData, TokenizedPair, collate_pairs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.train import LossOutput

__all__ = ["DPOLoss", "Reference", "WithReference", "dpo_loss", "precompute_reference", "sequence_logps"]

LossType = Literal["sigmoid", "ipo"]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: sum_t log softmax(logits[t-1] / T)[labels[t]] over labelled t (labels != -100), and the count."""
    import torch

    logits, labels = logits[:, :-1].float() / temperature, labels[:, 1:]
    keep = labels != -100
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1), keep.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from answer log-probs (see the module docstring; for
    `ipo` pass log-probs averaged over the answer tokens)."""
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose sigmoid or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class Reference:
    """Answer log-probs under the reference policy, without gradients and without dropout.

    `copy`: a frozen module (full fine-tuning). Otherwise the policy itself is called with its adapters disabled.
    """

    def __init__(self, copy: nn.Module | None = None) -> None:
        if copy is not None:
            copy.eval().requires_grad_(False)
        self.copy = copy

    @classmethod
    def frozen_copy(cls, model: nn.Module) -> Reference:
        """A reference that is a frozen deep copy of `model` as it is now."""
        import copy

        return cls(copy.deepcopy(model))

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from lmcraft.align.modeling import unwrap

        net = self.copy if self.copy is not None else unwrap(model)
        context = nullcontext() if self.copy is not None else net.disable_adapters()
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), context:
                logits = net(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                return sequence_logps(logits, batch["labels"])
        finally:
            net.train(was_training)


def precompute_reference(model: nn.Module, reference: Reference, data: PairData, batch_size: int,
                         cache: Path | None = None, progress: bool = True) -> list[tuple[float, float]]:
    """(log ref(y_c|x), log ref(y_r|x)) per pair, computed once; stored in / read from the JSON file `cache`.

    The values are written with full float precision, so a resumed run reads exactly what the first run used.
    """
    import torch
    from tqdm.auto import tqdm

    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("num_pairs") == len(data):
            return [tuple(v) for v in stored["logps"]]
    device = next(model.parameters()).device
    values: list[tuple[float, float]] = []
    for lo in tqdm(range(0, len(data), batch_size), desc="reference log-probs", unit="batch", disable=not progress):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in data.collate(data.items[lo: lo + batch_size]).items()}
        logps, _ = reference(model, batch)
        b = logps.shape[0] // 2
        values.extend(zip(logps[:b].tolist(), logps[b:].tolist(), strict=True))
    if cache is not None:
        from lmcraft.train.checkpoint import atomic_write_json

        atomic_write_json(cache, {"num_pairs": len(data), "logps": [list(v) for v in values]})
    return values


class WithReference:
    """Pairs with their precomputed reference log-probs: items are (pair, (ref_chosen, ref_rejected)), and batches
    carry `ref_chosen`, `ref_rejected` (B,) besides the pair tensors."""

    def __init__(self, data: PairData, logps: Sequence[tuple[float, float]]) -> None:
        if len(logps) != len(data):
            raise ValueError(f"{len(logps)} reference log-prob pairs for {len(data)} preference pairs")
        self.data, self.logps = data, list(logps)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[TokenizedPair, tuple[float, float]]:
        return self.data[i], self.logps[i]

    def collate(self, batch: list[tuple[TokenizedPair, tuple[float, float]]]) -> dict[str, torch.Tensor]:
        import torch

        out = collate_pairs([pair for pair, _ in batch], self.data.pad_id)
        refs = torch.tensor([ref for _, ref in batch], dtype=torch.float64)
        out["ref_chosen"], out["ref_rejected"] = refs[:, 0], refs[:, 1]
        return out


class DPOLoss:
    """The trainer's loss_fn: summed DPO loss over the pairs of a micro-batch (see the module docstring)."""

    def __init__(self, beta: float = 0.1, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
                 reference: Reference | None = None) -> None:
        if loss_type == "ipo" and label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference = reference

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        import torch

        from lmcraft.train import LossOutput

        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, counts = sequence_logps(logits, batch["labels"])
        b = logps.shape[0] // 2
        if "ref_chosen" in batch:
            ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps)
        elif self.reference is not None:
            ref, _ = self.reference(model, batch)
        else:
            raise ValueError("DPOLoss needs a Reference, or batches with precomputed ref_chosen / ref_rejected")
        if self.loss_type == "ipo":
            logps, ref = logps / counts, ref / counts
        losses, r_c, r_r = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.beta, self.loss_type,
                                    self.label_smoothing)
        metrics = {"reward_accuracy": (r_c > r_r).float().mean(), "reward_margin": (r_c - r_r).mean(),
                   "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                   "logp_chosen": logps[:b].detach().mean(), "logp_rejected": logps[b:].detach().mean()}
        return LossOutput(losses.sum(), b, metrics, num_tokens=batch.get("num_tokens"))

