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
copy), else a frozen copy of the start model (`lmcraft.peft.training.reference_policy`). Metrics per pair: reward
accuracy [r_c > r_r], margin r_c - r_r, and the mean implicit rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmcraft.align.instruct import ChatFormatter
from lmcraft.align.reward import PairData, TokenizedPair, collate_pairs, load_pairs
from lmcraft.align.run import AlignmentMethod, Run, TrainPlan
from lmcraft.io import read_json, write_json
from lmcraft.objectives.lm_head import scored_batches, sequence_logprobs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.align.config import DPOSection
    from lmcraft.peft.training import ReferencePolicy
    from lmcraft.train import LossOutput

__all__ = ["DPO", "DPOLoss", "WithReference", "dpo_loss", "precompute_reference", "reference_logps"]

LossType = Literal["sigmoid", "ipo"]


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


def reference_logps(reference: ReferencePolicy, policy: nn.Module, batch: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer log-probs, answer token counts) per row of `batch` under the reference policy."""
    with reference.active(policy) as net:
        logits = net(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logprobs(logits, batch["labels"])


def precompute_reference(model: nn.Module, reference: ReferencePolicy, data: PairData, batch_size: int,
                         cache: Path | None = None, progress: bool = True) -> list[tuple[float, float]]:
    """(log ref(y_c|x), log ref(y_r|x)) per pair, computed once; stored in / read from the JSON file `cache`.

    The values are written with full float precision, so a resumed run reads exactly what the first run used.
    """
    import torch
    from tqdm.auto import tqdm

    if cache is not None and cache.is_file():
        stored = read_json(cache)
        if stored.get("num_pairs") == len(data):
            return [tuple(v) for v in stored["logps"]]
    device = next(model.parameters()).device
    bar = tqdm(total=-(-len(data) // batch_size), desc="reference log-probs", unit="batch", disable=not progress)

    def pair_logps(rows: slice) -> list[tuple[float, float]]:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in data.collate(data.items[rows]).items()}
        logps, _ = reference_logps(reference, model, batch)
        bar.update()
        b = logps.shape[0] // 2
        return list(zip(logps[:b].tolist(), logps[b:].tolist(), strict=True))

    values = [v for part in scored_batches(model, len(data), batch_size, pair_logps) for v in part]
    bar.close()
    if cache is not None:
        write_json(cache, {"num_pairs": len(data), "logps": [list(v) for v in values]})
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
                 reference: ReferencePolicy | None = None) -> None:
        if loss_type == "ipo" and label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference = reference

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        import torch

        from lmcraft.train import LossOutput

        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, counts = sequence_logprobs(logits, batch["labels"])
        b = logps.shape[0] // 2
        if "ref_chosen" in batch:
            ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps)
        elif self.reference is not None:
            ref, _ = reference_logps(self.reference, model, batch)
        else:
            raise ValueError("DPOLoss needs a ReferencePolicy, or batches with precomputed ref_chosen / ref_rejected")
        if self.loss_type == "ipo":
            logps, ref = logps / counts, ref / counts
        losses, r_c, r_r = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], self.beta, self.loss_type,
                                    self.label_smoothing)
        metrics = {"reward_accuracy": (r_c > r_r).float().mean(), "reward_margin": (r_c - r_r).mean(),
                   "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                   "logp_chosen": logps[:b].detach().mean(), "logp_rejected": logps[b:].detach().mean()}
        return LossOutput(losses.sum(), b, metrics, num_tokens=batch.get("num_tokens"))


class DPO(AlignmentMethod):
    """DPO in the run template: preference pairs, the reference policy (its log-probs precomputed once, or on the
    fly), `DPOLoss`, the held-out score as an evaluation; OUT/dpo_curves.png and the held-out numbers."""

    name = "dpo"

    def __init__(self, settings: DPOSection) -> None:
        self.settings = settings

    def data(self, run: Run) -> tuple[PairData, PairData | None]:
        return load_pairs(run.cfg.data, ChatFormatter(run.start.tokenizer, train_on="last"))

    def plan(self, run: Run) -> TrainPlan:
        from lmcraft.peft.training import reference_policy

        d, t, model = self.settings, run.cfg.trainer, run.training.model
        reference: ReferencePolicy | None = reference_policy(model)
        train, evaluation = run.train, run.evaluation
        if d.reference == "precompute":
            batch = t.eval_batch_size or t.micro_batch_size
            train = WithReference(train, precompute_reference(model, reference, train, batch,
                                                              run.out / "reference_train.json", t.progress))
            if evaluation is not None:
                evaluation = WithReference(evaluation, precompute_reference(
                    model, reference, evaluation, batch, run.out / "reference_eval.json", t.progress))
            reference = None  # the copy (if any) is no longer needed
        scorer = run.scorer
        eval_fn = (lambda trainer: {"score": scorer(trainer.model)}) if scorer is not None else None
        return TrainPlan(DPOLoss(d.beta, d.loss, d.label_smoothing, reference), train, evaluation, eval_fn=eval_fn)

    def summary(self, run: Run) -> dict[str, Any]:
        from lmcraft.align.plots import plot_dpo

        history = run.trainer.state.history
        if run.cfg.trainer.plot:
            plot_dpo(history, run.start_score, run.out / "dpo_curves.png")
        evals = [r for r in history if r["split"] == "eval"]
        last = evals[-1] if evals else {}
        return {"pairs": len(run.train), "start_score": run.start_score, "eval_score": last.get("eval_score"),
                "eval_reward_accuracy": last.get("eval_reward_accuracy"), "eval_loss": last.get("eval_loss")}
