"""The one training loop every stage reuses.

A stage supplies a model, a `loss_fn`, datasets and a `TrainerConfig`; the trainer owns the
optimizer, LR schedule, precision, gradient accumulation, data parallelism, evaluation, logging,
checkpoints and exact resume.

Loss contract. `loss_fn(model, batch) -> LossOutput(loss_sum, num_targets, metrics, num_tokens)`:
`loss_sum` is the SUM of the per-target losses of the micro-batch (e.g. cross-entropy summed over
non-ignored tokens) and `num_targets` how many targets it sums over. For one optimizer step over
a window of micro-batches `b` on all ranks `r`, the trainer minimises the global token mean

    L = sum_{r,b} loss_sum[r,b] / N,   N = sum_{r,b} num_targets[r,b]

so accumulating k micro-batches of size B equals one batch of k*B whatever the targets per
micro-batch, and W ranks equal one process with a W times larger batch. Mechanically each
micro-batch backpropagates its unscaled `loss_sum`; after the window, N is all-reduced and the
accumulated gradients are multiplied by 1/N (by W/N under DDP/FSDP, which average over ranks).
That is exactly dL/dθ = (sum of dloss_sum/dθ) / N without knowing N before the forward passes.
A loss_fn may instead return a tuple `(loss_mean, metrics)`: it then counts as one target, so
the step averages micro-batch means (use this only for losses that are not per-token sums).
`metrics` values are means over the micro-batch's targets; the trainer reports their
target-weighted mean over the window (and over ranks). `num_tokens` (default: num_targets) is
only used for the tokens/s figure.

Steps. One optimizer step = one window of `grad_accum` micro-batches per rank. The run lasts
`max_steps` steps, or `ceil(epochs * batches_per_epoch / grad_accum)` steps (the last window may
be short). A step whose loss or gradient norm is NaN/Inf is skipped (no update, gradients
dropped, the schedule still advances); `max_bad_steps` of them in a row raise
`NonFiniteLossError`.

Exact resume. Checkpoints hold weights, optimizer, scheduler, data position, RNG states (per
rank), counters and history; `train()` resumes from the newest `step-N` in `output_dir` and then
reproduces the uninterrupted run bit for bit on CPU (same weights, same logged losses).
"""

from __future__ import annotations

import errno
import logging
import math
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcraft import io
from lmcraft.errors import LmcraftError
from lmcraft.objectives.base import LossOutput  # the loss contract lives with the losses (a lower floor)
from lmcraft.precision import resolve_precision
from lmcraft.train import checkpoint as ckpt
from lmcraft.train.allocator import cap_mmap_threshold
from lmcraft.train.callbacks import Callback, CallbackList, ProgressBar
from lmcraft.train.compile import (
    AMORTISE,
    batch_shapes,
    compile_model,
    eager_forward,
    record_compile_seconds,
    recorded_compile_seconds,
    should_compile,
    training_compile_key,
)
from lmcraft.train.config import EarlyStopping, TrainerConfig
from lmcraft.train.distributed import (
    all_reduce_sum,
    barrier,
    full_model_state,
    full_optimizer_state,
    grad_sync,
    init_distributed,
    load_full_model_state,
    load_full_optimizer_state,
    wrap_model,
)
from lmcraft.train.frozen import frozen_dtype_for, frozen_linears_in
from lmcraft.train.loader import Collate, ResumableLoader, eval_batches
from lmcraft.train.metrics_log import CurvePlotter, JsonlLogger, TensorBoardLogger
from lmcraft.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups

__all__ = [
    "EarlyStopping",
    "TrainerConfig",
    "LossOutput",
    "LossFn",
    "TrainerState",
    "Trainer",
    "NonFiniteLossError",
    "set_seed",
    "move_to",
]

log = logging.getLogger("lmcraft.train")
_STEP_KEYS = ("loss", "lr", "grad_norm", "targets", "tokens", "skipped", "seconds", "tokens_per_s")  # per-step fields


LossFn = Callable[[nn.Module, Any], "LossOutput | tuple[torch.Tensor, dict[str, Any]]"]


