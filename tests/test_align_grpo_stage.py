"""`lmcraft grpo` end to end on the toy model (arithmetic task): PEFT and full fine-tuning, every loss option, the
per-reward and memory metrics, no reference when beta = 0, and exact resume after a SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lmcraft.align import toy
from lmcraft.cli import main
from test_align_stages import ENV, KILLER, weights

QUIET = {"progress": False, "tensorboard": False, "plot": False}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "grpo-toy.yaml"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy.build(tmp_path_factory.mktemp("toy"), num_sft=40, num_prompts=4, num_eval=4, hidden_size=32) / "base"


@pytest.fixture
def one_thread() -> Any:
    """The in-process run uses one thread, as the killed child (ENV) does, so both reduce in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(base: Path, out: Path, peft: dict | None = None, **grpo: Any) -> dict[str, Any]:
    """The tiny recipe (recipes/grpo-toy.yaml) on the test's model, smaller."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["model"]["from"] = str(base)
    cfg["peft"] = peft
    cfg["task"].update(size=12, eval_size=4)
    cfg["grpo"].update({"rollouts": 2, "prompts_per_rollout": 2, "num_generations": 4, "minibatch_size": 4,
                        "max_new_tokens": 6, **grpo})
    cfg["trainer"].update({"micro_batch_size": 2, "log_every": 1, "seed": 3, **QUIET})
    cfg["output_dir"] = str(out)
    return cfg


def run(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    path.write_text(yaml.safe_dump(cfg))
    assert main(["grpo", str(path), "--no-progress"]) == 0
    return json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())


def records(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock and memory figures."""
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_memory_mb")} for r in rows]


def test_lora_run_logs_every_reward_and_memory(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run(config(base, out, {"method": "lora", "r": 2}, beta=0.05, mu=2, dynamic_sampling=True,
                         overlong_buffer=2, rollouts=1), tmp_path / "c.yaml")
    assert summary["rollouts"] == 1 and summary["step"] == 4  # mu 2 x (8 rows / 4 per step)
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    n = summary["held_out"]  # the paired before/after comparison counts the same 4 held-out items
    before = json.loads((out / "start_score.json").read_text())["correct"]
    assert n == len(before) == 4 and sum(before) / n == summary["accuracy_before"]
    assert summary["accuracy_after"] - summary["accuracy_before"] == pytest.approx(
        (summary["right_after_only"] - summary["right_before_only"]) / n)
    assert summary["accuracy_before_ci_low"] <= summary["accuracy_before"] <= summary["accuracy_before_ci_high"]
    assert summary["peak_memory_mb"] > 0 and (out / "final" / "adapter_model.safetensors").is_file()
    train = [r for r in records(out) if r["split"] == "train"]
    for key in ("reward", "reward/accuracy", "reward/format", "reward/has_digit", "reward/overlong", "kl",
                "clip_ratio/low", "clip_ratio/high", "entropy", "groups_dropped"):
        assert all(key in r for r in train), key
    assert all("peak_memory_mb" in json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()
               if '"train"' in r)
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 1
    assert any(r["grad_norm"] > 0 for r in train)


@pytest.mark.parametrize("loss, beta", [("dapo", 0.0), ("dr_grpo", 0.0), ("rloo", 0.05), ("grpo", 0.0)])
def test_full_finetuning_each_loss(base: Path, tmp_path: Path, loss: str, beta: float,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if beta == 0:  # no reference policy (no frozen copy) when beta = 0
        import lmcraft.peft.training

        def refuse(model: Any) -> Any:
            raise AssertionError("a reference policy was built with beta = 0")

        monkeypatch.setattr(lmcraft.peft.training, "reference_policy", refuse)
    out = tmp_path / "run"
    summary = run(config(base, out, None, loss=loss, beta=beta, rollouts=1), tmp_path / "c.yaml")
    assert summary["loss_type"] == loss and summary["step"] == 2
    assert (out / "final" / "model.safetensors").is_file()
    train = [r for r in records(out) if r["split"] == "train"]
    if loss == "dapo":  # token-mean: targets are answer tokens; the others count sequences
        assert all(r["targets"] > 4 for r in train)
    else:
        assert all(r["targets"] == 4 for r in train)


def test_bad_config_is_refused(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(base, tmp_path / "run")
    cfg["trainer"]["max_steps"] = 3
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["grpo", str(path)]) == 2
    assert "derives these from the grpo section" in capsys.readouterr().err


@pytest.mark.slow
def test_grpo_resumes_exactly_after_sigkill(base: Path, tmp_path: Path, one_thread: None) -> None:
    """Killed after step 6 (inside the third rollout; checkpoint at step 4), rerun: the same step-8 weights,
    metrics and rollouts as the uninterrupted run, including the prompts drawn by dynamic sampling."""
    def cfg(out: Path) -> dict[str, Any]:
        return config(base, out, {"method": "lora", "r": 2}, rollouts=4, beta=0.05, dynamic_sampling=True,
                      minibatch_size=8, mu=2, save_every=2)

    full, killed = tmp_path / "full", tmp_path / "killed"
    run(cfg(full), tmp_path / "full.yaml")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg(killed)))
    proc = subprocess.run([sys.executable, "-c", KILLER.format(kill_at=6), "grpo", str(path), "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in killed.glob("step-*")) == ["step-4"]
    assert main(["grpo", str(path), "--no-progress"]) == 0
    a, b = weights(full / "step-8"), weights(killed / "step-8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(full) == records(killed) and len(records(full)) >= 8
    assert (full / "rollouts.jsonl").read_text() == (killed / "rollouts.jsonl").read_text()


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPE.parent.glob("grpo-*.yaml")))
def test_recipes_validate(recipe: str) -> None:
    from lmcraft.config import load_config
    from lmcraft.stages import grpo

    cfg = load_config(grpo.config_class(), RECIPE.parent / recipe)
    assert cfg.grpo.rows % cfg.trainer.micro_batch_size == 0


def test_config_imports_without_torch() -> None:
    code = "import sys, lmcraft.stages.grpo\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-c", code], env={**ENV, "PYTHONPATH": src}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
