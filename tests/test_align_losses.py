"""Bradley-Terry, the preference losses (DPO/IPO/hinge/robust, SimPO, CPO, ORPO, KTO) and PPO math against
hand-computed values; the chunked answer log-probs against full logits; KL is 0 when policy == reference. The
preference losses against TRL's own code are the parity tests at the end."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from lmcraft import peft
from lmcraft.align.config import DPOSection, PPOSection
from lmcraft.align.dpo import DPOLoss, UnpairedData, mismatched
from lmcraft.align.instruct import Tokenized
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
from lmcraft.align.preference_losses import (
    cpo_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    log_odds,
    orpo_loss,
    simpo_loss,
)
from lmcraft.align.reward import bradley_terry_loss
from lmcraft.objectives.lm_head import model_sequence_logprobs
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
        out = DPOLoss(DPOSection(beta=0.2, loss=loss_type))(model, batch)
        ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]) / div
        pol = logps / div
        expected, _, _ = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], 0.2, loss_type)
        torch.testing.assert_close(out.loss_sum, expected.sum())
        assert out.num_targets == 2
    # a reference equal to the policy gives h = 0: loss log 2 per pair, zero rewards
    same = DPOLoss(DPOSection(beta=0.2), ReferencePolicy(copy.deepcopy(model)))(
        model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    torch.testing.assert_close(same.loss_sum, torch.tensor(2 * math.log(2.0)))
    assert same.metrics["reward_margin"].item() == 0.0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_hinge_and_robust_dpo_by_hand() -> None:
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-5.0, -7.0, -6.0, -6.0))  # h = 2
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.tensor([0.5]))  # max(0, 1 - 0.25 * 2)
    assert dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="hinge")[0].item() == 0.0  # past the margin: no loss
    robust, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=0.1)
    torch.testing.assert_close(robust, torch.tensor([(0.9 * softplus(-1.0) - 0.1 * softplus(1.0)) / 0.8]))
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust")
    torch.testing.assert_close(plain, torch.tensor([softplus(-1.0)]))  # e = 0: the sigmoid loss


def test_reference_free_losses_by_hand() -> None:
    simpo, r_c, r_r = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5)
    torch.testing.assert_close(simpo, torch.tensor([softplus(-1.5)]))  # -log sigma(2 * 1 - 0.5)
    assert (r_c.item(), r_r.item()) == (-2.0, -4.0)
    cpo, _, _ = cpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([4]), beta=0.5, alpha=1.0)
    torch.testing.assert_close(cpo, torch.tensor([softplus(-1.0) + 1.0]))  # NLL = 4 / 4 tokens
    # p_c = 0.5 (odds 1), p_r = 0.2 (odds 1/4): log sigma(log 4) = log 0.8
    torch.testing.assert_close(log_odds(torch.tensor([math.log(0.5), math.log(0.2), -1e-4])),
                               torch.tensor([0.0, math.log(0.25), math.log((1 - 1e-4) / 1e-4)]), rtol=1e-4, atol=0)
    orpo, _, _ = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), lam=0.1)
    torch.testing.assert_close(orpo, torch.tensor([math.log(2.0) - 0.1 * math.log(0.8)]))


def test_kto_by_hand() -> None:
    z = kto_reference_point(torch.tensor([-2.0, -2.0]), torch.tensor([-3.0, -4.0]))  # mean(1, 2)
    assert z.item() == 1.5 and not z.requires_grad
    assert kto_reference_point(torch.tensor([-2.0, -6.0]), torch.tensor([-3.0, -4.0])).item() == 0.0  # clamped
    losses, rewards = kto_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([True, False]),
                               z, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    torch.testing.assert_close(losses, torch.tensor([1 - sigmoid(0.5 * (1 - 1.5)), 1.5 * (1 - sigmoid(0.5 * 2.5))]))
    torch.testing.assert_close(rewards, torch.tensor([0.5, -0.5]))


def test_settings_that_do_not_apply_are_errors() -> None:
    from pydantic import ValidationError

    for bad in ({"loss": "ipo", "label_smoothing": 0.1}, {"loss": "cpo", "gamma": 2.0},
                {"loss": "simpo", "reference": "on_the_fly"}, {"loss": "sigmoid", "desirable_weight": 2.0},
                {"loss": "orpo", "nll_weight": 0.5}):
        with pytest.raises(ValidationError, match="applies to loss"):
            DPOSection(**bad)
    assert DPOSection(loss="simpo", reference="precompute").loss == "simpo"  # a default value is harmless


@pytest.mark.parametrize("peft_method", [None, "lora"])
def test_chunked_answer_logprobs_match_full_logits(tiny_model, peft_method: str | None) -> None:
    """Values and gradients of `model_sequence_logprobs` equal log softmax of the full logits, while the LM head
    sees the last position of each row and then chunks of at most `rows` positions (never B x T positions)."""
    def build():
        model = tiny_model(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
        if peft_method:
            model = peft.apply(model, {"method": "lora", "r": 2})
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.3)
        return model

    torch.manual_seed(1)
    ids = torch.randint(0, 40, (3, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, 6] = -100
    mask = torch.ones_like(ids)
    mask[2, 6] = 0
    full_model, chunked_model = build(), build()
    expected, expected_n = sequence_logps(full_model(ids, attention_mask=mask).logits, labels)
    (expected * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    seen = []
    base = chunked_model.base_model if peft_method else chunked_model
    base.head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    got, n = model_sequence_logprobs(chunked_model, labels, rows=4, input_ids=ids, attention_mask=mask)
    (got * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    torch.testing.assert_close(got, expected)
    assert n.tolist() == expected_n.tolist() == [4, 4, 3]
    assert seen[0] == (3, 1, 40) and all(len(shape) == 2 and shape[0] <= 4 for shape in seen[1:])
    grads = {k: p.grad for k, p in full_model.named_parameters() if p.grad is not None}
    assert grads
    for k, p in chunked_model.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)


def _model_batch(tiny_model):
    model = tiny_model(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    torch.manual_seed(2)
    ids = torch.randint(0, 16, (4, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6] = -100
    labels[3, 5:] = -100
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("loss", ["hinge", "robust", "simpo", "cpo", "orpo"])
def test_each_pair_loss_on_a_model(tiny_model, loss: str) -> None:
    model, batch = _model_batch(tiny_model)
    logps, counts = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
    avg = logps / counts
    settings = {"robust": {"label_smoothing": 0.2}, "simpo": {"gamma": 0.3}, "cpo": {"nll_weight": 0.7}}
    s = DPOSection(beta=0.4, loss=loss, **settings.get(loss, {}))
    if loss in ("hinge", "robust"):
        batch.update(ref_chosen=torch.tensor([-9.0, -8.0]), ref_rejected=torch.tensor([-7.0, -8.5]))
        expected = dpo_loss(logps[:2], logps[2:], batch["ref_chosen"], batch["ref_rejected"], 0.4, loss,
                            s.label_smoothing)[0]
    elif loss == "simpo":
        expected = -torch.nn.functional.logsigmoid(0.4 * (avg[:2] - avg[2:]) - 0.3)
    elif loss == "cpo":
        expected = -torch.nn.functional.logsigmoid(0.4 * (logps[:2] - logps[2:])) - 0.7 * avg[:2]
    else:
        expected = -avg[:2] - 0.4 * torch.nn.functional.logsigmoid(log_odds(avg[:2]) - log_odds(avg[2:]))
    out = DPOLoss(s)(model, batch)  # no reference: the reference-free losses never ask for one
    torch.testing.assert_close(out.loss_sum, expected.sum())
    assert out.num_targets == 2 and 0.0 <= out.metrics["reward_accuracy"].item() <= 1.0


def _example(prompt: list[int], answer: list[int]) -> Tokenized:
    ids = prompt + answer
    return Tokenized(ids, [False] * len(prompt) + [True] * len(answer), "", [(0, 0)] * len(ids))


def test_kto_batches_and_loss_on_a_model(tiny_model) -> None:
    examples = [_example([1, 2, 3, 4], [5]), _example([6, 7], [8, 9, 10]), _example([11], [12, 13])]
    data = UnpairedData([(examples[0], True), (examples[1], False), (examples[2], True)], pad_id=0, max_length=5)
    batch = data.collate(list(data.items))
    # rows 3..5: prompt i with answer i - 1 (the first takes the last's); cut to 5 tokens from the prompt's left
    assert batch["input_ids"][3:].tolist() == [[2, 3, 4, 12, 13], [6, 7, 5, 0, 0], [11, 8, 9, 10, 0]]
    assert batch["labels"][3:].tolist() == [[-100, -100, -100, 12, 13], [-100, -100, 5, -100, -100],
                                            [-100, 8, 9, 10, -100]]
    assert mismatched(examples[1], examples[1], 5).input_ids == examples[1].input_ids
    assert batch["desirable"].tolist() == [True, False, True] and batch["num_tokens"] == 13

    model = tiny_model(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    reference = tiny_model(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=5)
    s = DPOSection(beta=0.3, loss="kto", desirable_weight=1.0, undesirable_weight=2.0)
    out = DPOLoss(s, ReferencePolicy(reference))(model, batch)
    pol, _ = sequence_logps(model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    ref, _ = sequence_logps(reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    z = max(0.0, (pol[3:] - ref[3:]).mean().item())
    r = (pol[:3] - ref[:3]).tolist()
    expected = [1 - sigmoid(0.3 * (r[0] - z)), 2.0 * (1 - sigmoid(0.3 * (z - r[1]))), 1 - sigmoid(0.3 * (r[2] - z))]
    torch.testing.assert_close(out.loss_sum, torch.tensor(sum(expected)))
    assert out.num_targets == 3 and out.metrics["kl"].item() == pytest.approx(z, abs=1e-6)


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


# ---- parity with TRL 1.16: its own loss code, called on minimal stand-ins for its trainers -----------------------
class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x: Any) -> Any:
        return x

    gather = gather_for_metrics


def _trainer_stub(**attrs: Any) -> Any:
    """What TRL's loss methods read from `self`, besides the attributes each test passes."""
    from collections import defaultdict
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **attrs)


