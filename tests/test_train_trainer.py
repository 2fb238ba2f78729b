"""Trainer loop in one process: token-normalised accumulation, NaN guard, evaluation, best model,
early stopping, checkpoints, in-process resume, bf16 autocast, config validation and log files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist_train_script import VOCAB, TinyLM, clm_loss, make_data
from lmcraft.config import validate_config
from lmcraft.errors import ConfigError, LmcraftError
from lmcraft.train import Callback, LossOutput, NonFiniteLossError, Trainer, TrainerConfig, WeightsFormat, set_seed

QUIET = {"progress": False, "tensorboard": False, "plot": False, "device": "cpu"}


def _cfg(**kw: Any) -> TrainerConfig:
    return TrainerConfig(**{**QUIET, **kw})


def _model(dropout: float = 0.0) -> TinyLM:
    set_seed(0)
    return TinyLM(dropout)


def _grads_per_step(trainer: Trainer) -> list[list[torch.Tensor]]:
    """Snapshot of the (scaled, clipped) gradients right before each optimizer update."""
    seen: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.clone() for p in trainer.model.parameters()]))
    return seen


def test_accumulation_normalises_by_targets_not_micro_batches(tmp_path: Path) -> None:
    data = make_data(8)  # 8 examples with different numbers of targets: one global batch
    grads = {}
    for mb, accum in ((8, 1), (2, 4), (1, 8)):
        t = Trainer(_model(), clm_loss, data, config=_cfg(max_steps=1, micro_batch_size=mb, grad_accum=accum,
                                                          shuffle=False, max_grad_norm=None),
                    output_dir=tmp_path / f"{mb}")
        seen = _grads_per_step(t)
        t.train()
        grads[mb] = seen[0]
    # reference: d/dθ of sum of token losses over all 8 examples / number of targets
    ref = _model()
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    out = clm_loss(ref, batch)
    mean = out.loss_sum / out.num_targets
    mean.backward()
    for mb in (8, 2, 1):
        for g, p in zip(grads[mb], ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    record = json.loads((tmp_path / "1" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss"] == pytest.approx(mean.item(), rel=1e-6)
    assert record["targets"] == int(out.num_targets)


def test_nan_steps_are_skipped_then_fail(tmp_path: Path) -> None:
    bad_steps = {2}

    def flaky(model: torch.nn.Module, batch: dict) -> LossOutput:
        out = clm_loss(model, batch)
        return LossOutput(out.loss_sum * (math.nan if trainer.state.step + 1 in bad_steps else 1.0), out.num_targets)

    before: list[torch.Tensor] = []
    trainer = Trainer(_model(), flaky, make_data(), config=_cfg(max_steps=3, log_every=1),
                      output_dir=tmp_path / "a", callbacks=[_Snapshot(before)])
    trainer.train()
    assert torch.equal(before[0], before[1]) and not torch.equal(before[1], before[2])  # step 2 left weights as is
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 1, 0] and math.isnan(records[1]["loss"])

    bad_steps = {1, 2, 3, 4}
    trainer = Trainer(_model(), flaky, make_data(), config=_cfg(max_steps=6, max_bad_steps=3),
                      output_dir=tmp_path / "b")
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row, up to step 3"):
        trainer.train()


class _Snapshot(Callback):
    def __init__(self, into: list[torch.Tensor]) -> None:
        self.into = into

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.into.append(trainer.model.head.weight.detach().clone())


def test_evaluate_reports_token_mean_loss_and_perplexity(tmp_path: Path) -> None:
    data = make_data(10)

    def with_acc(model: torch.nn.Module, batch: dict) -> LossOutput:
        out = clm_loss(model, batch)
        mask = batch["labels"] != -100
        acc = (model(batch["input_ids"]).argmax(-1) == batch["labels"])[mask].float().mean()
        return LossOutput(out.loss_sum, out.num_targets, {"acc": acc})

    trainer = Trainer(_model(), with_acc, data, data, _cfg(max_steps=1, micro_batch_size=3, eval_batch_size=3),
                      tmp_path)
    result = trainer.evaluate()
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(torch.stack([d["input_ids"] for d in data]))
        labels = torch.stack([d["labels"] for d in data])
        ref = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
        ref_acc = (logits.argmax(-1) == labels)[labels != -100].float().mean()
    assert result["eval_loss"] == pytest.approx(float(ref), rel=1e-6)
    assert result["eval_ppl"] == pytest.approx(math.exp(float(ref)), rel=1e-6)
    assert result["eval_acc"] == pytest.approx(float(ref_acc), rel=1e-6)
    assert trainer.evaluate(max_batches=1)["eval_loss"] != result["eval_loss"]


def test_early_stopping_and_best_model(tmp_path: Path) -> None:
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])  # best at the 2nd eval, then two evals without improvement

    class Probe(Callback):
        weights: dict[int, torch.Tensor] = {}

        def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            self.weights[trainer.state.step] = trainer.model.head.weight.detach().clone()

    cfg = _cfg(max_steps=20, eval_every=2, eval_max_batches=1, early_stopping={"metric": "eval_score", "mode": "max",
                                                                               "patience": 2})
    trainer = Trainer(_model(), clm_loss, make_data(), make_data(8), cfg, tmp_path, callbacks=[Probe()],
                      eval_fn=lambda t: {"score": next(scores)})
    result = trainer.train()
    assert result == {"step": 8, "best_metric": 0.7, "best_step": 4, "stopped": "early_stopping",
                      "checkpoint": str(tmp_path / "step-8")}
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"step": 4, "metric": "eval_score",
                                                                         "value": 0.7}
    assert torch.equal(load_file(tmp_path / "best" / "model.safetensors")["head.weight"], Probe.weights[4])
    assert Trainer(_model(), clm_loss, make_data(), make_data(8), cfg, tmp_path).train()["step"] == 8  # stays done


def test_checkpoints_keep_last_and_resume_in_process(tmp_path: Path) -> None:
    cfg = _cfg(max_steps=6, save_every=2, keep_last=2, grad_accum=2, log_every=1)
    full = Trainer(_model(dropout=0.2), clm_loss, make_data(), config=cfg, output_dir=tmp_path / "full")
    full.train()
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == ["latest", "metrics.jsonl", "step-4", "step-6"]
    assert (tmp_path / "full" / "latest").read_text() == "step-6\n"
    assert sorted(p.name for p in (tmp_path / "full" / "step-4" / "trainer_state").iterdir()) == [
        "callbacks.pt", "optimizer.pt", "rng_rank0.pt", "scheduler.pt", "state.json"]

    resumed = Trainer(_model(dropout=0.2), clm_loss, make_data(), config=cfg, output_dir=tmp_path / "resumed")
    resumed.train(resume_from=tmp_path / "full" / "step-4")
    a, b = (load_file(tmp_path / d / "step-6" / "model.safetensors") for d in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("full", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_trainable_only_checkpoints_resume_onto_the_frozen_base(tmp_path: Path) -> None:
    def frozen_base() -> TinyLM:
        model = _model()
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model

    adapter = WeightsFormat("adapter_model.safetensors", trainable_only=True)
    cfg = _cfg(max_steps=4, save_every=2)
    Trainer(frozen_base(), clm_loss, make_data(), config=cfg, output_dir=tmp_path / "a", weights=adapter).train()
    saved = load_file(tmp_path / "a" / "step-4" / "adapter_model.safetensors")
    assert sorted(saved) == ["head.bias", "head.weight"]
    t = Trainer(frozen_base(), clm_loss, make_data(), config=cfg, output_dir=tmp_path / "b", weights=adapter)
    t.train(resume_from=tmp_path / "a" / "step-2")
    assert torch.equal(load_file(tmp_path / "b" / "step-4" / "adapter_model.safetensors")["head.weight"],
                       saved["head.weight"])


def test_epochs_mode_counts_steps_and_short_last_window(tmp_path: Path) -> None:
    data = make_data(20)  # 5 micro-batches of 4 per epoch; 2 epochs = 10 micro-batches = 3 windows of 4, 4, 2
    trainer = Trainer(_model(), clm_loss, data, config=_cfg(epochs=2, micro_batch_size=4, grad_accum=4),
                      output_dir=tmp_path)
    assert trainer.total_steps == 3
    trainer.train()
    assert trainer.state.micro_batches == 10 and trainer.loader.epoch == 1 and trainer.loader.batch_index == 5


def test_bf16_autocast_and_mean_style_loss(tmp_path: Path) -> None:
    dtypes = []

    def mean_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["input_ids"])
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), batch["labels"].reshape(-1)), {}

    result = Trainer(_model(), mean_loss, make_data(), config=_cfg(max_steps=2, precision="bf16", log_every=1),
                     output_dir=tmp_path).train()
    assert result["step"] == 2 and set(dtypes) == {torch.bfloat16}
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["targets"] for r in records] == [1, 1] and all(math.isfinite(r["loss"]) for r in records)


def test_logs_tensorboard_and_curves(tmp_path: Path) -> None:
    cfg = TrainerConfig(max_steps=4, eval_every=2, log_every=2, device="cpu", progress=True)
    Trainer(_model(), clm_loss, make_data(), make_data(8), cfg, tmp_path).train()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    assert {"loss", "lr", "grad_norm", "epoch", "tokens_per_s"} <= set(records[0])
    assert {"eval_loss", "eval_ppl"} <= set(records[1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


class _Counter(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.count += 1
        trainer.should_stop = self.count == 3

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


def test_callbacks_can_stop_and_their_state_is_checkpointed(tmp_path: Path) -> None:
    result = Trainer(_model(), clm_loss, make_data(), config=_cfg(max_steps=10), output_dir=tmp_path,
                     callbacks=[_Counter()]).train()
    assert result["step"] == 3 and result["stopped"] == "callback"
    restored = _Counter()
    Trainer(_model(), clm_loss, make_data(), config=_cfg(max_steps=10), output_dir=tmp_path,
            callbacks=[restored]).train()
    assert restored.count == 3


@pytest.mark.parametrize(
    ("override", "needle"),
    [({"lr": 0}, "lr"), ({"betas": [0.9, 1.0]}, "beta"), ({"device": "gpu"}, "device"),
     ({"early_stopping": {"patience": 2}}, "eval_every"), ({"schedule": "step"}, "schedule"), ({"lrr": 1}, "lr")],
)
def test_config_validation(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        validate_config(TrainerConfig, override)


def test_on_optimizer_step_sees_gradients(tmp_path) -> None:
    """AdaLoRA-style callbacks run after the update while gradients still exist, once per step."""
    from lmcraft.train.callbacks import Callback

    seen: list[tuple[int, bool]] = []

    class Probe(Callback):
        def on_optimizer_step(self, trainer, step):  # noqa: ANN001, ANN201
            seen.append((step, all(p.grad is not None for p in trainer.model.parameters())))

    model = torch.nn.Linear(4, 1)
    data = [{"x": torch.randn(4), "y": torch.randn(1)} for _ in range(8)]

    def loss_fn(m, batch):  # noqa: ANN001, ANN202
        return ((m(batch["x"]) - batch["y"]) ** 2).mean(), {}

    cfg = TrainerConfig(max_steps=3, micro_batch_size=4, progress=False, tensorboard=False, plot=False)
    Trainer(model, loss_fn, data, config=cfg, output_dir=tmp_path, callbacks=[Probe()]).train()
    assert seen == [(0, True), (1, True), (2, True)]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog) -> None:
    cfg = _cfg(max_steps=6, save_every=2, keep_last=3, log_every=1)
    Trainer(_model(), clm_loss, make_data(), config=cfg, output_dir=tmp_path / "full").train()
    run = tmp_path / "run"
    Trainer(_model(), clm_loss, make_data(), config=cfg, output_dir=run).train()
    shutil.rmtree(run / "step-6")  # as if killed after step 4 was saved ...
    (run / "step-4" / "model.safetensors").write_bytes(b"\0garbage")  # ... and step 4 then broke on disk
    with caplog.at_level("WARNING", logger="lmcraft.train"):
        Trainer(_model(), clm_loss, make_data(), config=cfg, output_dir=run).train()
    assert "step-4 cannot be read" in caplog.text
    a, b = (load_file(tmp_path / d / "step-6" / "model.safetensors") for d in ("full", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    for step in (2, 4, 6):
        (run / f"step-{step}" / "trainer_state" / "state.json").write_text("{")
    with pytest.raises(LmcraftError, match="no checkpoint in .* can be read"):
        Trainer(_model(), clm_loss, make_data(), config=cfg, output_dir=run).train()


def test_non_finite_weights_stop_the_run_before_any_save(tmp_path: Path) -> None:
    trainer = Trainer(_model(), clm_loss, make_data(), config=_cfg(max_steps=3, save_every=1),
                      output_dir=tmp_path / "run")
    trainer.optimizer.param_groups[0]["lr"] = math.inf  # what a schedule of an infinite lr would do
    trainer.scheduler.base_lrs = [math.inf for _ in trainer.scheduler.base_lrs]
    with pytest.raises(NonFiniteLossError, match="after optimizer step 1 .* NaN/Inf"):
        trainer.train()
    assert not list((tmp_path / "run").glob("step-*"))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_is_needed(tmp_path: Path, monkeypatch) -> None:
    import errno

    from lmcraft.train import checkpoint

    trainer = Trainer(_model(), clm_loss, make_data(), config=_cfg(max_steps=4, save_every=2),
                      output_dir=tmp_path / "run")
    save = checkpoint.save_torch

    def full_at_step_4(obj, path: Path) -> None:  # noqa: ANN001
        if path.parent.parent.name.endswith("step-4"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(obj, path)

    monkeypatch.setattr(checkpoint, "save_torch", full_at_step_4)
    with pytest.raises(LmcraftError, match=r"the disk is full: checkpoint step-4 needs about [\d,]+ MiB .* previous "
                                           r"checkpoint \(.*step-2\) is intact"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(("step-", ".lmcraft"))) == [
        "step-2"]
