"""Bradley-Terry, DPO/IPO and PPO math against hand-computed values; KL is 0 when policy == reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmcraft import peft
from lmcraft.align.config import PPOSection
from lmcraft.align.dpo import DPOLoss, dpo_loss
from lmcraft.align.ppo import (
    AdaptiveKLController,
    PolicyWithValue,
    PPOLoss,
    RolloutEngine,
    RolloutLoader,
    gae,
    minibatch_plan,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from lmcraft.align.reward import bradley_terry_loss
from lmcraft.objectives.lm_head import sequence_logprobs as sequence_logps
from lmcraft.peft.training import ReferencePolicy, reference_policy


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_by_hand() -> None:
    rc, rr = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.5])
    torch.testing.assert_close(bradley_terry_loss(rc, rr), torch.tensor([softplus(-1.0), softplus(1.5)]))
    torch.testing.assert_close(bradley_terry_loss(rc, rr, torch.tensor([0.5, 0.0])),
                               torch.tensor([softplus(-0.5), softplus(1.5)]))


def test_dpo_variants_by_hand() -> None:
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.0))  # h = (1) - (-1) = 2
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([softplus(-1.0)]))
    assert r_c.item() == 0.5 and r_r.item() == -0.5
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(smooth, torch.tensor([0.9 * softplus(-1.0) + 0.1 * softplus(1.0)]))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(ipo, torch.tensor([1.0]))  # (2 - 1 / (2 * 0.5))^2


def test_sequence_logps_and_dpo_loss_on_a_model(tiny_model) -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[-100, 1, 2]])  # logits at t-1 predict label t
    total, count = sequence_logps(logits, labels)
    torch.testing.assert_close(total, torch.tensor([math.log(0.25) + math.log(0.1)]))
    assert count.tolist() == [2]

    model = tiny_model(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    ids = torch.randint(0, 16, (4, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "ref_chosen": torch.tensor([-9.0, -8.0]), "ref_rejected": torch.tensor([-7.0, -8.5])}
    logps, counts = sequence_logps(model(ids).logits, labels)
    for loss_type, div in (("sigmoid", 1), ("ipo", counts)):
        out = DPOLoss(beta=0.2, loss_type=loss_type)(model, batch)
        ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]) / div
        pol = logps / div
        expected, _, _ = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], 0.2, loss_type)
        torch.testing.assert_close(out.loss_sum, expected.sum())
        assert out.num_targets == 2
    # a reference equal to the policy gives h = 0: loss log 2 per pair, zero rewards
    same = DPOLoss(beta=0.2, reference=ReferencePolicy(copy.deepcopy(model)))(model, {k: batch[k] for k in
                                                                            ("input_ids", "attention_mask", "labels")})
    torch.testing.assert_close(same.loss_sum, torch.tensor(2 * math.log(2.0)))
    assert same.metrics["reward_margin"].item() == 0.0


def test_gae_and_returns_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])  # 9.0 is past the second row's end
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: A2 = 1 - .7 = .3; A1 = (.9*.7 - .6) + .72*.3 = .246; A0 = (.9*.6 - .5) + .72*.246 = .21712
    # row 1: A1 = 2 - 1 = 1; A0 = (.9*1 - 1) + .72*1 = .62
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]]))


def test_kl_penalised_rewards_and_whitening() -> None:
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5, 0.0]]), torch.tensor([[-1.5, -1.5, -0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(logp, ref, torch.tensor([3.0]), mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.05, 3.0, 0.0]]))  # score on the last real token
    torch.testing.assert_close(whiten(torch.tensor([[1.0, 2.0, 3.0, 7.0]]), mask),
                               torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_clipped_objectives_by_hand() -> None:
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    loss, clipped = policy_loss(new, old, torch.tensor([1.0, 1.0, -2.0]), clip=0.2)
    # max(-A r, -A clip(r)): t0 max(-1.5, -1.2) = -1.2 (clipped); t1 max(-.5, -.8) = -.5; t2 max(2.2, 2.2) = 2.2
    torch.testing.assert_close(loss, torch.tensor([-1.2, -0.5, 2.2]))
    assert clipped.tolist() == [1.0, 0.0, 0.0]
    vloss, vclipped = value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.2]), 0.2)
    # t0: clipped V = .7: .5 max(1, 1.69) = .845; t1: clipped V = .3: .5 max(.04, .01) = .02
    torch.testing.assert_close(vloss, torch.tensor([0.845, 0.02]))
    assert vclipped.tolist() == [1.0, 0.0]


def test_adaptive_kl_controller() -> None:
    kl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    kl.update(12.0, 10)  # error clipped to +0.2
    assert kl.beta == pytest.approx(0.1 * 1.02)
    kl.update(3.0, 10)  # error -0.5 clipped to -0.2
    assert kl.beta == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = AdaptiveKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.beta == 0.1


class _Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


POLICY = dict(vocab_size=24, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, eos_token_id=1)


def _engine(policy, reference, max_new_tokens: int) -> RolloutEngine:
    score = lambda prompts, answers: torch.tensor([float(len(a)) for a in answers])  # noqa: E731
    settings = PPOSection(max_new_tokens=max_new_tokens, forward_batch_size=3)
    return RolloutEngine(PolicyWithValue(policy), reference, score, _Tok(), settings, AdaptiveKLController(0.2), [1],
                         0)


PROMPTS = [{"messages": [{"role": "user", "content": str(i)}], "ids": list(range(2, 3 + i % 4))} for i in range(8)]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_kl_is_zero_when_policy_equals_reference(mode: str, tiny_model) -> None:
    policy = tiny_model(**POLICY)
    if mode == "lora":
        policy = peft.apply(policy, {"method": "lora", "r": 2})  # adapters disabled = reference
    reference = reference_policy(policy)
    engine = _engine(policy, reference, 6)
    rollout = engine.make(PROMPTS, seed=3)
    assert rollout.stats["kl"] == 0.0 and rollout.stats["non_score_reward"] == 0.0
    # the first PPO step's ratio is 1: no clipping, no approximate KL
    out = PPOLoss(engine.settings)(engine.model, rollout.select(range(8)))
    assert out.metrics["clip_fraction"].item() == 0.0 and out.metrics["approx_kl"].item() < 1e-10
    if mode == "lora":  # a trained adapter moves the policy away from the reference
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        assert engine.make(PROMPTS, seed=3).stats["kl"] != 0.0


def test_rollout_loader_plan_and_state(tiny_model) -> None:
    policy = tiny_model(**POLICY)
    engine = _engine(policy, reference_policy(policy), 4)
    loader = RolloutLoader(PROMPTS, engine, rollout_batch_size=4, minibatch_size=2, micro_batch_size=1, ppo_epochs=2,
                           seed=5)
    assert loader.steps_per_rollout == 4 and loader.micro_batches_per_rollout == 8 and len(loader) == 16
    rows = []
    for _ in range(8):
        rows.append(loader.next_batch()["input_ids"].shape[0])
    assert rows == [1] * 8 and loader.rollout_index == 1 and loader.position == 0
    plan = minibatch_plan(loader.seed, loader.rollout_index, 2, 4, 1)
    assert sorted(sum(plan[:4], [])) == [0, 1, 2, 3]  # each epoch visits every row once
    state = loader.state_dict()
    loader.next_batch()
    with pytest.raises(Exception, match="middle of a rollout"):
        loader.state_dict()
    loader.load_state_dict(state)
    assert loader.rollout_index == 1 and loader.rollout is None
