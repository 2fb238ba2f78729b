"""The preference stage: preference pairs (or KTO's labelled answers), a loss of `lmcraft.align.preference_losses`
(DPO, IPO, hinge, robust; SimPO, CPO, ORPO without a reference; KTO), and the reference policy where the loss has one.

Answer log-probabilities log pi(y|x) are summed over the answer tokens through the LM head in chunks
(`objectives.lm_head.model_sequence_logprobs`: no batch x length x vocabulary tensor). The reference log-probs are
either computed once before training (`reference: precompute`; cached in the run folder) or in every step; the
reference is the model with its adapters disabled for PEFT runs (no second copy), else a frozen copy of the start
model (`lmcraft.peft.training.reference_policy`). The reference-free losses (simpo, cpo, orpo) never build or run a
reference. KTO runs it in every step: its reference point z comes from mismatched pairs (x_i, y_{i-1}) of the
micro-batch, which `UnpairedData.collate` appends as extra rows (scored without gradient).

Metrics per pair: reward accuracy [r_c > r_r], margin r_c - r_r, and the mean implicit rewards; for KTO the signed
margin s = +-(r - beta z) (+ for desirable answers), its accuracy [s > 0], and z (`kl`). The held-out pairs are
evaluated once before step 1 too (OUT/start_eval.json; summary.json's start_eval_*): for the reference-free losses
this is the start model's own ranking [avg pi(y_c|x) > avg pi(y_r|x)] (or of summed log-probs for cpo); for the
reference-based losses every implicit reward is 0 at the start.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.align.held_out import HeldOutAccuracy, task_accuracy
from lmcraft.align.instruct import ChatFormatter, Tokenized, Truncation, truncate
from lmcraft.align.preference_losses import (
    REFERENCE_FREE,
    cpo_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    simpo_loss,
)
from lmcraft.align.reward import PairData, TokenizedPair, collate_pairs, load_pairs
from lmcraft.align.run import AlignmentMethod, Run, TrainPlan
from lmcraft.io import read_json, write_json
from lmcraft.objectives.lm_head import model_sequence_logprobs, scored_batches

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.align.config import DPOSection, PairsData
    from lmcraft.align.data import LabelledAnswer
    from lmcraft.peft.training import ReferencePolicy
    from lmcraft.stages.dpo import DPOConfig
    from lmcraft.train import LossOutput, Trainer

__all__ = ["DPO", "DPOLoss", "PairRewardAccuracy", "UnpairedData", "WithReference", "answer_pairs",
           "build_unpaired_data", "dpo_loss", "load_unpaired", "mismatched", "precompute_reference", "reference_logps"]


def _logps(model: nn.Module, batch: dict[str, Any], rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer log-probs, answer token counts) of the rows `rows` of `batch` under `model`."""
    return model_sequence_logprobs(model, batch["labels"][rows], input_ids=batch["input_ids"][rows],
                                   attention_mask=batch["attention_mask"][rows])


def reference_logps(reference: ReferencePolicy, policy: nn.Module, batch: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer log-probs, answer token counts) per row of `batch` under the reference policy."""
    with reference.active(policy) as net:
        return _logps(net, batch)


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


def mismatched(prompt_of: Tokenized, answer_of: Tokenized, max_length: int) -> Tokenized:
    """The prompt tokens of `prompt_of` followed by the answer tokens of `answer_of` (trained as there), cut to
    `max_length` from the prompt's left: a KTO reference-point row."""
    p, q = prompt_of.prompt_length(), answer_of.prompt_length()
    ids = prompt_of.input_ids[:p] + answer_of.input_ids[q:]
    trained = [False] * p + answer_of.trained[q:]
    row = truncate(Tokenized(ids, trained, "", [(0, 0)] * len(ids), prompt_of.source), max_length, "right",
                   keep_answer=True)
    assert row is not None  # the answer keeps its trained tokens
    return row


@dataclass
class UnpairedData:
    """Tokenized labelled answers (KTO): items are (example, desirable). A batch of B items holds 2B rows: the B
    examples, then the B mismatched rows (prompt i, answer i - 1, the first taking the last's answer; a batch of one,
    e.g. the last held-out batch, pairs the example with itself); `desirable` (B,) bool."""

    items: list[tuple[Tokenized, bool]]
    pad_id: int
    max_length: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tokenized, bool]:
        return self.items[i]

    def collate(self, batch: list[tuple[Tokenized, bool]]) -> dict[str, torch.Tensor]:
        import torch

        from lmcraft.align.instruct import collate_padded

        examples = [ex for ex, _ in batch]
        kl = [mismatched(examples[i], examples[i - 1], self.max_length) for i in range(len(examples))]
        out = collate_padded(examples + kl, self.pad_id)
        out["desirable"] = torch.tensor([label for _, label in batch], dtype=torch.bool)
        out["num_tokens"] = int(out["attention_mask"][:len(batch)].sum())
        return out