def _as_loss_output(result: Any) -> LossOutput:
    if isinstance(result, LossOutput):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.Tensor):
        return LossOutput(result[0], 1, dict(result[1] or {}))
    raise TypeError(f"loss_fn must return LossOutput(loss_sum, num_targets, metrics) or (loss, metrics), "
                    f"got {type(result).__name__}")


class NonFiniteLossError(LmcraftError):
    """Training produced NaN/Inf losses or gradients for too many consecutive steps."""


@dataclass
class TrainerState:
    """Counters saved in `trainer_state/state.json` (everything the loop needs besides tensors)."""

    step: int = 0
    micro_batches: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    bad_steps: int = 0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    log_acc: dict[str, float] = field(default_factory=dict)
    precision: str | None = None  # the resolved fp32/bf16, kept by a resume
    compiled: str | None = None  # "static", "dynamic" or "eager" once decided (`_decide_compile`), kept by a resume
    compile_probe: list[str] = field(default_factory=list)  # the micro-batch shapes seen before that decision


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict/list/tuple to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class Trainer:
    """Train `model` by minimising the token-mean of `loss_fn` over `train_data`.

    train_data:   a map-style dataset (`len`, `[i]`) batched by `ResumableLoader` with
                  `collate_fn`, or a ready `ResumableLoader`
    eval_data:    a map-style dataset for `evaluate()` (loss, perplexity, loss_fn metrics)
    param_groups: `fn(model) -> groups` building optimizer groups after wrapping (FSDP swaps the
                  parameters), e.g. `lambda m: optim.param_groups(m, lr=1e-4, weight_decay=0.01, layer_lr_decay=0.8,
                  layer_of=...)`; default: decay/no-decay split at `config.lr`
    weights:      which tensors checkpoints hold (`WeightsFormat`; default all, model.safetensors)
    tokenizer_dir: folder whose tokenizer files are copied into every checkpoint
    eval_fn:      `fn(trainer) -> {name: value}` extra evaluation, reported as `eval_<name>`
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_data: Sequence[Any] | ResumableLoader,
        eval_data: Sequence[Any] | None = None,
        config: TrainerConfig | None = None,
        output_dir: str | Path = "runs/train",
        *,
        collate_fn: Collate | None = None,
        callbacks: Iterable[Callback] = (),
        param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
        weights: ckpt.WeightsFormat | None = None,
        tokenizer_dir: str | Path | None = None,
        eval_fn: Callable[[Trainer], dict[str, float]] | None = None,
    ) -> None:
        cfg = self.config = config or TrainerConfig()
        self.ctx = init_distributed(cfg.device)
        if self.ctx.device.type == "cpu":
            cap_mmap_threshold()  # freed activations go back to the system (train.allocator)
        self.output_dir = Path(output_dir)
        self.model = model
        apply_memory_switches(model, cfg.activation_checkpointing, cfg.chunked_loss)
        self.wrapped = wrap_model(model, cfg.strategy, self.ctx, cfg.find_unused_parameters)
        self.loss_fn, self.eval_data, self.collate_fn, self.eval_fn = loss_fn, eval_data, collate_fn, eval_fn
        self.weights = weights or ckpt.WeightsFormat()
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        if isinstance(train_data, ResumableLoader):
            if train_data.world_size != self.ctx.world_size or train_data.rank != self.ctx.rank:
                raise LmcraftError(f"the ResumableLoader was built for rank {train_data.rank}/{train_data.world_size} "
                                   f"but this process is rank {self.ctx.rank}/{self.ctx.world_size}")
            self.loader = train_data
        else:
            self.loader = ResumableLoader(train_data, cfg.micro_batch_size, collate_fn, seed=cfg.seed,
                                          shuffle=cfg.shuffle, rank=self.ctx.rank, world_size=self.ctx.world_size)
        self._window_shapes: list[tuple] = []  # the last optimizer step's micro-batch shapes (`batch_shapes`)
        groups = (param_groups or (lambda m: _default_groups(m, cfg)))(self.model)
        self.optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.warmup_steps, self.total_steps,
                                         cfg.min_lr_ratio, cfg.decay_fraction)
        builtin: list[Callback] = [JsonlLogger()]
        if cfg.progress:
            builtin.append(ProgressBar())
        if cfg.tensorboard:
            builtin.append(TensorBoardLogger())
        if cfg.plot:
            builtin.append(CurvePlotter())
        self.user_callbacks = CallbackList(callbacks)
        self.callbacks = CallbackList([*builtin, *self.user_callbacks.callbacks])
        self.state = TrainerState()
        self.should_stop = False
        self.memory_extras: list[tuple[str, int]] = []  # (what, bytes) a stage holds besides the model (memory plan)

    # ----------------------------------------------------------------------------------- properties
    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        return -(-cfg.epochs * len(self.loader) // cfg.grad_accum)

    def _window_size(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.grad_accum
        return min(cfg.grad_accum, cfg.epochs * len(self.loader) - self.state.micro_batches)

    @property
    def precision(self) -> str:
        """The resolved precision: from the checkpoint on a resume, else `resolve_precision` (logged once)."""
        if self.state.precision is None:
            choice = resolve_precision(self.config.precision, self.device)
            self.state.precision = choice.precision
            if self.is_main:
                log.info("precision %s (%s: %s)", choice.precision, self.config.precision, choice.reason)
        return self.state.precision

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """bf16 when the frozen linear weights are kept in bf16 during `train()` (`frozen_dtype`), else None: only
        when checkpoints hold the trained parameters alone, under bf16 autocast, on one process."""
        cfg = self.config
        return frozen_dtype_for(cfg.frozen_dtype, self.precision, cfg.strategy, self.weights.trainable_only)

    @contextmanager
    def _frozen_in_low_precision(self) -> Iterator[None]:
        """Keep the frozen linear weights in bf16 (train.frozen) and run the model's other uses during training
        (rollouts, eval_fn, callbacks) under autocast too; the steps' forward passes already are, and their backward
        passes and updates stay out of it (`_without_autocast`)."""
        dtype = self.frozen_dtype
        if dtype is None:
            yield
            return
        with frozen_linears_in(self.model, dtype) as saved, self._autocast():
            if self.is_main and saved:
                log.info("frozen linear weights kept in bf16 during training: %.2f GiB less", saved / 2**30)
            yield

    # ---------------------------------------------------------------------------------- main loop
    def train(self, resume_from: str | Path | None = "auto") -> dict[str, Any]:
        """Run (or resume) training; returns {"step", "best_metric", "best_step", "stopped", "checkpoint"}.

        resume_from: "auto" = the newest step-N in output_dir if any, a checkpoint folder, or None
        (start fresh even if checkpoints exist).
        """
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale(self.output_dir)
        barrier()
        path = None if resume_from is None else Path(resume_from)
        if resume_from == "auto":
            path = self._resume_newest_good()
        elif path is not None:
            self.load_checkpoint(path)
        if path is None:
            set_seed(self.config.seed + self.ctx.rank)
        elif self.state.step >= self.total_steps and self.is_main:
            log.warning("%s is at step %d, at or past the %d steps this run asks for: nothing left to train. Raise "
                        "max_steps to train on, or pass --overwrite to start afresh.", path, self.state.step,
                        self.total_steps)
        with self._frozen_in_low_precision():
            self.memory_plan()
            self.callbacks.on_train_begin(self)
            self._train_steps(path is not None)
        self.callbacks.on_train_end(self)
        return {"step": self.state.step, "best_metric": self.state.best_metric, "best_step": self.state.best_step,
                "stopped": self.state.stopped, "checkpoint": str(self.output_dir / f"step-{self.state.step}")}

    def _train_steps(self, resumed: bool) -> None:
        """Optimizer steps up to `total_steps` (or a stop), with the evaluations and checkpoints they are due."""
        last_saved = self.state.step if resumed else None
        st, compiling = self.state, self.config.compile is not False
        if compiling and st.compiled in ("static", "dynamic"):  # a resumed run goes on as it was compiled
            compile_model(self.model, True if st.compiled == "dynamic" else None)
        timing: tuple[float, list] | None = None  # (eager step seconds, record key) while a compile is to be timed
        while st.step < self.total_steps and st.stopped is None:
            if self.should_stop:
                st.stopped = "callback"
                break
            t0 = time.perf_counter()
            metrics = self._optimizer_step()
            seconds = time.perf_counter() - t0
            if timing is not None:  # the first compiled step: its excess over the eager one is the compile
                record_compile_seconds("train", timing[1], max(0.0, seconds - timing[0]))
                timing = None
            if compiling and st.compiled is None:
                st.compile_probe += [repr(shape) for shape in self._window_shapes]
                if len(st.compile_probe) >= 2 or st.step >= self.total_steps:
                    timing = self._decide_compile(seconds)
            self.callbacks.on_step_end(self, metrics)
            self._maybe_log(metrics)
            step, cfg = self.state.step, self.config
            at_end = step == self.total_steps
            if self.eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or at_end):
                self._evaluate_and_track()
            if self.should_stop and self.state.stopped is None:
                self.state.stopped = "callback"
            if (cfg.save_every and step % cfg.save_every == 0) or at_end or self.state.stopped:
                self.save_checkpoint()
                last_saved = step
        if last_saved != self.state.step:
            self.save_checkpoint()

    def memory_plan(self) -> None:
        """Print the planner's table (`train.plan`) for the largest batch of the data; with `memory_limit`, stop here
        (before step 0) when the predicted peak exceeds it. Then the pre-flight step (`preflight`)."""
        from lmcraft.hub.files import parse_size
        from lmcraft.train.plan import can_plan, largest_batch_shape, plan_memory

        cfg = self.config
        if not can_plan(self.model):
            return
        shape = largest_batch_shape(self.loader.dataset, self.loader.batch_size, self.loader.collate_fn)
        if shape is None:
            return
        with self._autocast():  # activations are measured as the steps will keep them
            plan = plan_memory(self.model, shape, cfg.activation_checkpointing, cfg.chunked_loss, cfg.optimizer,
                               self.memory_extras)
        limit = parse_size(cfg.memory_limit) if cfg.memory_limit else None
        if limit is not None and plan.peak > limit:
            raise LmcraftError(f"this run does not fit trainer.memory_limit={cfg.memory_limit}:\n{plan.table(limit)}")
        if self.is_main:
            print(plan.table(limit), file=sys.stderr)
        if cfg.preflight is True or (cfg.preflight == "auto" and (limit is not None or self.device.type != "cpu")):
            self._preflight(plan, limit)

    def _preflight(self, plan: Any, limit: int | None) -> None:
        """One forward + backward of the epoch's longest micro-batch, without an update: gradients are dropped and
        the RNG states restored, so the run's results and its data position are exactly those of a run without it.
        A batch that runs out of device memory, or a measured peak (plus the optimizer state, which the first update
        allocates) over `limit`, stops the run here, at step 0, with the plan."""
        from lmcraft.train.plan import longest_batch, reset_peak_resident, resident_bytes

        indices = longest_batch(self.loader.dataset, self.loader.batch_size)
        if indices is None:  # lengths unknown (fixed-length windows, rollouts made during training)
            return
        rng = ckpt.capture_rng_state()  # collating (MLM masks) and dropout draw from the global generators
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_resident()
        rows = f"{len(indices)} x {plan.batch_shape[1]} tokens"
        try:
            batch = move_to(self.loader.collate_fn([self.loader.dataset[i] for i in indices]), self.device)
            self.wrapped.train()
            with grad_sync(self.wrapped, False), self._autocast():
                out = _as_loss_output(self.loss_fn(self.wrapped, batch))
            with grad_sync(self.wrapped, False):
                out.loss_sum.backward()
            del batch, out
        except torch.OutOfMemoryError as err:
            raise LmcraftError(f"the longest batch ({rows}) does not fit in memory: it ran out at step 0, in the "
                               f"pre-flight step ({io.excerpt(str(err), 200)}):\n{plan.table(limit)}") from None
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.zero_grad(set_to_none=True)
            ckpt.restore_rng_state(rng)
        measured = (torch.cuda.max_memory_allocated(self.device) if cuda else resident_bytes("VmHWM:")) + plan.optimizer
        if self.is_main:
            print(f"pre-flight: the longest batch ({rows}) ran; measured peak {measured / 2**30:.2f} GiB with the "
                  f"optimizer state (planned {plan.peak / 2**30:.2f} GiB)", file=sys.stderr)
        if limit is not None and measured > limit:
            raise LmcraftError(f"this run does not fit trainer.memory_limit={self.config.memory_limit}: the pre-flight "
                               f"step on the longest batch ({rows}) measured {measured / 2**30:.2f} GiB with the "
                               f"optimizer state:\n{plan.table(limit)}")

    def _decide_compile(self, step_seconds: float) -> tuple[float, list] | None:
        """Once two eager micro-batches have run: compile (`compile: true`, or auto's rule in
        lmcraft.train.compile on the last step's time), with dynamic shapes where the micro-batches' shapes
        differed. The decision goes into the state, so a resumed run takes the same path at every step.
        Returns (the eager step's seconds, the record key) when the next step's time is to be recorded."""
        st, mode = self.state, self.config.compile
        dynamic = True if len(set(st.compile_probe)) > 1 else None
        key = training_compile_key(self.model, self.precision, [self.loader.batch_size], dynamic)
        expected, source = recorded_compile_seconds("train", key)
        left = self.total_steps - st.step
        shapes = " with dynamic shapes (batch shapes vary)" if dynamic else ""
        if not should_compile(mode, left, step_seconds, expected):
            log.info("compile auto: %d steps x %.2f s <= %d x %.0f s (%s): training eager", left, step_seconds,
                     AMORTISE, expected, source)
            st.compiled = "eager"
            return None
        if mode == "auto":
            log.info("compile auto: %d steps x %.2f s > %d x %.0f s (%s): compiling%s", left, step_seconds, AMORTISE,
                     expected, source, shapes)
        if not compile_model(self.model, dynamic):
            st.compiled = "eager"
            return None
        st.compiled = "dynamic" if dynamic else "static"
        return step_seconds, key

    def _optimizer_step(self) -> dict[str, float]:
        """One window of micro-batches -> one (or a skipped) optimizer update; returns the step's metrics."""
        cfg, t0 = self.config, time.perf_counter()
        self.callbacks.on_step_begin(self)
        window = [self.loader.next_batch() for _ in range(self._window_size())]
        self._window_shapes = [batch_shapes(batch) for batch in window]
        self.state.micro_batches += len(window)
        self.wrapped.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)  # targets, tokens
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(window):
            with grad_sync(self.wrapped, i == len(window) - 1):
                with self._autocast():
                    out = _as_loss_output(self.loss_fn(self.wrapped, move_to(batch, self.device)))
                with _without_autocast(self.device):  # also inside `_frozen_in_low_precision`'s autocast
                    out.loss_sum.backward()
            n = torch.as_tensor(out.num_targets, dtype=torch.float64, device=self.device)
            loss_sum += out.loss_sum.detach().to(torch.float64)
            counts[0] += n
            counts[1] += n if out.num_tokens is None else out.num_tokens
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + torch.as_tensor(v, device=self.device).detach().double() * n
        keys = sorted(metric_sums)
        totals = all_reduce_sum(torch.stack([loss_sum, counts[0], counts[1], *[metric_sums[k] for k in keys]]))
        total_loss, n_targets, n_tokens = (float(x) for x in totals[:3])
        scale = self.ctx.world_size / n_targets if n_targets > 0 else float("nan")  # DDP/FSDP average over ranks
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:
            p.grad.mul_(scale)
        with _without_autocast(self.device):
            grad_norm = _grad_norm(params, cfg.max_grad_norm)
        loss = total_loss / n_targets if n_targets > 0 else float("nan")
        lr = cfg.lr * lr_multiplier(cfg.schedule, self.state.step, cfg.warmup_steps, self.total_steps,
                                    cfg.min_lr_ratio, cfg.decay_fraction)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            with _without_autocast(self.device):
                self.optimizer.step()
            torch.clear_autocast_cache()  # bf16 copies of the old weights; kept while an outer autocast is open
            _check_finite_parameters(self.model, self.state.step + 1, lr)
            self.callbacks.on_optimizer_step(self, self.state.step)
            self.state.bad_steps = 0
        else:
            self.state.bad_steps += 1
            log.warning("step %d skipped: loss=%s grad_norm=%s targets=%d", self.state.step + 1, loss, grad_norm,
                        n_targets)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first update makes LambdaLR warn about the call order
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.state.step += 1
        if self.state.bad_steps >= cfg.max_bad_steps:
            last = ckpt.latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"training diverged: the loss or gradient norm was NaN/Inf (or a window had no targets) for "
                f"{self.state.bad_steps} optimizer steps in a row, up to step {self.state.step}. Lower trainer.lr, "
                f"add warmup_steps, set max_grad_norm, or check the data for batches without targets. "
                f"The last good checkpoint is {last or '(none)'}."
            )
        seconds = max(time.perf_counter() - t0, 1e-9)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "targets": n_targets, "tokens": n_tokens,
                   "skipped": float(not finite), "seconds": seconds, "tokens_per_s": n_tokens / seconds}
        metrics.update({k: float(v) / n_targets for k, v in zip(keys, totals[3:].tolist(), strict=True)})
        return metrics

    def _maybe_log(self, m: dict[str, float]) -> None:
        """Add the step to the current interval; every log_every steps emit its target-weighted means.

        Interval sums (saved in checkpoints): loss*targets, targets, tokens, seconds, skipped steps and
        metric*targets for each loss_fn metric (`m:<name>`); skipped steps add only to `skipped`.
        """
        acc = self.state.log_acc
        acc["skipped"] = acc.get("skipped", 0.0) + m["skipped"]
        if not m["skipped"]:
            n = m["targets"]
            add = {"loss": m["loss"] * n, "targets": n, "tokens": m["tokens"], "time": m["seconds"]}
            add.update({f"m:{k}": v * n for k, v in m.items() if k not in _STEP_KEYS})
            for k, v in add.items():
                acc[k] = acc.get(k, 0.0) + v
        step = self.state.step
        if step % self.config.log_every and step != self.total_steps:
            return
        n = acc.get("targets", 0.0)
        record: dict[str, Any] = {
            "split": "train", "step": step, "epoch": self.state.micro_batches / len(self.loader),
            "loss": acc["loss"] / n if n else float("nan"), "lr": m["lr"], "grad_norm": m["grad_norm"],
            "targets": n, "skipped": int(acc["skipped"]), "tokens_per_s": acc.get("tokens", 0.0) / acc.get("time", 1.0),
        }
        record.update({k[2:]: v / n for k, v in acc.items() if k.startswith("m:")})
        self.state.log_acc = {}
        self.state.history.append(record)
        self.callbacks.on_log(self, record)

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Token-mean loss of `loss_fn` over eval_data (all ranks), its perplexity and metrics.

        Returns {"eval_loss": L, "eval_ppl": exp(L), "eval_<metric>": target-weighted mean, ...}.
        """
        if self.eval_data is None:
            raise LmcraftError("evaluate() needs eval_data")
        cfg = self.config
        model = self.model  # the DDP wrapper is bypassed (no collectives); an FSDP module is itself
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = eval_batches(self.eval_data, cfg.eval_batch_size or cfg.micro_batch_size, self.collate_fn,
                               self.ctx.rank, self.ctx.world_size, max_batches or cfg.eval_max_batches)
        for batch, counts in batches:
            with self._autocast(), eager_forward(model):  # a no-grad graph would be a second compile (module doc)
                out = _as_loss_output(self.loss_fn(model, move_to(batch, self.device)))
            w = float(counts)
            n = torch.as_tensor(out.num_targets, dtype=torch.float64, device=self.device) * w
            loss_sum += torch.stack([out.loss_sum.detach().double() * w, n])
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=self.device).double() * n
        model.train(was_training)
        keys = sorted(sums)
        totals = all_reduce_sum(torch.cat([loss_sum, *[sums[k].reshape(1) for k in keys]])).tolist()
        n = totals[1]
        loss = totals[0] / n if n else float("nan")
        result = {"eval_loss": loss, "eval_ppl": math.exp(loss) if loss < 700 else float("inf")}
        result.update({f"eval_{k}": v / n for k, v in zip(keys, totals[2:], strict=True)})
        if self.eval_fn is not None:
            result.update({f"eval_{k}": float(v) for k, v in self.eval_fn(self).items()})
        return result

    def _evaluate_and_track(self) -> None:
        """Evaluate, log, update the best model (best/) and the early-stopping counter."""
        metrics = self.evaluate()
        st, es = self.state, self.config.early_stopping
        name, mode, delta = (es.metric, es.mode, es.min_delta) if es else ("eval_loss", "min", 0.0)
        if name not in metrics:
            raise LmcraftError(f"early_stopping.metric {name!r} is not among the evaluation results "
                               f"({', '.join(sorted(metrics))})")
        value = metrics[name]
        improved = st.best_metric is None or (value < st.best_metric - delta if mode == "min"
                                              else value > st.best_metric + delta)
        if improved:
            st.best_metric, st.best_step, st.bad_evals = value, st.step, 0
            if self.config.save_best:
                self._save_best(name, value)
        else:
            st.bad_evals += 1
            if es is not None and st.bad_evals >= es.patience:
                st.stopped = "early_stopping"
        record = {"split": "eval", "step": st.step, **metrics}
        st.history.append(record)
        self.callbacks.on_log(self, record)
        self.callbacks.on_eval(self, metrics)

    # -------------------------------------------------------------------------------- checkpoints
    def _save_best(self, metric: str, value: float) -> None:
        state = full_model_state(self.wrapped)
        if self.is_main:
            with io.staged_dir(self.output_dir / "best") as tmp:
                ckpt.save_model_files(tmp, self.model, state, self.weights, self.tokenizer_dir)
                io.write_json(tmp / "best.json", {"step": self.state.step, "metric": metric, "value": value})
        barrier()

    def save_checkpoint(self) -> Path:
        """Write `output_dir/step-N` atomically (all ranks must call it); returns its path."""
        step, out = self.state.step, self.output_dir
        final = out / f"step-{step}"
        tmp = out / f"{io.TMP_PREFIX}{final.name}"  # one name every rank knows; the newest run cleans it up
        model_state = full_model_state(self.wrapped)
        optim_state = full_optimizer_state(self.wrapped, self.optimizer)
        if self.is_main:
            try:
                ckpt.save_model_files(tmp, self.model, model_state, self.weights, self.tokenizer_dir)
                (tmp / "trainer_state").mkdir()
                ckpt.save_torch(optim_state, tmp / "trainer_state" / "optimizer.pt")
                ckpt.save_torch(self.scheduler.state_dict(), tmp / "trainer_state" / "scheduler.pt")
                ckpt.save_torch(self.user_callbacks.state_dict(), tmp / "trainer_state" / "callbacks.pt")
                meta = {"state": asdict(self.state), "loader": self.loader.state_dict(),
                        "world_size": self.ctx.world_size, "config": self.config.model_dump(mode="json")}
                io.write_json(tmp / "trainer_state" / "state.json", meta, indent=1)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                io.remove_dir(tmp)
                need = ckpt.state_bytes(model_state) + ckpt.state_bytes(optim_state)
                raise LmcraftError(
                    f"the disk is full: checkpoint {final.name} needs about {need / 2**20:,.0f} MiB in {out} and "
                    f"{shutil.disk_usage(out).free / 2**20:,.0f} MiB are free. The previous checkpoint "
                    f"({ckpt.latest_checkpoint(out) or 'none'}) is intact: free space and rerun to resume."
                ) from None
        barrier()
        ckpt.save_torch(ckpt.capture_rng_state(), tmp / "trainer_state" / f"rng_rank{self.ctx.rank}.pt")
        barrier()
        if self.is_main:
            io.replace_dir(tmp, final)
            io.write_text(out / "latest", final.name + "\n")
            ckpt.prune_checkpoints(out, self.config.keep_last)
        barrier()
        self.callbacks.on_save(self, final)
        return final

    def _resume_newest_good(self) -> Path | None:
        """Load the newest checkpoint in output_dir that reads back whole; a corrupt or unreadable newer one is
        skipped with a warning. Returns the loaded folder (None when there is none); all are bad: an error."""
        reasons = []
        for _, path in reversed(ckpt.step_dirs(self.output_dir)):
            try:
                self.load_checkpoint(path)
                return path
            except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
                reasons.append(f"{path.name}: {type(err).__name__}: {io.excerpt(str(err), 200)}")
                log.warning("checkpoint %s cannot be read (%s); trying the previous one", path, reasons[-1])
        if reasons:
            raise LmcraftError(f"no checkpoint in {self.output_dir} can be read ({'; '.join(reasons)}); "
                               "pass --overwrite to start afresh")
        return None

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, data position, counters and RNG from `path`."""
        state_dir = path / "trainer_state"
        if not (state_dir / "state.json").is_file():
            raise LmcraftError(f"{path} is not a trainer checkpoint: {state_dir / 'state.json'} is missing")
        meta = io.read_json(state_dir / "state.json", "checkpoint state")
        if meta["world_size"] != self.ctx.world_size:
            raise LmcraftError(f"checkpoint {path} was written by {meta['world_size']} processes but this run has "
                               f"{self.ctx.world_size}; exact resume needs the same number of processes")
        load_full_model_state(self.wrapped, ckpt.load_weights(path, self.weights), strict=self.weights.strict)
        load_full_optimizer_state(self.wrapped, self.optimizer, ckpt.load_torch(state_dir / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(state_dir / "scheduler.pt"))
        self.loader.load_state_dict(meta["loader"])
        self.state = TrainerState(**meta["state"])
        callbacks = state_dir / "callbacks.pt"
        self.user_callbacks.load_state_dict(ckpt.load_torch(callbacks) if callbacks.is_file() else meta["callbacks"])
        ckpt.restore_rng_state(ckpt.load_torch(state_dir / f"rng_rank{self.ctx.rank}.pt"))
        if self.is_main:
            log.info("resumed from %s (step %d)", path, self.state.step)


def apply_memory_switches(model: nn.Module, checkpointing: str, chunked_loss: bool | str) -> None:
    """Set `activation_checkpointing` on every backbone and `chunked_loss` on every language model inside `model`
    (through PEFT wrappers); the loss functions and the block loop read them."""
    from lmcraft.models.model import Backbone, LanguageModel

    for module in model.modules():
        if isinstance(module, Backbone):
            module.set_checkpointing(checkpointing)  # type: ignore[arg-type]
        elif isinstance(module, LanguageModel):
            module.chunked_loss = chunked_loss


def _without_autocast(device: torch.device) -> torch.autocast:
    """Gradients and updates in the run's own precision: autocast covers the forward passes only."""
    return torch.autocast(device.type, enabled=False)


def _check_finite_parameters(model: nn.Module, step: int, lr: float) -> None:
    """Stop before a non-finite weight can be saved: one fused norm per parameter list, NaN/Inf propagate."""
    params = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in model.parameters() if p.requires_grad]
    if params and not torch.isfinite(torch.stack(torch._foreach_norm(params))).all():
        raise NonFiniteLossError(
            f"training diverged: after optimizer step {step} (lr {lr:.3g}) some weights are NaN/Inf, so nothing "
            "of this step is saved. Lower trainer.lr, add warmup_steps or set max_grad_norm."
        )


def _default_groups(model: nn.Module, cfg: TrainerConfig) -> list[dict[str, Any]]:
    return param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (after clipping them to `max_norm` when set)."""
    if not params:
        return 0.0
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)

