"""A tiny training run for the subprocess tests (exact resume after SIGKILL, torchrun DDP/FSDP).

    python tests/dist_train_script.py OUT [--steps N] [--micro-batch B] [--grad-accum G] [--strategy S]
        [--dropout P] [--kill-after-step K] [--kill-while-saving K] [--save-every S]

Writes checkpoints and metrics.jsonl (one train record per step) under OUT.
--kill-after-step K:   SIGKILL this process right after optimizer step K (before its checkpoint)
--kill-while-saving K: SIGKILL this process while step-K's checkpoint is half written
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.train import Callback, LossOutput, Trainer, TrainerConfig, WeightsFormat, set_seed
from lmcraft.train.distributed import shutdown_distributed

VOCAB, SEQ = 32, 12


class TinyLM(nn.Module):
    """Embedding -> residual MLP blocks (in a ModuleList, so FSDP shards each) -> norm -> head."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        for layer in self.layers:
            h = h + self.drop(layer(h))
        return self.head(self.norm(h))


def make_data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    """Sequences whose number of target tokens varies (labels -100 past a random length)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = torch.roll(ids, -1).clone()
        labels[int(torch.randint(2, SEQ + 1, (1,), generator=g)) :] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def clm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return LossOutput(loss, (labels != -100).sum())


class KillAfterStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileSaving(WeightsFormat):
    """Writes the weights, then dies before the checkpoint folder is complete."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def write_extra(self, model: nn.Module, directory: Path) -> None:
        if directory.name == f".lmcraft-tmp-step-{self.step}":
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--strategy", default="none")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--kill-after-step", type=int)
    p.add_argument("--kill-while-saving", type=int)
    a = p.parse_args(argv)
    set_seed(0)
    model = TinyLM(a.dropout)
    data = make_data()
    cfg = TrainerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, max_steps=a.steps, micro_batch_size=a.micro_batch,
                        grad_accum=a.grad_accum, save_every=a.save_every, eval_every=4, log_every=1, keep_last=2,
                        strategy=a.strategy, progress=False, tensorboard=False, plot=False, device="cpu")
    callbacks = [KillAfterStep(a.kill_after_step)] if a.kill_after_step else []
    weights = KillWhileSaving(a.kill_while_saving) if a.kill_while_saving else None
    Trainer(model, clm_loss, data, data[:20], cfg, a.out, callbacks=callbacks, weights=weights).train()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