def answer_pairs(data: UnpairedData) -> list[tuple[int, int]]:
    """(desirable, undesirable) item indices of each record that gave one of each: a preference pair read as KTO's
    labelled answers (`align.data`), in item order; empty for unpaired data such as kto_en_demo."""
    by_record: dict[str, dict[bool, int]] = {}
    for i, (example, desirable) in enumerate(data.items):
        by_record.setdefault(example.source, {})[desirable] = i
    return [(two[True], two[False]) for two in by_record.values() if len(two) == 2]


class PairRewardAccuracy:
    """KTO trained on preference pairs, scored on held-out pairs: the share of pairs whose chosen answer's implicit
    reward r = log pi(y|x) - log ref(y|x) beats the rejected one's, a tie counting one half (at the start every
    reward is 0, so every pair ties: 0.5). The reference log-probs are computed on the first call, in the same
    batches as the policy's, so a policy equal to its reference ties exactly. `counts` holds the last call's
    (wins, ties, losses) of the chosen answers."""

    def __init__(self, data: UnpairedData, pairs: Sequence[tuple[int, int]], reference: ReferencePolicy,
                 batch_size: int) -> None:
        self.data, self.pairs, self.reference, self.batch_size = data, list(pairs), reference, batch_size
        self.ref: list[float] | None = None
        self.counts = (0, len(self.pairs), 0)

    def _logps(self, model: nn.Module, net: nn.Module) -> list[float]:
        """Answer log-probs of every held-out item under `net` (`model` or its reference), no-grad in eval mode."""
        from lmcraft.align.instruct import collate_padded
        from lmcraft.train.trainer import move_to

        device = next(model.parameters()).device

        def rows(part: slice) -> list[float]:
            batch = collate_padded([ex for ex, _ in self.data.items[part]], self.data.pad_id)
            return _logps(net, move_to(batch, device))[0].tolist()

        return [v for part in scored_batches(model, len(self.data), self.batch_size, rows) for v in part]

    def __call__(self, model: nn.Module) -> float:
        if self.ref is None:
            with self.reference.active(model) as net:
                self.ref = self._logps(model, net)
        r = [p - q for p, q in zip(self._logps(model, model), self.ref, strict=True)]
        wins, losses = sum(r[c] > r[u] for c, u in self.pairs), sum(r[c] < r[u] for c, u in self.pairs)
        self.counts = (wins, len(self.pairs) - wins - losses, losses)
        return (wins + self.counts[1] / 2) / len(self.pairs)

    def summary(self) -> dict[str, Any]:
        """The last call's wins / ties / losses, the Wilson interval of the win rate and the exact two-sided sign
        test of wins against losses (ties dropped): is the preference better than chance?"""
        from lmcraft.evaluate import wilson_interval
        from lmcraft.metrics import mcnemar_exact

        wins, ties, losses = self.counts
        return {"eval_pairs": len(self.pairs), "pair_wins": wins, "pair_ties": ties, "pair_losses": losses,
                "pair_win_interval": list(wilson_interval(wins, len(self.pairs))),
                "pair_sign_test_p": mcnemar_exact(losses, wins)}


def build_unpaired_data(answers: Sequence[LabelledAnswer], formatter: ChatFormatter, max_length: int,
                        truncation: Truncation = "right") -> UnpairedData:
    """Render prompt + answer of every labelled answer (prompt cut from the left when too long); the whole sequences
    are checked first (`align.data_checks`)."""
    from lmcraft.align.data_checks import check_chat_examples
    from lmcraft.align.instruct import collate_padded

    whole = [formatter.tokenize_pair(a.prompt, a.answer, a.source) for a in answers]
    items, dropped = [], 0
    for a, full in zip(answers, whole, strict=True):
        ex = truncate(full, max_length, truncation, keep_answer=True)
        if ex is None:
            dropped += 1
        else:
            items.append((ex, a.desirable))
    pad = formatter.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    checks = check_chat_examples([[*a.prompt, *a.answer] for a in answers], whole, formatter.tokenizer.eos_token_ids,
                                 lambda exs: collate_padded(exs, pad))
    print(checks.line(), file=sys.stderr)
    return UnpairedData(items, pad, max_length, dropped)


