"""torch.compile readiness: a tiny llama forward traces as one graph (no data-dependent graph break in RoPE)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmcraft.models.rope import RotaryEmbedding


@pytest.mark.slow
def test_tiny_llama_forward_has_no_graph_breaks(tiny_model: Callable[..., torch.nn.Module]) -> None:
    model = tiny_model().eval()
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reserve(model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    padded = torch.ones(2, 8, dtype=torch.long)
    padded[1, 6:] = 0  # a padded batch (preference and SFT batches): no data-dependent branch on the mask either
    for mask in (None, padded):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids, attention_mask=mask)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_generation_runs_a_training_compiled_model_eager(tiny_model: Callable[..., torch.nn.Module]) -> None:
    """Samples drawn inside a compiled training run decode through the model's own forward (a compiled training
    forward would recompile for every new length), and the compiled forward is back afterwards."""
    from lmcraft.generate import GenerationConfig, generate

    model = tiny_model().eval()
    model.compile()
    compiled = model._compiled_call_impl
    calls = []
    model._compiled_call_impl = lambda *a, **k: calls.append(1) or compiled(*a, **k)
    counting = model._compiled_call_impl
    out = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=3))
    assert len(out.tokens[0]) == 3 and calls == []
    assert model._compiled_call_impl is counting


def test_evaluation_runs_a_training_compiled_model_eager(tiny_model: Callable[..., torch.nn.Module],
                                                         tmp_path) -> None:  # noqa: ANN001
    """The trainer's evaluation of a compiled model goes through the model's own forward (a no-grad graph would be
    a second compile), and the compiled training forward is back afterwards."""
    from dist_train_script import make_data
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train import Trainer, TrainerConfig

    model = tiny_model(vocab_size=32)
    calls = []
    model._compiled_call_impl = lambda *a, **k: calls.append(1)  # stands in for nn.Module.compile's forward
    counting = model._compiled_call_impl
    objective = CausalLM()

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]):  # noqa: ANN202 - a LossOutput
        return objective.loss(m, objective.transform({"input_ids": batch["input_ids"]}))

    cfg = TrainerConfig(max_steps=1, micro_batch_size=4, progress=False, tensorboard=False, plot=False, device="cpu")
    trainer = Trainer(model, loss, make_data(8), make_data(8), config=cfg, output_dir=tmp_path / "run")
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and calls == []
    assert model._compiled_call_impl is counting


def test_auto_rule_amortises() -> None:
    from lmcraft.train.compile import AMORTISE, TYPICAL_COMPILE_S, should_compile

    assert should_compile(True, 1, 0.0) and not should_compile(False, 10**9, 10.0)
    assert not should_compile("auto", 100, 0.05)  # a short run stays eager
    assert should_compile("auto", int(AMORTISE * TYPICAL_COMPILE_S) + 1, 1.0)


@pytest.mark.slow
def test_compiled_loss_equals_eager(tiny_model: Callable[..., torch.nn.Module], tmp_path, monkeypatch) -> None:
    import torch.nn.functional as F

    from lmcraft.train.compile import compile_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    eager, compiled = tiny_model(), tiny_model()
    ids = torch.randint(0, eager.config.vocab_size, (2, 8))

    def loss(model: torch.nn.Module) -> torch.Tensor:
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    assert compile_model(compiled)
    ref, got = loss(eager), loss(compiled)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got, ref)
    ref.backward()
    got.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


@pytest.mark.slow
def test_compiled_run_resumes_exactly(tiny_model: Callable[..., torch.nn.Module], tmp_path, monkeypatch) -> None:
    """`compile: true` on the clm objective's chunked loss: a run resumed from its step-2 checkpoint ends with the
    same weights and per-step losses, bit for bit, as the uninterrupted compiled run."""
    import json

    from safetensors.torch import load_file

    from dist_train_script import make_data
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train import Trainer, TrainerConfig

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    objective = CausalLM()

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):  # noqa: ANN202 - a LossOutput
        return objective.loss(model, objective.transform({"input_ids": batch["input_ids"]}))

    cfg = TrainerConfig(max_steps=4, save_every=2, micro_batch_size=4, compile=True, progress=False,
                        tensorboard=False, plot=False, device="cpu", log_every=1)
    for name, resume in (("full", None), ("resumed", tmp_path / "full" / "step-2")):
        Trainer(tiny_model(vocab_size=32), loss, make_data(16), config=cfg,
                output_dir=tmp_path / name).train(resume_from=resume)
    a, b = (load_file(tmp_path / d / "step-4" / "model.safetensors") for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)] for d in ("full", "resumed")]
    assert len(losses[0]) == 4 and losses[0][2:] == losses[1][-2:]


@pytest.mark.parametrize(("recorded", "varying"), [(0.0, False), (1e9, False), (0.0, True)],
                         ids=["cheap", "dear", "cheap-varying-shapes"])
def test_auto_uses_and_records_the_measured_compile_time(tiny_model: Callable[..., torch.nn.Module], tmp_path,
                                                         monkeypatch: pytest.MonkeyPatch, recorded: float,
                                                         varying: bool) -> None:
    """`compile: auto` decides from this machine's recorded compile time of the model (a dear one keeps the run
    eager, a cheap one compiles), then records what the compile cost: the first compiled step's excess over the
    eager step. Micro-batches of varying shapes compile with dynamic shapes from the start (one compile, not a
    static one and then a dynamic one), with their own record."""
    import itertools

    from dist_train_script import make_data
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train import Trainer, TrainerConfig
    from lmcraft.train import compile as training_compile
    from lmcraft.train import trainer as trainer_module

    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path / "cache"))
    model = tiny_model(vocab_size=32)
    dynamic = True if varying else None
    key = training_compile.training_compile_key(model, "fp32", [4], dynamic)
    training_compile.record_compile_seconds("train", key, recorded)
    assert training_compile.recorded_compile_seconds("train", key)[0] == recorded
    compiled = []
    monkeypatch.setattr(trainer_module, "compile_model",  # no real compile
                        lambda m, dynamic=None: compiled.append(dynamic) or True)
    objective = CausalLM()
    widths = itertools.count()

    def cut(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:  # 5, 6, 7, 5, ... tokens wide
        return {"input_ids": torch.stack([item["input_ids"] for item in items])[:, :5 + next(widths) % 3]}

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]):  # noqa: ANN202 - a LossOutput
        return objective.loss(m, objective.transform({"input_ids": batch["input_ids"]}))

    cfg = TrainerConfig(max_steps=3, micro_batch_size=4, compile="auto", precision="fp32", progress=False,
                        tensorboard=False, plot=False, device="cpu")
    Trainer(model, loss, make_data(16), config=cfg, output_dir=tmp_path / "run",
            collate_fn=cut if varying else None).train()
    assert compiled == ([dynamic] if recorded == 0.0 else [])
    seconds, source = training_compile.recorded_compile_seconds("train", key)
    assert source.startswith("measured before") and (seconds == recorded if compiled == [] else seconds >= 0.0)


@pytest.mark.slow
def test_dynamic_compile_serves_every_length_with_one_graph(tiny_model: Callable[..., torch.nn.Module], tmp_path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile_model(dynamic=True)` (what auto picks for batches of varying shapes): padded batches of four
    lengths train through one graph, with the eager loss and gradients."""
    import torch._dynamo.utils

    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train.compile import compile_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = tiny_model(vocab_size=97, num_kv_heads=2), tiny_model(vocab_size=97, num_kv_heads=2)
    assert compile_model(compiled, dynamic=True)
    objective = CausalLM()
    for width in (9, 12, 17, 23):
        ids = torch.randint(0, 97, (4, width))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        data = objective.transform({"input_ids": ids, "attention_mask": mask})
        ref, got = (objective.loss(m, data).loss_sum for m in (eager, compiled))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
        ref.backward()
        got.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_a_resumed_run_keeps_the_compile_decision(tiny_model: Callable[..., torch.nn.Module], tmp_path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile decision (after two eager micro-batches) is part of the checkpoint: a run resumed after it
    compiles before its first step, one resumed before it goes on probing, so every step of a resumed run takes
    the path it took in the uninterrupted run (the condition for an exact resume)."""
    from dist_train_script import make_data
    from lmcraft.objectives.clm import CausalLM
    from lmcraft.train import Trainer, TrainerConfig
    from lmcraft.train import compile as training_compile
    from lmcraft.train import trainer as trainer_module

    monkeypatch.setenv("LMCRAFT_CACHE", str(tmp_path / "cache"))
    compiled_before_step: list[int] = []
    trainers: list[Trainer] = []
    monkeypatch.setattr(trainer_module, "compile_model",  # no real compile: note the step it comes before
                        lambda m, dynamic=None: compiled_before_step.append(trainers[-1].state.step + 1) or True)
    objective = CausalLM()

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]):  # noqa: ANN202 - a LossOutput
        return objective.loss(m, objective.transform({"input_ids": batch["input_ids"]}))

    cfg = TrainerConfig(max_steps=4, save_every=1, keep_last=4, micro_batch_size=4, compile="auto",
                        precision="fp32", progress=False, tensorboard=False, plot=False, device="cpu")
    model = tiny_model(vocab_size=32)
    training_compile.record_compile_seconds("train", training_compile.training_compile_key(model, "fp32", [4]), 0.0)
    for name, resume in (("full", None), ("from-1", "step-1"), ("from-3", "step-3")):
        compiled_before_step.clear()
        trainers.append(Trainer(tiny_model(vocab_size=32), loss, make_data(32), config=cfg,
                                output_dir=tmp_path / name))
        trainers[-1].train(resume_from=tmp_path / "full" / resume if resume else None)
        assert compiled_before_step == [3 if name != "from-3" else 4], name  # steps 3 and 4 compiled in each
        assert trainers[-1].state.compiled == "static"
