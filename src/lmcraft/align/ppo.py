"""RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), on the shared Trainer.

Rollout (no gradients). For B prompts x, the policy samples answers y = (y_1..y_n) with the KV-cache generator
(temperature T). For every answer token t, with s_t = (x, y_<t):

    logp_t   = log pi(y_t | s_t)          (the policy at rollout time; logits divided by T)
    ref_t    = log ref(y_t | s_t)         (adapters disabled for PEFT runs, else a frozen copy of the start policy)
    V_t      = value head on the hidden state of s_t's last token
    kl_t     = logp_t - ref_t             (per-token KL estimate; sum_t kl_t estimates KL(pi || ref) of the answer)
    r_t      = -beta kl_t  +  [t = n] * score(x, y)          (score: reward model or rule, minus a penalty when the
                                                              answer did not end with EOS, if configured)
    logged per rollout: score, kl = sum_t kl_t, rlhf_reward = score - beta kl, entropy, beta, answer length
    delta_t  = r_t + gamma V_{t+1} - V_t                      (V_{n+1} = 0)
    A_t      = delta_t + gamma lambda A_{t+1}                 (GAE), returns R_t = A_t + V_t

A is whitened over the batch (mean 0, variance 1 over all answer tokens); optionally the rewards r are scaled to
unit variance first. beta is fixed, or adaptive (Ziegler et al.): after each rollout
beta <- beta * (1 + clip(KL / KL_target - 1, -0.2, 0.2) * B / horizon), KL the batch's mean answer KL.

Update. `ppo_epochs` passes over the rollout in shuffled minibatches, one optimizer step each, minimising the token
mean over the minibatch of

    L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))                       rho_t = exp(logp'_t - logp_t)
        + c_v * 0.5 * max((V'_t - R_t)^2, (V_t + clip(V'_t - V_t, -eps_v, eps_v) - R_t)^2)
        - c_ent * entropy_t

Exact resume. One trainer step is one minibatch; `RolloutLoader` produces the micro-batches and generates a new
rollout whenever the previous one is used up, from a seed fixed by (seed, rollout index). Checkpoints are taken at
rollout boundaries only (the stage enforces it), so a resumed run regenerates the next rollout from the restored
policy exactly as the uninterrupted run did; beta is saved with the data position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from lmcraft.align.run import AlignmentMethod, Run, TrainPlan
from lmcraft.data.collate import pad_with_mask
from lmcraft.errors import ConfigError, LmcraftError
from lmcraft.objectives.lm_head import scored_batches, token_logprobs
from lmcraft.train.loader import ResumableLoader

if TYPE_CHECKING:
    from lmcraft.align.config import PPOSection, PromptsSection
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.peft.training import ReferencePolicy
    from lmcraft.train import LossOutput

__all__ = [
    "PPO",
    "AdaptiveKLController",
    "PPOLoss",
    "PolicyWithValue",
    "Rollout",
    "RolloutEngine",
    "OnDemandRollouts",
    "RolloutLoader",
    "RolloutRows",
    "gae",
    "layout",
    "load_ppo_prompts",
    "masked_mean",
    "minibatch_plan",
    "policy_loss",
    "token_rewards",
    "value_loss",
    "whiten",
]


# ---- math -----------------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); `shift_mean=False` keeps the mean."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp_min(2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_t, kl_t) for answers laid out as (B, n) with `mask` marking real tokens: r_t = -beta kl_t, plus the score
    at each row's last real token."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last real token (answers are right-padded)
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over right-padded (B, n) answers; values beyond
    a row's end count as 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    n = rewards.shape[1]
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate max(-A rho, -A clip(rho, 1-eps, 1+eps)) and whether the clipped term was taken."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 max((V' - R)^2, (V + clip(V' - V, -eps, eps) - R)^2) and whether the clipped term was taken."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


class AdaptiveKLController:
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon) (Ziegler et al.); fixed if target is None."""

    def __init__(self, beta: float, target: float | None = None, horizon: float = 10000.0) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n / self.horizon


