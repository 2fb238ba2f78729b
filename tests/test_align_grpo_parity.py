"""Our GRPO / DAPO / Dr.GRPO / RLOO losses against TRL's own loss code (`GRPOTrainer._compute_loss`,
`RLOOTrainer._compute_loss`, called on a minimal stand-in for the trainer with stubbed model outputs), on the same
per-token log-probs, advantages and masks: equal losses and equal gradients with respect to every per-token log-prob
(the per-token contributions) to 1e-6. Advantages: TRL computes them inline in `_generate_and_score_completions`;
we reproduce that computation with TRL's own `nanstd`."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmcraft.align.grpo_loss import aggregate, group_advantages, k3_kl, sequence_loss, token_loss

pytestmark = pytest.mark.parity

B, N, G, LMAX = 4, 5, 2, 7


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = (torch.arange(N)[None] < lengths[:, None]).float()
    return {"logp": -torch.rand(B, N, generator=g) * 2, "old": -torch.rand(B, N, generator=g) * 2,
            "ref": -torch.rand(B, N, generator=g) * 2, "adv": torch.randn(B, generator=g), "mask": mask}


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_stub(loss_type: str, beta: float, eps_low: float, eps_high: float, logp: torch.Tensor):
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=args, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, max_completion_length=LMAX,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})


def _trl_batch(x: dict[str, torch.Tensor], old_key: str, old_value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
            "completion_ids": torch.zeros(B, N, dtype=torch.long), "completion_mask": x["mask"].long(),
            "advantages": x["adv"], old_key: old_value, "ref_per_token_logps": x["ref"],
            "num_items_in_batch": x["mask"].sum()}


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_token_level_losses_equal_trl(loss: str, beta: float, eps_high: float) -> None:
    from trl.trainer.grpo_trainer import GRPOTrainer

    x = _inputs(1)
    # ratios far enough from 1 that both clip sides are exercised
    assert ((x["logp"] - x["old"]).exp() > 1 + eps_high).any() and ((x["logp"] - x["old"]).exp() < 0.8).any()
    theirs_logp = x["logp"].clone().requires_grad_(True)
    stub = _trl_stub(loss, beta, 0.2, eps_high, theirs_logp)
    theirs = GRPOTrainer._compute_loss(stub, None, _trl_batch(x, "old_per_token_logps", x["old"]))
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_logp)

    ours_logp = x["logp"].clone().requires_grad_(True)
    per, _, _ = token_loss(ours_logp, x["old"], x["adv"], 0.2, eps_high)
    if beta:
        per = per + beta * k3_kl(ours_logp, x["ref"])
    total, count = aggregate(per, x["mask"], loss, LMAX)
    ours = total / count
    (ours_grad,) = torch.autograd.grad(ours, ours_logp)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)
    assert (theirs_grad * (1 - x["mask"])).abs().max() == 0  # padding has no gradient in either


def test_rloo_loss_equals_trl() -> None:
    """TRL's RLOO: one sequence-level ratio exp(sum_t (l - l_old)) per completion, mean over completions."""
    from trl.trainer.rloo_trainer import RLOOTrainer

    x = _inputs(2)
    x["old"] = x["logp"] + 0.15 * torch.randn(B, N, generator=torch.Generator().manual_seed(5))
    theirs_logp = x["logp"].clone().requires_grad_(True)
    stub = _trl_stub("rloo", 0.0, 0.2, 0.28, theirs_logp)
    old_seq = (x["old"] * x["mask"]).sum(1)
    theirs = RLOOTrainer._compute_loss(stub, None, _trl_batch(x, "old_logps", old_seq))
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_logp)

    ours_logp = x["logp"].clone().requires_grad_(True)
    per, _, _ = sequence_loss(ours_logp, x["old"], x["adv"], x["mask"], 0.2, 0.28)
    total, count = aggregate(per, x["mask"], "rloo", LMAX)
    (ours_grad,) = torch.autograd.grad(total / count, ours_logp)
    assert float((total / count).detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-6)


def test_advantages_equal_trls_computation() -> None:
    """GRPOTrainer (scale_rewards="group" / "none") and RLOOTrainer (normalize_advantages=False), as written in
    their `_generate_and_score_completions`, on rewards without NaNs."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([0.5, 1.0, 0.0, 2.0, 3.0, 3.0, -1.0, 0.25])
    grouped = rewards.view(-1, 4)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    assert torch.allclose(group_advantages(rewards, 4, "grpo"), (rewards - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, 4, "dr_grpo"), rewards - mean, atol=1e-6)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / 3).view(-1)
    assert torch.allclose(group_advantages(rewards, 4, "rloo"), rewards - baselines, atol=1e-6)
