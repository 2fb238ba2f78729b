"""Group-relative policy optimisation (GRPO, Shao et al. 2024) and its variants DAPO, Dr.GRPO and RLOO, on the
shared Trainer. No value model; the math (advantages, clipped objective, k3 KL, aggregations) is in
lmcraft.align.grpo_loss, the rewards in lmcraft.align.rewards.

Rollout (no gradients). P prompts x_1..x_P; for each, G completions sampled in one batched decode (the prompt
repeated G times, temperature T, at most L_max = max_new_tokens tokens). Each completion gets its reward
r = sum_k w_k r_k (every term logged as reward/<name>), plus DAPO's soft overlong penalty when `overlong_buffer` b
is set: -penalty * min(1, max(0, |o| - (L_max - b)) / b). Dynamic sampling (DAPO) drops the groups whose G rewards
are all equal and draws further prompt batches (up to `max_sampling_rounds` per rollout) until P groups carry a
signal; if the rounds run out, the dropped groups fill the rest (their advantages are 0). Then, per answer token:

    l^old_t = log pi_old(o_t | x, o_<t)   (kept for the mu passes; not computed when the rollout is one optimizer
                                            step with mu = 1, where pi_old = pi)
    l^ref_t = log ref(o_t | x, o_<t)       (only when beta > 0: adapters disabled for PEFT, else a frozen copy)

and the group advantages A_i. All log-probs go through the chunked LM head (`objectives.lm_head.answer_logprobs`):
no (rows, length, vocab) tensor exists for the policy, the old policy or the reference.

Update. `mu` passes over the rollout's P*G rows in shuffled minibatches (one optimizer step each) minimising the
configured aggregation of L_{i,t}. One trainer step is one minibatch; its micro-batches are `trainer.micro_batch_size`
rows.

Exact resume. `GroupRolloutLoader` is the trainer's data: it draws prompt batches from the seeded order over the
prompts (the number drawn is its state) and samples each round from a seed fixed by (seed, rollout, round).
Checkpoints fall on rollout boundaries only, so a resumed run regenerates the next rollout from the restored policy
exactly as the uninterrupted run did. The per-step metrics add peak_memory_mb (the process's high-water mark since
training began: CUDA tensors, or the CPU resident set).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lmcraft.align.grpo_loss import (
    aggregate,
    degenerate_groups,
    group_advantages,
    k3_kl,
    sequence_loss,
    token_loss,
)
from lmcraft.align.held_out import HeldOutAccuracy
from lmcraft.align.ppo import OnDemandRollouts, RolloutRows, layout, masked_mean, minibatch_plan
from lmcraft.align.run import AlignmentMethod, Run, TrainPlan
from lmcraft.errors import ConfigError, LmcraftError
from lmcraft.objectives.lm_head import answer_logprobs, scored_batches
from lmcraft.train import Callback

if TYPE_CHECKING:
    from lmcraft.align.grpo_config import GRPOSection
    from lmcraft.align.rewards import Rewards
    from lmcraft.peft.training import ReferencePolicy
    from lmcraft.train import LossOutput, Trainer

__all__ = ["GRPO", "GRPOLoss", "GroupRollout", "GroupRolloutEngine", "GroupRolloutLoader", "PeakMemory",
           "overlong_penalty"]


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to L_max - b tokens, then falling linearly to -penalty at L_max."""
    excess = (lengths.float() - (max_length - buffer)).clamp(0, buffer)
    return -penalty * excess / buffer


@dataclass
class GroupRollout(RolloutRows):
    """P*G rows (groups contiguous): left-padded prompt (width W) + right-padded completion, and per-row tensors."""

    row_keys = ("advantages",)
    token_keys = ("old_logprobs", "ref_logprobs")
    min_answer_width = 1

    advantages: torch.Tensor           # (R,)
    old_logprobs: torch.Tensor | None  # (R, n), None when pi_old = pi (one step, mu = 1)
    ref_logprobs: torch.Tensor | None  # (R, n), None when beta = 0