# ---- model -------------------------------------------------------------------------------------------------------
class PolicyWithValue(nn.Module):
    """A causal LM (or PeftModel) plus a value head V(s) = w . h_s + b on its final hidden states.

    forward(...) returns (logits (B, T, V), values (B, T)); `config` is the policy's (checkpoints write it).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        h = out.hidden_states.to(self.value_head.weight.dtype)
        return out.logits, self.value_head(h).squeeze(-1)


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ---- rollouts ----------------------------------------------------------------------------------------------------
@dataclass
class RolloutRows:
    """The rows of a rollout (PPO's `Rollout`, GRPO's `GroupRollout`): left-padded prompt (width `prompt_width`) +
    right-padded answer, the answer mask (float) and the rollout's stats.

    `select` cuts a micro-batch: these tensors of the rows, the per-row tensors named in `row_keys` and the
    per-answer-token tensors named in `token_keys` (one that is None is left out), the answer columns trimmed to the
    rows' longest answer (at least `min_answer_width` columns), plus a copy of the stats.
    """

    row_keys: ClassVar[tuple[str, ...]] = ()
    token_keys: ClassVar[tuple[str, ...]] = ()
    min_answer_width: ClassVar[int] = 0

    input_ids: torch.Tensor       # (B, P + n)
    attention_mask: torch.Tensor  # (B, P + n)
    prompt_width: int
    answer_mask: torch.Tensor     # (B, n) float
    stats: dict[str, float] = field(default_factory=dict, kw_only=True)

    def select(self, rows: Sequence[int]) -> dict[str, Any]:
        """A micro-batch: the rows' tensors, trimmed to their longest answer, plus the rollout stats."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        mask = self.answer_mask[idx]
        n = max(int(mask.sum(-1).max()), self.min_answer_width)
        width = self.prompt_width
        batch = {"input_ids": self.input_ids[idx, : width + n], "attention_mask": self.attention_mask[idx, : width + n],
                 "prompt_width": width, "answer_mask": mask[:, :n]}
        batch.update({key: getattr(self, key)[idx] for key in self.row_keys})
        for key in self.token_keys:
            value = getattr(self, key)
            if value is not None:
                batch[key] = value[idx, :n]
        batch["stats"] = dict(self.stats)
        return batch


@dataclass
class Rollout(RolloutRows):
    """B sequences = left-padded prompt (width P) + right-padded answer (width n), and per-answer-token tensors."""

    token_keys = ("logprobs", "values", "advantages", "returns")

    logprobs: torch.Tensor        # (B, n)
    values: torch.Tensor          # (B, n)
    advantages: torch.Tensor      # (B, n)
    returns: torch.Tensor         # (B, n)
    texts: list[str] = field(default_factory=list)


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, width: int, n: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and values (if the model has a value head) at the positions that predict the n answer tokens."""
    out = model(ids, attention_mask=mask)
    if isinstance(out, tuple):
        logits, values = out
        return logits[:, width - 1: width - 1 + n], values[:, width - 1: width - 1 + n]
    return out.logits[:, width - 1: width - 1 + n], None


def layout(prompt_ids: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest prompt, then answers right-padded: (ids, mask, answer ids, answer mask),
    the answer columns starting at the same index in every row (PPO's and GRPO's rollouts)."""
    width = max(map(len, prompt_ids))
    prompts, prompt_mask = pad_with_mask(prompt_ids, pad_id, side="left")
    replies, reply_mask = pad_with_mask(answers, pad_id)
    ids, mask = torch.cat([prompts, replies], 1), torch.cat([prompt_mask, reply_mask], 1)
    return ids, mask, ids[:, width:], mask[:, width:].float()


