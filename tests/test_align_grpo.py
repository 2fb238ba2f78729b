"""GRPO's math on hand-computed values (advantages, clipped objective, k3, the four aggregations), dynamic sampling,
the chunked answer log-probs, and the verifiable rewards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmcraft.align.grpo import GroupRolloutEngine, GRPOLoss, overlong_penalty
from lmcraft.align.grpo_config import GRPOSection, RewardSpec, TaskSection
from lmcraft.align.grpo_loss import aggregate, degenerate_groups, group_advantages, k3_kl, sequence_loss, token_loss
from lmcraft.align.rewards import Rewards, answer_text, task_answer_spec, task_items
from lmcraft.errors import ConfigError
from lmcraft.objectives.lm_head import answer_logprobs, chunked_token_logprobs, token_logprobs
from lmcraft.prompting.answers import AnswerSpec

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


# ---- advantages -----------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand() -> None:
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of (1, 0, 0, 1)
    grpo = group_advantages(REWARDS, 4, "grpo", eps=1e-4)
    expect = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert grpo.tolist() == pytest.approx(expect, abs=1e-6)
    assert torch.equal(group_advantages(REWARDS, 4, "dapo"), group_advantages(REWARDS, 4, "grpo"))
    assert group_advantages(REWARDS, 4, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    # leave-one-out: r_i minus the mean of the other three
    assert group_advantages(REWARDS, 4, "rloo").tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def test_degenerate_groups() -> None:
    assert degenerate_groups(REWARDS, 4).tolist() == [False, True]
    assert degenerate_groups(torch.tensor([0.0, 0.0, 1.0, 1.0, 3.0, 3.0]), 2).tolist() == [True, True, True]


# ---- per-token objective and aggregation ----------------------------------------------------------------------------
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
OLD = torch.tensor([[-1.1, -0.2, -2.0], [-0.3, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -0.4, -2.0], [-0.1, -1.1, -0.9]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([0.8, -1.5])


def _token_by_hand(i: int, t: int, eps_low: float, eps_high: float, beta: float) -> float:
    rho = math.exp(float(LOGP[i, t] - OLD[i, t]))
    a = float(ADV[i])
    loss = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
    d = float(REF[i, t] - LOGP[i, t])
    return loss + beta * (math.exp(d) - d - 1)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_token_losses_by_hand(loss: str, beta: float) -> None:
    eps_low, eps_high, lmax = 0.2, 0.28, 5
    per, _, _ = token_loss(LOGP, OLD, ADV, eps_low, eps_high)
    per = per + beta * k3_kl(LOGP, REF)
    total, count = aggregate(per, MASK, loss, lmax)
    lengths = [2, 3]
    tok = [[_token_by_hand(i, t, eps_low, eps_high, beta) for t in range(lengths[i])] for i in range(2)]
    if loss == "grpo":
        expect = (sum(tok[0]) / 2 + sum(tok[1]) / 3) / 2
    elif loss == "dapo":
        expect = (sum(tok[0]) + sum(tok[1])) / 5
    else:
        expect = (sum(tok[0]) + sum(tok[1])) / (2 * lmax)
    assert float(total / count) == pytest.approx(expect, abs=1e-6)


def test_clip_higher_and_clip_flags() -> None:
    logp, old = torch.tensor([[math.log(1.25), math.log(0.7)]]), torch.zeros(1, 2)
    loss, low, high = token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([-1.25, -0.7]) and not high.any()  # 1.25 < 1 + 0.28: not clipped
    loss, low, high = token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    assert loss.tolist()[0] == pytest.approx([-1.2, -0.7]) and high.tolist() == [[True, False]]
    loss, low, high = token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.2)  # A < 0: the low side clips
    assert loss.tolist()[0] == pytest.approx([1.25, 0.8]) and low.tolist() == [[False, True]]


def test_k3_by_hand() -> None:
    assert float(k3_kl(torch.tensor(-1.0), torch.tensor(-2.0))) == pytest.approx(math.exp(-1) + 1 - 1)
    assert float(k3_kl(torch.tensor(-1.0), torch.tensor(-1.0))) == 0.0


def test_rloo_sequence_loss_by_hand() -> None:
    per, _, _ = sequence_loss(LOGP, OLD, ADV, MASK, 0.2, 0.2)
    total, count = aggregate(per, MASK, "rloo", 5)
    rho0, rho1 = math.exp(0.1 - 0.3), math.exp(0.0 - 0.2 + 0.3)  # exp(sum of masked log-ratios)
    l0 = -min(rho0 * 0.8, min(max(rho0, 0.8), 1.2) * 0.8)
    l1 = -min(rho1 * -1.5, min(max(rho1, 0.8), 1.2) * -1.5)
    assert count == 2 and float(total / count) == pytest.approx((l0 + l1) / 2, abs=1e-6)


def test_overlong_penalty() -> None:
    out = overlong_penalty(torch.tensor([10, 12, 14, 16]), max_length=16, buffer=4, penalty=2.0)
    assert out.tolist() == pytest.approx([0.0, 0.0, -1.0, -2.0])


# ---- chunked log-probs ----------------------------------------------------------------------------------------------
def test_chunked_logprobs_match_full_logits_with_gradients() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    logp, entropy = chunked_token_logprobs(hidden, head, tokens, rows=4, temperature=0.7)
    ref = token_logprobs(head(hidden), tokens, 0.7)
    assert torch.allclose(logp, ref, atol=1e-6)
    full = (head(hidden).float() / 0.7).log_softmax(-1)
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-5)
    weights = torch.randn(3, 5)
    g_chunk = torch.autograd.grad((logp * weights).sum(), [hidden, head.weight])
    g_full = torch.autograd.grad((ref * weights).sum(), [hidden, head.weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_chunk, g_full, strict=True))


def test_loss_keeps_no_vocab_sized_activation(tiny_model) -> None:
    """The saved-for-backward tensors of a GRPO micro-batch: none as large as (rows, length, vocab)."""
    model = tiny_model(vocab_size=512)
    settings = GRPOSection(num_generations=2, prompts_per_rollout=4, max_new_tokens=8)
    ids = torch.randint(0, 512, (8, 14))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_width": 6,
             "answer_mask": torch.ones(8, 8), "advantages": torch.linspace(-1, 1, 8), "stats": {}}
    sizes: list[tuple[int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = GRPOLoss(settings)(model, batch)
    out.loss_sum.backward()
    params = {p.data_ptr() for p in model.parameters()}
    activations = [n for n, ptr in sizes if ptr not in params]
    assert activations and max(activations) < 8 * 8 * 512 // 4  # the largest is far below one logits tensor
    logp = token_logprobs(model(ids).logits[:, 5:13], ids[:, 6:])
    chunked, _ = answer_logprobs(model, ids, torch.ones_like(ids), 6)
    assert torch.allclose(chunked, logp, atol=1e-5)


# ---- dynamic sampling -----------------------------------------------------------------------------------------------
class _StubRewards:
    """Flat rewards (all 1) for items marked flat, else 0, 1, 2, ... within the group."""

    def __call__(self, items, texts, lengths):
        values = torch.tensor([1.0 if it["flat"] else float(i % 2) for i, it in enumerate(items)])
        return values, {"stub": values}


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_drops_flat_groups(tiny_model, dynamic: bool) -> None:
    model = tiny_model()
    settings = GRPOSection(num_generations=2, prompts_per_rollout=2, max_new_tokens=3, dynamic_sampling=dynamic,
                           max_sampling_rounds=3)
    batches = iter([[{"ids": [1, 2], "flat": True}, {"ids": [3, 4], "flat": False}],
                    [{"ids": [5, 6], "flat": True}, {"ids": [7, 8], "flat": False}],
                    [{"ids": [9, 9], "flat": True}, {"ids": [9, 9], "flat": True}]])
    drawn: list[int] = []

    def draw():
        drawn.append(1)
        return next(batches)

    class _Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    engine = GroupRolloutEngine(model, None, _StubRewards(), _Tok(), settings, [63], 0)
    rollout = engine.make(draw, lambda k: k)
    if dynamic:  # two rounds: one signal group from each
        assert len(drawn) == 2 and rollout.stats["groups_dropped"] == 0.5 and rollout.stats["groups_flat"] == 0.0
        assert rollout.advantages.abs().min() > 0
        assert rollout.input_ids[:, :2].tolist() == [[3, 4], [3, 4], [7, 8], [7, 8]]
    else:
        assert len(drawn) == 1 and rollout.stats["groups_flat"] == 0.5
        assert rollout.advantages[:2].tolist() == [0.0, 0.0]
    assert rollout.old_logprobs is None and rollout.ref_logprobs is None  # one step, mu = 1, beta = 0


# ---- rewards --------------------------------------------------------------------------------------------------------
def test_arithmetic_items_are_seeded_correct_and_sized() -> None:
    """The built-in arithmetic prompting task, with overrides, sized to cover size + eval_size (its default is 200)."""
    section = TaskSection(size=300, eval_size=20, system="Think first.",
                          overrides={"data.max_operand": 20, "data.min_operand": 1, "data.operators": ["+", "-", "*"]})
    train, held = task_items(section)
    assert (train, held) == task_items(section)
    assert len(train) == 300 and len(held) == 20 and train[0]["messages"][0] == {"role": "system",
                                                                                 "content": "Think first."}
    for item in train + held:
        a, op, b = item["messages"][-1]["content"].removeprefix("Question: What is ").removesuffix("?").split()
        expect = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert item["answer"] == str(expect) and 1 <= int(a) <= 20
    assert task_answer_spec(section).type == "numeric"


def test_rewards_terms_and_weighted_sum() -> None:
    specs = [RewardSpec(kind="accuracy"), RewardSpec(kind="format", weight=0.5),
             RewardSpec(kind="length", max_tokens=4, weight=0.1)]
    rewards = Rewards(specs, AnswerSpec(type="numeric"))
    items = [{"messages": [], "answer": "81"}] * 3
    texts = ["<think>23 + 58 = 81</think><answer>81</answer>", "<answer>80</answer> the sum is 81", "81"]
    total, terms = rewards(items, texts, [4, 6, 8])
    assert terms["accuracy"].tolist() == [1.0, 0.0, 1.0]  # the tagged answer wins over the text around it
    assert terms["format"].tolist() == [1.0, 0.0, 0.0]
    assert terms["length"].tolist() == pytest.approx([0.0, -0.5, -1.0])
    assert total.tolist() == pytest.approx([1.5, -0.05, 0.9])
    assert answer_text("a <answer>1</answer> b <answer>2</answer>") == "2"


def test_rule_scorer_reward_and_errors() -> None:
    spec = RewardSpec(kind="scorer", name="polite", scorer={"kind": "rule", "rule": "contains", "words": ["please"]})
    total, terms = Rewards([spec])([{"messages": []}] * 2, ["yes please", "no"], [2, 1])
    assert terms["polite"].tolist() == [1.0, 0.0] and total.tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="unique"):
        Rewards([RewardSpec(kind="format"), RewardSpec(kind="format", pattern="x")])
    with pytest.raises(ConfigError, match="gold answers"):
        Rewards([RewardSpec(kind="accuracy")])([{"messages": []}], ["1"], [1])
    with pytest.raises(ValueError, match="max_tokens"):
        RewardSpec(kind="length")


def test_prompting_task_items(tmp_path: Path) -> None:
    task = tmp_path / "sums.yaml"
    task.write_text("name: sums\ndata: {source: inline, records: [{q: '1+1', a: '2'}, {q: '2+3', a: '5'}, "
                    "{q: '4+4', a: '8'}]}\ntemplate: {description: Add., input: 'Q: {q}', target: '{a}'}\n"
                    "answer: {type: numeric}\n")
    train, held = task_items(TaskSection(name=str(task), size=2, eval_size=1))
    assert train[1]["messages"] == [{"role": "system", "content": "Add."}, {"role": "user", "content": "Q: 2+3"}]
    assert held[0]["answer"] == "8" and task_answer_spec(TaskSection(name=str(task))).type == "numeric"
    with pytest.raises(ConfigError, match="fewer than"):
        task_items(TaskSection(name=str(task), size=3, eval_size=1))


def test_grpo_section_geometry() -> None:
    s = GRPOSection(num_generations=4, prompts_per_rollout=4, minibatch_size=8, mu=2)
    assert s.rows == 16 and s.steps_per_rollout == 4 and s.eps_high == s.epsilon_low
    with pytest.raises(ValueError, match="multiple"):
        GRPOSection(num_generations=3, prompts_per_rollout=1, minibatch_size=2)
    with pytest.raises(ValueError, match="overlong_buffer"):
        GRPOSection(max_new_tokens=8, overlong_buffer=8)


@pytest.mark.slow
def test_gsm_symbolic_items_score_their_own_gold_answers() -> None:
    """A prompting task as the GRPO task: its template renders the question, its answer spec scores the reply."""
    section = TaskSection(name="gsm_symbolic", size=4, eval_size=2)
    train, held = task_items(section)
    assert len(train) == 4 and len(held) == 2 and train[0]["messages"][-1]["content"].startswith("Question: ")
    rewards = Rewards([RewardSpec(kind="accuracy")], task_answer_spec(section))
    right, _ = rewards(train, [f"<think>...</think><answer>{i['answer']}</answer>" for i in train], [1] * 4)
    wrong, _ = rewards(train, [f"#### {float(i['answer']) + 1}" for i in train], [1] * 4)
    assert right.tolist() == [1.0] * 4 and wrong.tolist() == [0.0] * 4


def test_held_out_change_against_scipy() -> None:
    """Wilson intervals and the exact McNemar p-value of a paired before/after change, checked against scipy's
    exact binomial test on the discordant items and its Wilson interval."""
    from scipy.stats import binomtest

    from lmcraft.align.held_out import held_out_change

    before = [True] * 10 + [False] * 30 + [True] * 2 + [False] * 8
    after = [True] * 10 + [True] * 14 + [False] * 16 + [False] * 2 + [False] * 8
    got = held_out_change(before, after)
    assert (got["held_out"], got["right_before_only"], got["right_after_only"]) == (50, 2, 14)
    assert got["mcnemar_p"] == pytest.approx(binomtest(14, 16, 0.5).pvalue, rel=1e-12)
    for key, hits in (("before", 12), ("after", 24)):
        ci = binomtest(hits, 50).proportion_ci(0.95, method="wilson")
        assert (got[f"accuracy_{key}_ci_low"], got[f"accuracy_{key}_ci_high"]) == pytest.approx((ci.low, ci.high))
    with pytest.raises(ValueError, match="different lengths"):
        held_out_change([True], [True, False])