def _logprob_outputs(per_row: torch.Tensor) -> Any:
    """A TRL fused-LM-head output whose completion log-probs sum to `per_row` (one completion token per row)."""
    from types import SimpleNamespace

    col = per_row[:, None].float()
    return SimpleNamespace(log_probs=col, entropy=torch.zeros_like(col), mean_logits=torch.zeros_like(col),
                           is_top1=torch.zeros_like(col, dtype=torch.bool))


POLICY_C = torch.tensor([-5.0, -12.5, -3.25, -20.0])
POLICY_R = torch.tensor([-7.0, -11.0, -9.5, -14.0])
REF_C = torch.tensor([-6.0, -12.0, -4.0, -18.5])
REF_R = torch.tensor([-6.5, -12.25, -8.0, -15.0])


@pytest.mark.parity
@pytest.mark.parametrize("loss, smoothing", [("hinge", 0.0), ("robust", 0.1), ("robust", 0.3)])
def test_hinge_and_robust_match_trl(loss: str, smoothing: float) -> None:
    from trl.trainer.dpo_trainer import DPOTrainer

    stub = _trainer_stub(beta=0.3, label_smoothing=smoothing, loss_types=[loss], loss_weights=[1.0], ld_alpha=None,
                         precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False)
    outputs = _logprob_outputs(torch.cat([POLICY_C, POLICY_R]))
    ids = torch.ones(8, 2, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
              "ref_chosen_logps": REF_C, "ref_rejected_logps": REF_R}
    for row in range(4):  # one pair at a time: TRL returns the batch mean
        one = {k: (v[[row, 4 + row]] if k.endswith("_ids") or k.endswith("mask") else v[[row]])
               for k, v in inputs.items()}
        rows = _logprob_outputs(torch.stack([POLICY_C[row], POLICY_R[row]]))
        theirs = DPOTrainer._compute_loss(stub, lambda **kw: rows, one, False)  # noqa: B023
        ours, _, _ = dpo_loss(POLICY_C[[row]], POLICY_R[[row]], REF_C[[row]], REF_R[[row]], 0.3, loss, smoothing)
        torch.testing.assert_close(ours, theirs.reshape(1), atol=1e-6, rtol=0)
    whole = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    torch.testing.assert_close(dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, 0.3, loss, smoothing)[0].mean(), whole,
                               atol=1e-6, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("desirable", [[True, False, True, False], [True, True, True, False], [False] * 4])