def minibatch_plan(seed: int, rollout_index: int, epochs: int, rows: int, micro_batch_size: int) -> list[list[int]]:
    """Row indices of each micro-batch of a rollout of `rows` rows, `epochs` passes (a shuffle seeded by (seed,
    rollout index, epoch) each), cut into micro-batches of `micro_batch_size` rows."""
    plan = []
    for epoch in range(epochs):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rollout_index, epoch])))
        order = rng.permutation(rows).tolist()
        plan += [order[i: i + micro_batch_size] for i in range(0, rows, micro_batch_size)]
    return plan


class RolloutEngine:
    """Generates rollouts and computes their advantages (everything above the update in the module docstring).

    model: the `PolicyWithValue` being trained; reference: the reference policy (`peft.training.reference_policy` of
    the policy); score_fn(prompts, answers) -> scores (B,) for prompt messages and answer texts.
    """

    def __init__(self, model: PolicyWithValue, reference: ReferencePolicy,
                 score_fn: Callable[[list[list[dict[str, Any]]], list[str]], torch.Tensor], tokenizer: Any,
                 settings: PPOSection, kl: AdaptiveKLController, eos_token_ids: Sequence[int], pad_id: int) -> None:
        self.model, self.reference, self.score_fn, self.tokenizer = model, reference, score_fn, tokenizer
        self.settings, self.kl, self.eos, self.pad_id = settings, kl, list(eos_token_ids), pad_id

    @torch.no_grad()
    def _generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
        from lmcraft.generate import GenerationConfig, generate

        config = GenerationConfig.from_settings(self.settings, eos_token_ids=self.eos, pad_token_id=self.pad_id,
                                                seed=seed)
        return generate(self.model.policy, prompt_ids, config).tokens

    def _score_old(self, ids: torch.Tensor, mask: torch.Tensor, width: int, answer_ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp, values, ref_logp, entropy) per answer token, in batches of `forward_batch_size` rows."""
        temp, n = self.settings.temperature, answer_ids.shape[1]

        def score(rows: slice) -> tuple[torch.Tensor, ...]:
            logits, values = _forward(self.model, ids[rows], mask[rows], width, n)
            with self.reference.active(self.model.policy) as reference:
                ref_logits, _ = _forward(reference, ids[rows], mask[rows], width, n)
            return (token_logprobs(logits, answer_ids[rows], temp), values.float(),
                    token_logprobs(ref_logits, answer_ids[rows], temp), _entropy(logits, temp))

        parts = scored_batches(self.model, ids.shape[0], self.settings.forward_batch_size, score)
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def make(self, prompts: Sequence[dict[str, Any]], seed: int) -> Rollout:
        """One rollout for `prompts` (dicts with `messages` and `ids`)."""
        device = next(self.model.parameters()).device
        prompt_ids = [list(p["ids"]) for p in prompts]
        answers = self._generate(prompt_ids, seed)
        ids, mask, answer_ids, answer_mask = (t.to(device) for t in layout(prompt_ids, answers, self.pad_id))
        width = ids.shape[1] - answer_ids.shape[1]
        logp, values, ref_logp, entropy = self._score_old(ids, mask, width, answer_ids)
        ended = torch.tensor([bool(a) and a[-1] in self.eos for a in answers], device=device)
        texts = [self.tokenizer.decode(a[:-1] if ended[i] else a, skip_special_tokens=True)
                 for i, a in enumerate(answers)]
        scores = self.score_fn([p["messages"] for p in prompts], texts).to(device).float()
        raw_scores = scores.clone()
        if self.settings.missing_eos_penalty is not None:
            scores = scores - self.settings.missing_eos_penalty * (~ended).float()
        beta = self.kl.beta
        rewards, kl = token_rewards(logp, ref_logp, scores, answer_mask, beta)
        if self.settings.whiten_rewards:
            rewards = whiten(rewards, answer_mask, shift_mean=False)
        advantages, returns = gae(rewards, values, answer_mask, self.settings.gamma, self.settings.lam)
        if self.settings.whiten_advantages:
            advantages = whiten(advantages, answer_mask)
        seq_kl = kl.sum(-1)
        stats = {"score": float(raw_scores.mean()), "kl": float(seq_kl.mean()), "beta": beta,
                 "entropy": float(masked_mean(entropy, answer_mask)),
                 "answer_length": float(answer_mask.sum(-1).mean()),
                 "ended": float(ended.float().mean()), "non_score_reward": float((-beta * seq_kl).mean()),
                 "rlhf_reward": float((scores - beta * seq_kl).mean()),
                 "value_mean": float(masked_mean(values, answer_mask))}
        self.kl.update(stats["kl"], len(prompts))
        return Rollout(ids, mask, width, answer_mask, logp, values * answer_mask, advantages, returns, texts,
                       stats=stats)


class PPOLoss:
    """The trainer's loss_fn on one micro-batch of a rollout: summed per-token PPO loss over answer tokens."""

    def __init__(self, settings: PPOSection) -> None:
        self.settings = settings

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        from lmcraft.train import LossOutput

        h, mask = self.settings, batch["answer_mask"]
        width, n = batch["prompt_width"], mask.shape[1]
        logits, values = _forward(model, batch["input_ids"], batch["attention_mask"], width, n)
        tokens = batch["input_ids"][:, width: width + n]
        logp = token_logprobs(logits, tokens, h.temperature)
        pg, pg_clipped = policy_loss(logp, batch["logprobs"], batch["advantages"], h.clip_range)
        vf, vf_clipped = value_loss(values.float(), batch["values"], batch["returns"], h.clip_range_value)
        entropy = _entropy(logits, h.temperature)
        per_token = pg + h.vf_coef * vf - h.ent_coef * entropy
        count = mask.sum()
        with torch.no_grad():
            log_ratio = logp - batch["logprobs"]
            metrics: dict[str, Any] = {
                "policy_loss": masked_mean(pg, mask), "value_loss": masked_mean(vf, mask),
                "clip_fraction": masked_mean(pg_clipped, mask), "value_clip_fraction": masked_mean(vf_clipped, mask),
                "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask), "policy_entropy": masked_mean(entropy, mask),
                "ratio": masked_mean(log_ratio.exp(), mask),
            }
            metrics.update({k: torch.tensor(v) for k, v in batch["stats"].items()})
        return LossOutput((per_token * mask).sum(), count, metrics, num_tokens=int(batch["attention_mask"].sum()))