@dataclass
class _Group:
    item: dict[str, Any]
    answers: list[list[int]]
    reward: torch.Tensor          # (G,)
    terms: dict[str, torch.Tensor]
    ended: list[bool]


class GroupRolloutEngine:
    """Samples, scores and lays out rollouts (everything above the update in the module docstring).

    policy: the model being trained; reference: its reference policy (None when beta = 0); rewards: the weighted
    reward of `lmcraft.align.rewards`."""

    def __init__(self, policy: nn.Module, reference: ReferencePolicy | None, rewards: Rewards, tokenizer: Any,
                 settings: GRPOSection, eos_token_ids: Sequence[int], pad_id: int) -> None:
        if settings.beta > 0 and reference is None:
            raise ValueError("beta > 0 needs a reference policy")
        self.policy, self.reference, self.rewards, self.tokenizer = policy, reference, rewards, tokenizer
        self.settings, self.eos, self.pad_id = settings, list(eos_token_ids), pad_id

    @property
    def keeps_old_logprobs(self) -> bool:
        s = self.settings
        return s.steps_per_rollout > 1 or (s.loss == "rloo" and s.beta > 0)

    def sample(self, items: Sequence[dict[str, Any]], seed: int) -> list[_Group]:
        """G completions for each item (one batched decode) and their rewards."""
        from lmcraft.generate import GenerationConfig, generate

        s, g = self.settings, self.settings.num_generations
        prompts = [list(item["ids"]) for item in items for _ in range(g)]
        config = GenerationConfig.from_settings(s, eos_token_ids=self.eos, pad_token_id=self.pad_id, seed=seed)
        answers = generate(self.policy, prompts, config).tokens
        ended = [bool(a) and a[-1] in self.eos for a in answers]
        texts = [self.tokenizer.decode(a[:-1] if e else a, skip_special_tokens=True) for a, e in zip(answers, ended,
                                                                                                  strict=True)]
        rows = [item for item in items for _ in range(g)]
        total, terms = self.rewards(rows, texts, [len(a) for a in answers])
        if s.overlong_buffer is not None:
            terms["overlong"] = overlong_penalty(torch.tensor([len(a) for a in answers]), s.max_new_tokens,
                                                 s.overlong_buffer, s.overlong_penalty)
            total = total + terms["overlong"]
        return [_Group(item, answers[i * g:(i + 1) * g], total[i * g:(i + 1) * g],
                       {k: v[i * g:(i + 1) * g] for k, v in terms.items()}, ended[i * g:(i + 1) * g])
                for i, item in enumerate(items)]

    def _logprobs(self, ids: torch.Tensor, mask: torch.Tensor, width: int
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(old-policy, reference) log-probs of the completions, each only where needed."""
        s = self.settings
        keep_old, keep_ref = self.keeps_old_logprobs, s.beta > 0
        if not (keep_old or keep_ref):
            return None, None

        def score(rows: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            old = answer_logprobs(self.policy, ids[rows], mask[rows], width, s.temperature)[0] if keep_old else None
            if not keep_ref:
                return old, None
            with self.reference.active(self.policy) as net:
                return old, answer_logprobs(net, ids[rows], mask[rows], width, s.temperature)[0]

        parts = scored_batches(self.policy, ids.shape[0], s.forward_batch_size, score)
        old, ref = ([p[k] for p in parts] for k in (0, 1))
        return (torch.cat(old) if keep_old else None), (torch.cat(ref) if keep_ref else None)

    def make(self, draw: Callable[[], list[dict[str, Any]]], seed_of: Callable[[int], int]) -> GroupRollout:
        """One rollout: prompt batches from `draw()` (one per round), round k sampled with seed `seed_of(k)`."""
        s = self.settings
        kept: list[_Group] = []
        dropped: list[_Group] = []
        rounds = s.max_sampling_rounds if s.dynamic_sampling else 1
        sampled = 0
        for k in range(rounds):
            for group in self.sample(draw(), seed_of(k)):
                sampled += 1
                flat = bool(degenerate_groups(group.reward, s.num_generations)[0])
                (dropped if s.dynamic_sampling and flat else kept).append(group)
            if len(kept) >= s.prompts_per_rollout:
                break
        used = k + 1
        groups = (kept + dropped)[:s.prompts_per_rollout]
        device = next(self.policy.parameters()).device
        prompt_ids = [list(gr.item["ids"]) for gr in groups for _ in range(s.num_generations)]
        answers = [a for gr in groups for a in gr.answers]
        ids, mask, _, answer_mask = (t.to(device) for t in layout(prompt_ids, answers, self.pad_id))
        width = ids.shape[1] - answer_mask.shape[1]
        old, ref = self._logprobs(ids, mask, width)
        rewards = torch.cat([gr.reward for gr in groups]).to(device)
        stats = {"reward": float(rewards.mean()), "sampling_rounds": float(used),
                 "groups_dropped": float(len(dropped)) / sampled if s.dynamic_sampling else 0.0,
                 "groups_flat": float(degenerate_groups(rewards, s.num_generations).float().mean()),
                 "reward_std": float(rewards.view(-1, s.num_generations).std(1).mean()),
                 "completion_length": float(answer_mask.sum(-1).mean()),
                 "ended": float(np.mean([e for gr in groups for e in gr.ended]))}
        for name in groups[0].terms:
            stats[f"reward/{name}"] = float(torch.cat([gr.terms[name] for gr in groups]).mean())
        if ref is not None:
            old_or_ref = old if old is not None else ref  # pi_old = pi at rollout time when old is not kept
            seq_kl = ((old_or_ref - ref) * answer_mask).sum(-1)
            stats["rollout_kl"] = float(masked_mean(k3_kl(old_or_ref, ref), answer_mask))
            if s.loss == "rloo":
                rewards = rewards - s.beta * seq_kl
        advantages = group_advantages(rewards, s.num_generations, s.loss, s.scale_eps)
        return GroupRollout(ids, mask, width, answer_mask, advantages.float(), old, ref, stats=stats)


class GRPOLoss:
    """The trainer's loss_fn on one micro-batch of a rollout (see lmcraft.align.grpo_loss for the aggregation)."""

    def __init__(self, settings: GRPOSection) -> None:
        self.settings = settings

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        from lmcraft.train import LossOutput

        s, mask, adv = self.settings, batch["answer_mask"], batch["advantages"]
        logp, entropy = answer_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_width"],
                                        s.temperature)
        old = batch.get("old_logprobs", logp.detach())
        if s.loss == "rloo":
            per, low, high = sequence_loss(logp, old, adv, mask, s.epsilon_low, s.eps_high)
        else:
            per, low, high = token_loss(logp, old, adv, s.epsilon_low, s.eps_high)
        metrics: dict[str, Any] = {}
        if s.beta > 0 and s.loss != "rloo":
            kl = k3_kl(logp, batch["ref_logprobs"])
            per = per + s.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        loss_sum, count = aggregate(per, mask, s.loss, s.max_new_tokens)
        with torch.no_grad():
            clip = (lambda x: x.float().mean()) if s.loss == "rloo" else (lambda x: masked_mean(x.float(), mask))
            metrics.update({"clip_ratio/low": clip(low), "clip_ratio/high": clip(high),
                            "entropy": masked_mean(entropy, mask),
                            "ratio": masked_mean(torch.exp(logp - old), mask)})
            metrics.update({k: torch.tensor(v) for k, v in batch["stats"].items()})
        return LossOutput(loss_sum, count, metrics, num_tokens=int(batch["attention_mask"].sum()))