def test_kto_matches_trl(desirable: list[bool]) -> None:
    from types import MethodType

    from trl.trainer.kto_trainer import KTOTrainer

    stub = _trainer_stub(beta=0.2, loss_type="kto", desirable_weight=1.3, undesirable_weight=0.6, calculate_KL=True,
                         precompute_ref_logps=True)
    stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)
    ids, kl_ids = torch.ones(4, 2, dtype=torch.long), torch.full((4, 2), 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
             "KL_completion_mask": torch.ones_like(kl_ids), "label": torch.tensor(desirable),
             "ref_logps": REF_C, "ref_KL_logps": REF_R}
    for kl_policy in (POLICY_R, POLICY_R - 3.0):  # reference point above 0, and clamped at 0
        def model(input_ids: torch.Tensor, **kw: Any) -> Any:
            return _logprob_outputs(kl_policy if input_ids is kl_ids else POLICY_C)  # noqa: B023

        theirs = KTOTrainer._compute_loss(stub, model, batch, False)
        z = kto_reference_point(kl_policy, REF_R)
        ours, _ = kto_loss(POLICY_C, REF_C, torch.tensor(desirable), z, 0.2, 1.3, 0.6)
        torch.testing.assert_close(ours.mean(), theirs, atol=1e-6, rtol=0)
        assert stub._metrics["train"]["kl"][-1] == pytest.approx(z.item(), abs=1e-6)