def load_unpaired(data: PairsData, formatter: ChatFormatter) -> tuple[UnpairedData, UnpairedData | None]:
    """(train, held-out or None) labelled answers of a `data` section (`dpo.loss: kto`)."""
    from lmcraft.align.config import split_eval
    from lmcraft.align.data import load_labelled_answers
    from lmcraft.errors import ConfigError

    if data.format != "auto":
        raise ConfigError(f"dpo.loss: kto reads labelled answers, whose layout is found from each record's keys; "
                          f"remove data.format ({data.format!r})")
    if data.task is not None:
        from lmcraft.align.task_pairs import as_labelled_answers, task_preferences

        answers, evals = map(as_labelled_answers, task_preferences(data.task, data.seed))
    else:
        answers = load_labelled_answers(data.train, data.limit)
        evals = load_labelled_answers(data.eval) if data.eval else []
        if not evals:  # whole records held out: both answers of a preference pair stay on one side
            records: dict[str, list[LabelledAnswer]] = {}
            for answer in answers:
                records.setdefault(answer.source, []).append(answer)
            kept, held = split_eval(list(records.values()), data.val_size, data.seed)
            answers, evals = [a for r in kept for a in r], [a for r in held for a in r]
    train = build_unpaired_data(answers, formatter, data.max_length, data.truncation)
    evaluation = build_unpaired_data(evals, formatter, data.max_length, data.truncation) if evals else None
    return train, evaluation