class GroupRolloutLoader(OnDemandRollouts):
    """The trainer's data: micro-batches of minibatches over rollouts generated on demand.

    Prompt batches of `prompts_per_rollout` items come from the parent's seeded order over the prompts; `draws`
    counts the batches drawn so far (more than one per rollout with dynamic sampling). A rollout serves `mu` passes
    of shuffled rows cut into micro-batches (`minibatch_plan`). The state (rollout index, draws, rollout history) is
    saveable only at rollout boundaries."""

    method = "GRPO"

    def __init__(self, prompts: Sequence[dict[str, Any]], engine: GroupRolloutEngine, micro_batch_size: int,
                 seed: int = 0, shuffle: bool = True) -> None:
        s = engine.settings
        if s.minibatch_rows % micro_batch_size:
            raise LmcraftError(f"grpo minibatch rows ({s.minibatch_rows}) must be a multiple of micro_batch_size "
                               f"({micro_batch_size})")
        self.engine, self.micro_batch_size = engine, micro_batch_size
        super().__init__(prompts, s.prompts_per_rollout, seed, shuffle)
        self.draws = 0

    @property
    def micro_batches_per_rollout(self) -> int:
        return self.engine.settings.mu * self.engine.settings.rows // self.micro_batch_size

    def _draw(self) -> list[dict[str, Any]]:
        self.draws += 1
        return self.prompt_batch(self.draws - 1)

    def new_rollout(self) -> tuple[GroupRollout, list[list[int]]]:
        s = self.engine.settings
        plan = minibatch_plan(self.seed, self.rollout_index, s.mu, s.rows, self.micro_batch_size)
        return self.engine.make(self._draw, self.rollout_seed), plan

    def resume_keys(self) -> dict[str, Any]:
        s = self.engine.settings
        return {**super().resume_keys(), "rows": s.rows, "steps_per_rollout": s.steps_per_rollout}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.draws = int(state["draws"])


