"""Knowledge distillation in the alignment run template: a student trained on a frozen teacher's token distributions.

Data + loss (the run template does the rest: PEFT or full fine-tuning of the student, checkpoints, exact resume):

    data      chat records (SFT's rendering and assistant-token masks, `align.sft`) or plain text (`format: text`,
              records of `data/records.py`: every token trained, documents cut into windows of max_length tokens)
    teacher   `teacher.from` (same tokenizer as the student: vocabularies are compared), frozen, eval mode, no grad;
              or its top-k logits from `distill.teacher_cache` (a pre-pass, `TeacherCache`), then no teacher is loaded
    on-policy with probability lambda = `on_policy.fraction` per micro-batch (GKD), the student samples completions
              of the batch's prompts (the one decode loop, `generate`); the teacher scores them; the loss is on them
    loss      `align.distill_loss` (forward/reverse KL, generalised JSD, temperature, alpha * CE), computed in chunks
              over the labelled positions; held-out evaluation is the student's plain CE on the labelled tokens, so
              eval_loss / eval_ppl are its perplexity whatever the KD loss (`alpha: 1` is the same run without teacher)

`distill.student_layers: N` makes the student the start model cut to its first N blocks (embeddings, final norm and
head kept; the DistilBERT initialisation).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lmcraft.align.distill_loss import DistillLoss, TeacherRows, chunked_distillation_loss
from lmcraft.align.instruct import Tokenized, collate_padded
from lmcraft.align.run import AlignmentMethod, Run, TrainPlan
from lmcraft.data.collate import IGNORE_INDEX
from lmcraft.errors import ConfigError
from lmcraft.objectives.lm_head import default_rows, scored_batches, scoring

if TYPE_CHECKING:
    from lmcraft.generate import GenerationConfig
    from lmcraft.tokenizer.load import Tokenizer
    from lmcraft.train import LossOutput

__all__ = ["Distillation", "DistillData", "DistillLossFn", "TeacherCache", "check_same_vocabulary",
           "keep_first_layers", "text_examples"]


def keep_first_layers(model: nn.Module, n: int) -> nn.Module:
    """`model` with only its first `n` blocks (in place; its config says n layers, so it saves and reloads so)."""
    cfg, backbone = model.config, model.model
    if not 0 < n <= cfg.num_layers:
        raise ConfigError(f"distill.student_layers={n}: the start model has {cfg.num_layers} layers")
    backbone.layers = nn.ModuleList(list(backbone.layers)[:n])
    cfg.num_layers = n
    cfg.layer_types = None if cfg.layer_types is None else tuple(cfg.layer_types[:n])
    cfg.nope_layers = tuple(i for i in cfg.nope_layers if i < n)
    return model


def check_same_vocabulary(student: Tokenizer, teacher: Tokenizer, student_vocab: int, teacher_vocab: int) -> None:
    """Distillation compares distributions over the same token ids: the tokenizers' token -> id maps and the models'
    output sizes must be equal."""
    if student_vocab != teacher_vocab:
        raise ConfigError(f"the student's LM head has {student_vocab} outputs, the teacher's {teacher_vocab}: "
                          "distillation needs one vocabulary (a teacher and student sharing a tokenizer)")
    a, b = student.backend.get_vocab(), teacher.backend.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:5]
        raise ConfigError(f"the student's and the teacher's tokenizers differ ({len(a)} vs {len(b)} tokens; e.g. "
                          f"{diff}): token-level distillation needs the same tokenizer")


def text_examples(texts: list[tuple[str, str]], tokenizer: Tokenizer, max_length: int) -> list[Tokenized]:
    """Plain-text documents (source, text) tokenized, EOS appended, cut into windows of `max_length` tokens, every
    token trained (causal LM on the text)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for source, text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False) + eos
        for lo in range(0, len(ids) - 1, max_length):
            part = ids[lo:lo + max_length]
            if len(part) > 1:
                out.append(Tokenized(part, [True] * len(part), text, [(0, 0)] * len(part), f"{source}, token {lo}"))
    return out


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """The mask of labelled next-token positions: hidden state t predicts labels[:, t + 1]."""
    return labels[:, 1:] != IGNORE_INDEX