class DPOLoss:
    """The trainer's loss_fn: the summed loss `settings.loss` over the pairs (or KTO examples) of a micro-batch.

    `reference` is the reference policy, needed unless the loss is reference-free or the batches carry precomputed
    `ref_chosen` / `ref_rejected` (see the module docstring)."""

    def __init__(self, settings: DPOSection, reference: ReferencePolicy | None = None) -> None:
        self.settings, self.reference = settings, reference

    def _reference(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        import torch

        if "ref_chosen" in batch:
            return torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
        if self.reference is None:
            raise ValueError(f"loss {self.settings.loss!r} needs a ReferencePolicy, or batches with precomputed "
                             "ref_chosen / ref_rejected")
        return reference_logps(self.reference, model, batch)[0]

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        from lmcraft.train import LossOutput

        if self.settings.loss == "kto":
            return self._kto(model, batch)
        s = self.settings
        logps, counts = _logps(model, batch)
        b = logps.shape[0] // 2
        avg = logps / counts
        if s.loss == "simpo":
            losses, r_c, r_r = simpo_loss(avg[:b], avg[b:], s.beta, s.gamma)
        elif s.loss == "cpo":
            losses, r_c, r_r = cpo_loss(logps[:b], logps[b:], counts[:b], s.beta, s.nll_weight)
        elif s.loss == "orpo":
            losses, r_c, r_r = orpo_loss(avg[:b], avg[b:], s.beta)
        else:
            ref = self._reference(model, batch).to(logps)
            pol = avg if s.loss == "ipo" else logps
            ref = ref / counts if s.loss == "ipo" else ref
            losses, r_c, r_r = dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], s.beta, s.loss, s.label_smoothing)
        metrics = {"reward_accuracy": (r_c > r_r).float().mean(), "reward_margin": (r_c - r_r).mean(),
                   "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                   "logp_chosen": logps[:b].detach().mean(), "logp_rejected": logps[b:].detach().mean()}
        return LossOutput(losses.sum(), b, metrics, num_tokens=batch.get("num_tokens"))

    def _kto(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        import torch

        from lmcraft.train import LossOutput

        s, desirable = self.settings, batch["desirable"]
        b = desirable.shape[0]
        logps, _ = _logps(model, batch, slice(0, b))
        with torch.no_grad():
            kl_logps, _ = _logps(model, batch, slice(b, None))
        ref = self._reference(model, batch).to(logps)
        z = kto_reference_point(kl_logps, ref[b:])
        losses, rewards = kto_loss(logps, ref[:b], desirable, z, s.beta, s.desirable_weight, s.undesirable_weight)
        signed = torch.where(desirable, rewards - s.beta * z, s.beta * z - rewards)
        metrics = {"reward_accuracy": (signed > 0).float().mean(), "reward_margin": signed.mean(), "kl": z,
                   "logp": logps.detach().mean()}
        return LossOutput(losses.sum(), b, metrics, num_tokens=batch.get("num_tokens"))


class DPO(AlignmentMethod):
    """The preference stage in the run template: pairs (or labelled answers for KTO), the reference policy where the
    loss has one (log-probs precomputed once, or in each step), `DPOLoss`, the held-out score as an evaluation;
    OUT/dpo_curves.png and the held-out numbers."""

    name = "dpo"

    def __init__(self, settings: DPOSection) -> None:
        self.settings = settings
        self.pairs: PairRewardAccuracy | None = None  # KTO on pair files: the held-out pairs' scorer

    @classmethod
    def from_config(cls, cfg: DPOConfig) -> DPO:
        return cls(cfg.dpo)

    def data(self, run: Run) -> tuple[PairData | UnpairedData, PairData | UnpairedData | None]:
        formatter = ChatFormatter(run.start.tokenizer, train_on="last")
        task = run.cfg.data.task
        if task is not None and task.eval_size:  # pairs from a task: held-out accuracy before, at each eval, after
            from lmcraft.errors import ConfigError

            if run.cfg.score_eval is not None:
                raise ConfigError("with data.task the evaluation score is the task's held-out accuracy; remove "
                                  "score_eval")
            t = run.cfg.trainer
            run.scorer = task_accuracy(task, run.start.tokenizer, t.eval_batch_size or 16)
            run.start_score = run.scorer.baseline(run.out, run.start.model)
        if self.settings.loss == "kto":
            return load_unpaired(run.cfg.data, formatter)
        return load_pairs(run.cfg.data, formatter)

    def plan(self, run: Run) -> TrainPlan:
        from lmcraft.errors import ConfigError
        from lmcraft.peft.training import reference_policy

        d, t, model = self.settings, run.cfg.trainer, run.training.model
        if d.loss == "kto" and t.micro_batch_size < 2:
            raise ConfigError("dpo.loss: kto estimates its reference point from mismatched pairs of a micro-batch; "
                              "set trainer.micro_batch_size to 2 or more")
        reference = None if d.loss in REFERENCE_FREE else reference_policy(model)
        train, evaluation = run.train, run.evaluation
        if reference is not None and d.loss != "kto" and d.reference == "precompute":
            import torch

            from lmcraft.precision import resolve_precision

            batch = t.eval_batch_size or t.micro_batch_size
            device = next(model.parameters()).device  # in the training's precision, so a start policy ties with it
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=resolve_precision(t.precision, device).precision == "bf16"):
                train = WithReference(train, precompute_reference(model, reference, train, batch,
                                                                  run.out / "reference_train.json", t.progress))
                if evaluation is not None:
                    evaluation = WithReference(evaluation, precompute_reference(
                        model, reference, evaluation, batch, run.out / "reference_eval.json", t.progress))
            reference = None  # the copy (if any) is no longer needed
        scorer = run.scorer
        eval_fn = None
        if scorer is not None:  # the start model's score is run.start_score (computed before the adapters)
            def eval_fn(trainer: Trainer) -> dict[str, float]:
                return {"score": run.start_score if trainer.state.step == 0 else scorer(trainer.model)}
        elif d.loss == "kto" and isinstance(evaluation, UnpairedData):
            held_out_pairs = answer_pairs(evaluation)
            if held_out_pairs:
                self.pairs = pairs = PairRewardAccuracy(evaluation, held_out_pairs, reference,
                                                        t.eval_batch_size or t.micro_batch_size)

                def eval_fn(trainer: Trainer) -> dict[str, float]:
                    return {"pair_reward_accuracy": pairs(trainer.model)}
        return TrainPlan(DPOLoss(d, reference), train, evaluation, eval_fn=eval_fn, start_evaluation=True)

    def summary(self, run: Run) -> dict[str, Any]:
        from lmcraft.align.plots import plot_dpo

        history = run.trainer.state.history
        if run.cfg.trainer.plot:
            plot_dpo(history, run.start_score, run.out / "dpo_curves.png", run.start_eval,
                     "DPO" if self.settings.loss == "sigmoid" else self.settings.loss.upper())
        evals = [r for r in history if r["split"] == "eval"]
        last = evals[-1] if evals else {}
        count = "examples" if self.settings.loss == "kto" else "pairs"
        start = run.start_eval
        summary = {"loss": self.settings.loss, count: len(run.train), "start_score": run.start_score,
                   "eval_score": last.get("eval_score"), "eval_reward_accuracy": last.get("eval_reward_accuracy"),
                   "eval_loss": last.get("eval_loss"), "eval_count": len(run.evaluation or ()),
                   "start_eval_reward_accuracy": start.get("eval_reward_accuracy"),
                   "start_eval_loss": start.get("eval_loss")}
        if self.pairs is not None and "eval_pair_reward_accuracy" in last:
            summary.update({"eval_pair_reward_accuracy": last["eval_pair_reward_accuracy"],
                            "start_eval_pair_reward_accuracy": start.get("eval_pair_reward_accuracy"),
                            **self.pairs.summary()})
        change = run.scorer.change() if isinstance(run.scorer, HeldOutAccuracy) else {}
        if change:
            summary.update({"accuracy_before": run.start_score, "accuracy_after": last.get("eval_score"), **change})
        return summary