class PeakMemory(Callback):
    """Adds peak_memory_mb to every step's metrics: the high-water mark since training began (MiB; CUDA tensors, or
    the CPU process's resident set, as `lmcraft.finetune.profiling` measures it)."""

    def on_train_begin(self, trainer: Trainer) -> None:
        from lmcraft.finetune.profiling import reset_peak_memory

        reset_peak_memory(trainer.device)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        from lmcraft.finetune.profiling import peak_memory_mb

        value = peak_memory_mb(trainer.device)
        if value is not None:
            metrics["peak_memory_mb"] = value


def _series(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    return list(xs), list(ys)


class GRPO(AlignmentMethod):
    """GRPO in the run template: task prompts, rollouts scored by the rewards and served by `GroupRolloutLoader`,
    `GRPOLoss`; held-out accuracy before, every `eval_every` rollouts and after. Writes OUT/rollouts.jsonl."""

    name = "grpo"

    def __init__(self) -> None:
        self.loader: GroupRolloutLoader | None = None
        self.accuracy: HeldOutAccuracy | None = None
        self.rewards: Rewards | None = None

    def data(self, run: Run) -> tuple[list[dict[str, Any]], None]:
        from lmcraft.align.data_checks import check_prompts
        from lmcraft.align.instruct import ChatFormatter
        from lmcraft.align.rewards import Rewards, task_answer_spec, task_items
        from lmcraft.generate import stop_token_ids

        cfg, g = run.cfg, run.cfg.grpo
        train, held_out = task_items(cfg.task)
        if len(train) < g.prompts_per_rollout:
            raise ConfigError(f"task.size={len(train)} is below grpo.prompts_per_rollout={g.prompts_per_rollout}")
        formatter = ChatFormatter(run.start.tokenizer)
        for item in train:
            item["ids"] = formatter.prompt_ids(item["messages"])
        print(check_prompts([i["messages"] for i in train], formatter.render, [i["ids"] for i in train],
                            stop_token_ids(run.start.model, run.start.tokenizer), g.max_new_tokens,
                            run.start.model.config.max_position_embeddings), file=sys.stderr)
        self.rewards = Rewards(cfg.rewards, task_answer_spec(cfg.task))
        if held_out:
            self.accuracy = HeldOutAccuracy(held_out, self.rewards, run.start.tokenizer, g.max_new_tokens,
                                            g.forward_batch_size)
            run.start_score = self.accuracy.baseline(run.out, run.start.model)
        return train, None

    def total_steps(self, run: Run) -> int:
        return run.cfg.grpo.rollouts * run.cfg.grpo.steps_per_rollout

    def plan(self, run: Run) -> TrainPlan:
        from lmcraft.align.common import score_eval_callback
        from lmcraft.generate import stop_token_ids
        from lmcraft.peft.training import reference_policy

        cfg, g, tokenizer = run.cfg, run.cfg.grpo, run.start.tokenizer
        per_rollout = g.steps_per_rollout
        trainer_cfg = cfg.trainer.model_copy(update={
            "max_steps": self.total_steps(run), "grad_accum": g.minibatch_rows // cfg.trainer.micro_batch_size,
            "plot": False,  # curves.png is drawn by `summary` (the trainer's plot expects an eval loss)
            "save_every": None if g.save_every is None else g.save_every * per_rollout})
        policy = run.training.model
        reference = reference_policy(policy) if g.beta > 0 else None
        engine = GroupRolloutEngine(policy, reference, self.rewards, tokenizer, g, stop_token_ids(policy, tokenizer),
                                    tokenizer.pad_token_id or 0)
        self.loader = GroupRolloutLoader(run.train, engine, cfg.trainer.micro_batch_size, cfg.trainer.seed,
                                         cfg.trainer.shuffle)
        callbacks: list[Callback] = [PeakMemory()]
        if self.accuracy is not None:
            callbacks.append(score_eval_callback(self.accuracy, (g.eval_every or g.rollouts) * per_rollout, policy))
        return TrainPlan(GRPOLoss(g), self.loader, trainer_config=trainer_cfg, collate=False, callbacks=callbacks)

    def summary(self, run: Run) -> dict[str, Any]:
        from lmcraft.io import write_jsonl

        history, rollouts = run.trainer.state.history, self.loader.history
        write_jsonl(Path(run.out) / "rollouts.jsonl", rollouts)
        evals = [r for r in history if r["split"] == "eval"]
        peaks = [r["peak_memory_mb"] for r in history if "peak_memory_mb" in r]
        if run.cfg.trainer.plot and rollouts:
            self._plot(run, rollouts, history, evals)
        summary = {"prompts": len(run.train), "rollouts": len(rollouts), "loss_type": run.cfg.grpo.loss,
                   "first_rollout_reward": rollouts[0]["reward"] if rollouts else None,
                   "last_rollout_reward": rollouts[-1]["reward"] if rollouts else None,
                   "accuracy_before": run.start_score, "accuracy_after": evals[-1]["eval_score"] if evals else None,
                   "peak_memory_mb": max(peaks) if peaks else None}
        if self.accuracy is not None and evals:
            summary.update(self.accuracy.change())  # the last evaluation is the final one
        return summary

    def _plot(self, run: Run, rollouts: list[dict[str, float]], history: list[dict[str, Any]],
              evals: list[dict[str, Any]]) -> None:
        """OUT/curves.png: the rollouts' mean reward and each reward term, held-out accuracy, loss and entropy."""
        from lmcraft.align.plots import plot_metrics

        per_rollout = run.cfg.grpo.steps_per_rollout
        x = [r["rollout"] + 1 for r in rollouts]
        series = {name: _series(x, [r[name] for r in rollouts]) for name in rollouts[0]
                  if name == "reward" or name.startswith("reward/")}
        if evals:
            points = [(0.0, run.start_score)] if run.start_score is not None else []
            points += [(r["step"] / per_rollout, r["eval_score"]) for r in evals]
            series["held-out accuracy"] = _series(*zip(*points, strict=True))
        train = [r for r in history if r["split"] == "train"]
        for key in ("loss", "entropy"):
            series[key] = _series([r["step"] / per_rollout for r in train], [r[key] for r in train])
        plot_metrics(series, Path(run.out) / "curves.png", title=f"GRPO ({run.cfg.grpo.loss})", xlabel="rollout")