def _pair_batch(tiny_model, equal_chosen: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny model and 3 pairs as our collate lays them out (chosen rows, then rejected rows, right-padded)."""
    model = tiny_model(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    torch.manual_seed(3)
    ids = torch.randint(1, 32, (6, 9))
    mask = torch.ones_like(ids)
    prompt = [3, 3, 3, 3, 4, 2] if equal_chosen else [3, 4, 2, 3, 4, 2]
    ends = [9, 9, 9, 7, 9, 6] if equal_chosen else [9, 7, 8, 7, 9, 6]
    labels = torch.full_like(ids, -100)
    for row in range(6):
        labels[row, prompt[row]:ends[row]] = ids[row, prompt[row]:ends[row]]
        mask[row, ends[row]:] = 0
        ids[row, ends[row]:] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trl_pair_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{side}_{key}": batch[src][rows] for side, rows in (("chosen", slice(0, 3)), ("rejected", slice(3, 6)))
            for key, src in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("labels", "labels"))}


def _forward_stub(trainer: type, **attrs: Any) -> Any:
    return _trainer_stub(is_encoder_decoder=False, pad_token_id=0, padding_value=0, label_pad_token_id=-100,
                         concatenated_inputs=trainer.concatenated_inputs, get_batch_logps=trainer.get_batch_logps,
                         **attrs)


@pytest.mark.parity
@pytest.mark.parametrize("loss", ["simpo", "cpo"])
def test_simpo_and_cpo_match_trl_end_to_end(tiny_model, loss: str) -> None:
    """TRL's CPOTrainer (loss_type simpo with cpo_alpha 0, or sigmoid with cpo_alpha) on our tiny model and batch.
    TRL's NLL term is the token mean over the micro-batch's chosen answers, ours the mean over pairs of each chosen
    answer's token mean: equal when the chosen answers have one length (this batch); ours by hand otherwise."""
    from types import MethodType

    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    for equal in (True, False):
        model, batch = _pair_batch(tiny_model, equal_chosen=equal)
        alpha = 0.0 if loss == "simpo" else 0.7
        stub = _forward_stub(CPOTrainer, beta=2.0 if loss == "simpo" else 0.4, label_smoothing=0.0, alpha=0.0,
                             simpo_gamma=0.6, cpo_alpha=alpha, loss_type="simpo" if loss == "simpo" else "sigmoid")
        stub.cpo_loss = MethodType(CPOTrainer.cpo_loss, stub)
        stub.concatenated_forward = MethodType(CPOTrainer.concatenated_forward, stub)
        theirs, metrics = CPOTrainer.get_batch_loss_metrics(stub, model, _trl_pair_inputs(batch))
        settings = {"gamma": 0.6} if loss == "simpo" else {"nll_weight": alpha}
        out = DPOLoss(DPOSection(loss=loss, beta=stub.beta, **settings))(model, batch)
        ours = out.loss_sum / out.num_targets
        if equal or loss == "simpo":
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        else:
            logps, counts = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
            pooled = -logps[:3].sum() / counts[:3].sum()
            torch.testing.assert_close(theirs - alpha * pooled, ours - alpha * (-(logps[:3] / counts[:3]).mean()),
                                       atol=1e-6, rtol=0)
            assert metrics["nll_loss"] == pytest.approx(pooled.item(), abs=1e-6)


@pytest.mark.parity
def test_orpo_matches_trl_end_to_end(tiny_model) -> None:
    """TRL's ORPOTrainer on our tiny model and batch: the odds-ratio term equals ours; TRL's NLL is the token mean
    over the chosen rows' prompt and answer tokens, ours (the paper's SFT term on the answer) the mean over pairs of
    each chosen answer's token mean, checked by hand."""
    from types import MethodType

    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model, batch = _pair_batch(tiny_model, equal_chosen=False)
    stub = _forward_stub(ORPOTrainer, beta=0.25)
    stub.odds_ratio_loss = MethodType(ORPOTrainer.odds_ratio_loss, stub)
    stub.concatenated_forward = MethodType(ORPOTrainer.concatenated_forward, stub)
    theirs, metrics = ORPOTrainer.get_batch_loss_metrics(stub, model, _trl_pair_inputs(batch))
    out = DPOLoss(DPOSection(loss="orpo", beta=0.25))(model, batch)
    logps, counts = sequence_logps(model(batch["input_ids"]).logits, batch["labels"])
    ours_nll = -(logps[:3] / counts[:3]).mean()
    torch.testing.assert_close(out.loss_sum / 3 - ours_nll, theirs - metrics["nll_loss"], atol=1e-6, rtol=0)
    assert metrics["log_odds_chosen"] == pytest.approx(
        (log_odds(logps[:3] / counts[:3]) - log_odds(logps[3:] / counts[3:])).mean().item(), abs=1e-6)