class TeacherCache:
    """The teacher's top-k logits (fp16) and vocabulary indices (int32) at every labelled position of the training
    examples, in example order (`offsets`), in DIR/teacher_topk.npz with DIR/teacher_topk.json (what they were
    computed from: teacher, k and a hash of the examples; a different one is recomputed)."""

    def __init__(self, values: np.ndarray, indices: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.indices, self.offsets = values, indices, offsets

    @staticmethod
    def fingerprint(teacher: str, k: int, examples: list[Tokenized]) -> str:
        h = hashlib.sha256(f"{teacher}|{k}".encode())
        for ex in examples:
            h.update(np.asarray(ex.labels, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> TeacherCache | None:
        from lmcraft.io import read_json

        meta = folder / "teacher_topk.json"
        if not meta.is_file() or read_json(meta).get("fingerprint") != fingerprint:
            return None
        with np.load(folder / "teacher_topk.npz") as data:
            return cls(data["values"], data["indices"], data["offsets"])

    @classmethod
    def build(cls, teacher: nn.Module, examples: list[Tokenized], k: int, pad_id: int, batch_size: int) -> TeacherCache:
        """One no-grad pass of the teacher over the examples; top-k (k at most V) through the LM head in chunks of
        positions."""
        rows, k = default_rows(teacher.config.vocab_size), min(k, teacher.config.vocab_size)

        def score(part: slice) -> list[tuple[torch.Tensor, torch.Tensor]]:
            batch = collate_padded(examples[part], pad_id)
            hidden = teacher(batch["input_ids"], attention_mask=batch["attention_mask"],
                             logits_to_keep=1).hidden_states[:, :-1][_targets(batch["labels"])]
            return [teacher.head(hidden[lo:lo + rows]).float().topk(k, -1) for lo in range(0, hidden.shape[0], rows)]

        parts = [p for chunk in scored_batches(teacher, len(examples), batch_size, score) for p in chunk]
        counts = [sum(ex.trained[1:]) for ex in examples]
        return cls(torch.cat([v for v, _ in parts]).half().numpy(), torch.cat([i for _, i in parts]).int().numpy(),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def save(self, folder: Path, fingerprint: str, teacher: str, k: int) -> None:
        from lmcraft.io import save_npz, write_json

        folder.mkdir(parents=True, exist_ok=True)
        save_npz(folder / "teacher_topk.npz", {"values": self.values, "indices": self.indices, "offsets": self.offsets})
        write_json(folder / "teacher_topk.json", {"fingerprint": fingerprint, "teacher": teacher, "top_k": k,
                                                  "positions": int(self.offsets[-1])})

    def rows(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self.values[lo:hi], self.indices[lo:hi]


@dataclass
class DistillData:
    """Examples (right-padded batches) and, when the teacher is cached, its top-k rows for each batch."""

    examples: list[Tokenized]
    pad_id: int
    cache: TeacherCache | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, batch: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = collate_padded([self.examples[i] for i in batch], self.pad_id)
        out["num_tokens"] = int(out["attention_mask"].sum())
        if self.cache is not None:
            values, indices = zip(*(self.cache.rows(i) for i in batch), strict=True)
            out["teacher_values"] = torch.from_numpy(np.concatenate(values))
            out["teacher_indices"] = torch.from_numpy(np.concatenate(indices))
        return out


class DistillLossFn:
    """loss_fn(student, batch) -> LossOutput: the distillation loss in training, the plain CE in evaluation."""

    def __init__(self, spec: DistillLoss, teacher: nn.Module | None, on_policy: float = 0.0,
                 generation: GenerationConfig | None = None) -> None:
        self.spec, self.teacher, self.on_policy, self.generation = spec, teacher, on_policy, generation

    def sample(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's prompts (tokens before the first labelled one) with completions sampled from the student."""
        from dataclasses import replace

        from lmcraft.align.ppo import layout
        from lmcraft.generate import generate

        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
        prompts = [row[m][: int((lab[m] != IGNORE_INDEX).int().argmax())].tolist()
                   for row, lab, m in zip(ids, labels, mask, strict=True)]
        seed = int(torch.randint(2**31 - 1, ()))  # from the trainer's RNG stream: a resumed run draws the same
        with scoring(model) as net:
            answers = generate(net, prompts, replace(self.generation, seed=seed)).tokens
        new_ids, new_mask, _, answer_mask = layout(prompts, [a or [self.generation.pad_token_id] for a in answers],
                                                   self.generation.pad_token_id)
        width = new_ids.shape[1] - answer_mask.shape[1]
        new_labels = torch.full_like(new_ids, IGNORE_INDEX)
        new_labels[:, width:] = torch.where(answer_mask.bool(), new_ids[:, width:], IGNORE_INDEX)
        return {"input_ids": new_ids.to(ids.device), "attention_mask": new_mask.to(ids.device),
                "labels": new_labels.to(ids.device), "num_tokens": int(new_mask.sum())}

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        from lmcraft.train import LossOutput

        training = model.training
        if training and self.on_policy > 0 and float(torch.rand(())) < self.on_policy:
            batch = self.sample(getattr(model, "module", model), batch)
        inner = getattr(model, "module", model)
        head = getattr(inner, "base_model", inner).head
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        keep = _targets(batch["labels"])
        hidden = model(ids, attention_mask=mask, logits_to_keep=1).hidden_states[:, :-1][keep]
        targets = batch["labels"][:, 1:][keep]
        teacher = None
        if training and self.spec.alpha < 1:
            if "teacher_values" in batch:
                teacher = TeacherRows(values=batch["teacher_values"], indices=batch["teacher_indices"])
            else:
                self.teacher.to(hidden.device)
                with torch.no_grad():
                    th = self.teacher(ids, attention_mask=mask, logits_to_keep=1).hidden_states[:, :-1][keep]
                teacher = TeacherRows(hidden=th, head=self.teacher.head)
        total = chunked_distillation_loss(hidden, head, targets, teacher, self.spec, default_rows(head.weight.shape[0]))
        n = int(keep.sum())
        metrics = {"ce": total[1] / max(n, 1)} | ({"kd": total[2] / max(n, 1)} if teacher is not None else {})
        return LossOutput(total[0], n, metrics, num_tokens=batch.get("num_tokens"))


class Distillation(AlignmentMethod):
    """Distillation in the run template (see the module docstring)."""

    name = "distill"

    def data(self, run: Run) -> tuple[DistillData, DistillData | None]:
        from lmcraft.align.config import split_eval
        from lmcraft.align.instruct import ChatFormatter
        from lmcraft.align.sft import build_sft_data, load_sft_conversations
        from lmcraft.data.records import read_records

        cfg, tok = run.cfg, run.start.tokenizer
        if cfg.distill.student_layers is not None:
            keep_first_layers(run.start.model, cfg.distill.student_layers)
        d = cfg.data
        pad = 0 if tok.pad_token_id is None else tok.pad_token_id
        if d.format == "text":
            docs = [(r.source, str(r.fields.get(d.text_field) or "")) for p in d.train for r in read_records(p)]
            docs = docs[: d.limit] if d.limit else docs
            held = [(r.source, str(r.fields.get(d.text_field) or "")) for p in d.eval for r in read_records(p)]
            if not held:
                docs, held = split_eval(docs, d.val_size, d.seed)
            train, evals = (text_examples(x, tok, d.max_length) for x in (docs, held))
        else:
            convs, held_convs = load_sft_conversations(d)
            formatter = ChatFormatter(tok, train_on=d.train_on)
            train = build_sft_data(convs, formatter, d.max_length, d.truncation).examples
            evals = build_sft_data(held_convs, formatter, d.max_length, d.truncation).examples if held_convs else []
        if not train:
            raise ConfigError(f"data.train {d.train}: no example with a trained token")
        return DistillData(train, pad), (DistillData(evals, pad) if evals else None)

    def _teacher(self, run: Run) -> nn.Module:
        from lmcraft.align.modeling import load_start_model
        from lmcraft.tokenizer.load import load_tokenizer

        source = run.cfg.teacher
        teacher, folder = load_start_model(source.from_, dtype=source.dtype)
        check_same_vocabulary(run.start.tokenizer, load_tokenizer(folder),
                              run.start.model.config.vocab_size, teacher.config.vocab_size)
        return teacher.eval().requires_grad_(False)

    def plan(self, run: Run) -> TrainPlan:
        s = run.cfg.distill
        spec = DistillLoss(s.loss, s.beta, s.temperature, s.alpha)
        teacher = None
        if s.alpha < 1 and s.teacher_cache is not None:
            teacher_id = f"{run.cfg.teacher.from_}|{run.cfg.teacher.dtype}"
            key = TeacherCache.fingerprint(teacher_id, s.top_k, run.train.examples)
            cache = TeacherCache.load(Path(s.teacher_cache), key)
            if cache is None:
                print(f"distill: caching the teacher's top-{s.top_k} logits in {s.teacher_cache}", file=sys.stderr)
                cache = TeacherCache.build(self._teacher(run), run.train.examples, s.top_k, run.train.pad_id,
                                           run.cfg.trainer.micro_batch_size)
                cache.save(Path(s.teacher_cache), key, run.cfg.teacher.from_, s.top_k)
            run.train.cache = cache
        elif s.alpha < 1:
            teacher = self._teacher(run)
        generation = None
        if s.on_policy.fraction > 0:
            from lmcraft.generate import GenerationConfig

            tok = run.start.tokenizer
            generation = GenerationConfig.from_settings(s.on_policy, eos_token_ids=tok.eos_token_ids,
                                                        pad_token_id=run.train.pad_id)
        return TrainPlan(DistillLossFn(spec, teacher, s.on_policy.fraction, generation), run.train, run.evaluation,
                         start_evaluation=True)

    def summary(self, run: Run) -> dict[str, Any]:
        history = run.trainer.state.history
        evals = [(r["step"], r["eval_ppl"]) for r in history if r["split"] == "eval" and "eval_ppl" in r]
        return {"train_examples": len(run.train), "start_eval_ppl": run.start_eval.get("eval_ppl"),
                "eval_ppl": evals[-1][1] if evals else None, "eval_ppl_by_step": evals}