class OnDemandRollouts(ResumableLoader):
    """A trainer loader over rollouts generated on demand: when the current rollout's micro-batch plan is used up,
    the next call makes a new rollout (`new_rollout`: the rollout and its plan of row lists) and records its stats
    in `history`. The state is saveable only at rollout boundaries; `resume_keys` are the settings a checkpoint
    must share with this run to resume exactly."""

    method = "rollout"  # the stage's name in messages

    def __init__(self, prompts: Sequence[dict[str, Any]], batch_size: int, seed: int, shuffle: bool) -> None:
        super().__init__(prompts, batch_size, collate_fn=list, seed=seed, shuffle=shuffle)
        self.rollout_index, self.position = 0, 0
        self.rollout: Any = None
        self.plan: list[list[int]] = []
        self.history: list[dict[str, float]] = []  # stats of every rollout (kept in checkpoints)

    def new_rollout(self) -> tuple[Any, list[list[int]]]:
        raise NotImplementedError

    @property
    def micro_batches_per_rollout(self) -> int:
        raise NotImplementedError

    @property
    def prompt_batches(self) -> int:
        """The whole prompt batches in one pass over the prompts."""
        return len(self.dataset) // self.batch_size

    def __len__(self) -> int:
        """Micro-batches per pass over the prompts."""
        return self.prompt_batches * self.micro_batches_per_rollout

    def prompt_batch(self, k: int) -> list[dict[str, Any]]:
        """The k-th prompt batch drawn (counting across passes) from the seeded order over the prompts."""
        epoch, index = divmod(k, self.prompt_batches)
        return [self.dataset[int(i)] for i in self.indices(epoch, index)]

    def rollout_seed(self, *more: int) -> int:
        """A sampling seed fixed by (seed, rollout index, *more)."""
        return int(np.random.SeedSequence([self.seed, self.rollout_index, *more]).generate_state(1)[0])

    def resume_keys(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_prompts": len(self.dataset)}

    def next_batch(self) -> dict[str, Any]:
        if self.rollout is None:
            self.rollout, self.plan = self.new_rollout()
            self.history.append({"rollout": self.rollout_index, **self.rollout.stats})
        batch = self.rollout.select(self.plan[self.position])
        self.position += 1
        if self.position == len(self.plan):
            self.rollout, self.position = None, 0
            self.rollout_index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self.position:
            raise LmcraftError(f"internal: a {self.method} checkpoint was requested in the middle of a rollout; "
                               "checkpoints are only taken at rollout boundaries (save_every / eval_every are counted "
                               "in rollouts)")
        return {"rollout_index": self.rollout_index, "history": self.history, **self.resume_keys()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in self.resume_keys().items():
            if state[key] != mine:
                raise LmcraftError(f"cannot resume {self.method} exactly: the checkpoint was made with "
                                   f"{key}={state[key]!r}, this run has {key}={mine!r}; resume with the same prompts "
                                   f"and {self.method.lower()} settings")
        self.rollout_index, self.history = int(state["rollout_index"]), list(state["history"])
        self.rollout, self.position = None, 0


class RolloutLoader(OnDemandRollouts):
    """The trainer's data: micro-batches of PPO minibatches over rollouts generated on demand.

    A rollout takes the next `rollout_batch_size` prompts (the parent loader's seeded order over the prompt set),
    then serves `ppo_epochs` passes of shuffled rows cut into minibatches of `minibatch_size` rows, each cut into
    micro-batches of `micro_batch_size` rows (one trainer step = one minibatch = its micro-batches). `len()` counts
    micro-batches per pass over the prompt set. The state (rollout index, KL coefficient) is saveable only at
    rollout boundaries.
    """

    method = "PPO"

    def __init__(self, prompts: Sequence[dict[str, Any]], engine: RolloutEngine, rollout_batch_size: int,
                 minibatch_size: int, micro_batch_size: int, ppo_epochs: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if rollout_batch_size % minibatch_size or minibatch_size % micro_batch_size:
            raise LmcraftError(f"rollout_batch_size ({rollout_batch_size}) must be a multiple of the minibatch size "
                               f"({minibatch_size}), itself a multiple of micro_batch_size ({micro_batch_size})")
        self.engine = engine  # set before the parent's checks, which call len()
        self.minibatch_size, self.micro_batch_size, self.ppo_epochs = minibatch_size, micro_batch_size, ppo_epochs
        super().__init__(prompts, rollout_batch_size, seed, shuffle)

    @property
    def micro_batches_per_rollout(self) -> int:
        return self.ppo_epochs * self.batch_size // self.micro_batch_size

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.batch_size // self.minibatch_size

    def new_rollout(self) -> tuple[Rollout, list[list[int]]]:
        plan = minibatch_plan(self.seed, self.rollout_index, self.ppo_epochs, self.batch_size, self.micro_batch_size)
        return self.engine.make(self.prompt_batch(self.rollout_index), self.rollout_seed()), plan

    def resume_keys(self) -> dict[str, Any]:
        return {**super().resume_keys(), "rollout_batch_size": self.batch_size,
                "steps_per_rollout": self.steps_per_rollout}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "beta": self.engine.kl.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.engine.kl.beta = float(state["beta"])


def load_ppo_prompts(section: PromptsSection, formatter: ChatFormatter, rollout_batch_size: int
                     ) -> tuple[list[dict[str, Any]], int]:
    """(prompts as {"messages", "ids", "source"}, number skipped for being over `section.max_length` tokens)."""
    from lmcraft.align.data import load_prompts

    items, skipped = [], 0
    for messages, source in load_prompts(section.train, section.limit):
        ids = formatter.prompt_ids(messages)
        if len(ids) > section.max_length:
            skipped += 1
            continue
        items.append({"messages": messages, "ids": ids, "source": source})
    if len(items) < rollout_batch_size:
        raise ConfigError(f"{len(items)} usable prompts ({skipped} longer than prompts.max_length), fewer than "
                          f"ppo.rollout_batch_size={rollout_batch_size}")
    return items, skipped


class PPO(AlignmentMethod):
    """PPO in the run template: prompts, a value head on the policy, rollouts against the reference policy and the
    `reward` scorer served by `RolloutLoader`, `PPOLoss`; the trainer's steps and checkpoints follow the ppo
    section (one step per minibatch, checkpoints on rollout boundaries). Writes OUT/rollouts.jsonl and curves.png."""

    name = "ppo"

    def __init__(self) -> None:
        self.skipped = 0
        self.loader: RolloutLoader | None = None

    @staticmethod
    def steps_per_rollout(p: PPOSection) -> int:
        return p.ppo_epochs * p.rollout_batch_size // p.minibatch_size

    def data(self, run: Run) -> tuple[list[dict[str, Any]], None]:
        from lmcraft.align.instruct import ChatFormatter

        prompts, self.skipped = load_ppo_prompts(run.cfg.prompts, ChatFormatter(run.start.tokenizer),
                                                 run.cfg.ppo.rollout_batch_size)
        return prompts, None

    def total_steps(self, run: Run) -> int:
        return run.cfg.ppo.rollouts * self.steps_per_rollout(run.cfg.ppo)

    def plan(self, run: Run) -> TrainPlan:
        from lmcraft.align.common import score_eval_callback
        from lmcraft.align.scoring import build_scorer
        from lmcraft.generate import stop_token_ids
        from lmcraft.peft.training import reference_policy

        cfg, p, tokenizer = run.cfg, run.cfg.ppo, run.start.tokenizer
        micro, per_rollout = cfg.trainer.micro_batch_size, self.steps_per_rollout(p)
        trainer_cfg = cfg.trainer.model_copy(update={
            "max_steps": self.total_steps(run), "grad_accum": p.minibatch_size // micro, "plot": False,
            "save_every": None if p.save_every is None else p.save_every * per_rollout})
        policy = run.training.model
        reference = reference_policy(policy)
        model = PolicyWithValue(policy)
        engine = RolloutEngine(model, reference, build_scorer(cfg.reward), tokenizer, p,
                               AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon),
                               stop_token_ids(policy, tokenizer), tokenizer.pad_token_id or 0)
        self.loader = RolloutLoader(run.train, engine, p.rollout_batch_size, p.minibatch_size, micro, p.ppo_epochs,
                                    cfg.trainer.seed, cfg.trainer.shuffle)
        callbacks = [] if run.scorer is None else \
            [score_eval_callback(run.scorer, (p.eval_every or p.rollouts) * per_rollout, policy)]
        return TrainPlan(PPOLoss(p), self.loader, model=model, trainer_config=trainer_cfg, collate=False,
                         callbacks=callbacks)

    def summary(self, run: Run) -> dict[str, Any]:
        from lmcraft.align.plots import plot_ppo
        from lmcraft.io import write_jsonl

        history, rollouts = run.trainer.state.history, self.loader.history
        write_jsonl(run.out / "rollouts.jsonl", rollouts)
        if run.cfg.trainer.plot:
            plot_ppo(rollouts, history, self.steps_per_rollout(run.cfg.ppo), run.out / "curves.png",
                     start_score=run.start_score)
        evals = [r for r in history if r["split"] == "eval"]
        first, last = rollouts[0], rollouts[-1]
        return {"prompts": len(run.train), "skipped_prompts": self.skipped, "rollouts": len(rollouts),
                "first_rollout_score": first["score"], "last_rollout_score": last["score"], "last_kl": last["kl"],
                "last_beta": last["beta"], "start_score": run.start_score,
                "eval_score": evals[-1]["eval_score"] if evals else None}
