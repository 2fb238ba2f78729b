"""`lmcraft plan`: the memory plan of a training stage's config, model on the meta device, checked against the plan
the trainer makes on the loaded model before step 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from lmcraft.align import toy
from lmcraft.cli import main

QUIET = {"progress": False, "tensorboard": False, "plot": False}
LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = toy.build(tmp_path_factory.mktemp("toy"), num_sft=120, num_prompts=16, num_eval=4, hidden_size=32)
    rows = [{"prompt": "name some fruits", "chosen": f"apple pear {toy.TARGET_WORD}", "rejected": "apple pear"}] * 12
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _config(path: Path, stage: str, task: Path, /, peft: dict[str, Any] | None = LORA, **extra: Any) -> Path:
    trainer = {"micro_batch_size": 4, "max_steps": 1, **QUIET}
    if stage == "sft":
        data: dict[str, Any] = {"data": {"train": [str(task / "sft.jsonl")], "max_length": 48, "limit": 40}}
    elif stage in ("reward", "dpo"):
        data = {"data": {"train": [str(task / "pairs.jsonl")], "max_length": 48}}
    else:
        trainer.pop("max_steps")
        data = {"prompts": {"train": [str(task / "prompts.jsonl")]},
                "reward": {"kind": "rule", "rule": "contains", "words": [toy.TARGET_WORD]},
                "ppo": {"rollouts": 1, "rollout_batch_size": 8, "minibatch_size": 4, "max_new_tokens": 6}}
    cfg = {"model": {"from": str(task / "base")}, "peft": peft, "trainer": trainer,
           "output_dir": str(path.parent / f"out-{stage}"), **data, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(text: str) -> dict[str, str]:
    """The table's rows: name -> size text."""
    return {m[1].strip(): m[2] for m in re.finditer(r"^  (\S.*?)\s{2,}([\d.]+ [MG]iB)", text, re.M)}


def _mib(size: str) -> float:
    value, unit = size.split()
    return float(value) * (1024 if unit == "GiB" else 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_of_an_sft_config_matches_the_trainers_plan_of_the_loaded_model(task: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str],
                                                                             precision: str) -> None:
    """Weights, gradients, optimizer state and the batch shape are those of the loaded model; activations measured on
    1- and 2-layer stand-ins are those measured on the whole model (to the probe's rounding). Under bf16 both count
    the frozen linear weights in bf16 (`trainer.frozen_dtype: auto`) and the activations autocast keeps."""
    config = _config(tmp_path / "sft.yaml", "sft", task, trainer={"micro_batch_size": 4, "max_steps": 1,
                                                                   "precision": precision, **QUIET})
    assert main(["plan", str(config), "--stage", "sft"]) == 0
    planned = capsys.readouterr().out
    assert main(["sft", str(config), "--no-progress", "trainer.memory_limit=1KiB"]) == 2  # the trainer's own plan
    trained = capsys.readouterr().err
    shape = re.search(r"memory plan for the largest batch (\d+ x \d+) tokens", trained)[1]
    assert f"memory plan for the largest batch {shape} tokens" in planned
    ours, theirs = _rows(planned), _rows(trained)
    for row in ("weights", "gradients", "optimizer state (adamw)", "LM-head loss (chunked)"):
        assert ours[row] == theirs[row], row
    activations = "activations (checkpointing none)"
    assert _mib(ours[activations]) == pytest.approx(_mib(theirs[activations]), rel=0.05)
    if precision == "bf16":  # the frozen linear weights at 2 bytes, not 4
        from lmcraft.stage_memory import plan_stage
        from lmcraft.stages.plan import _load

        weights = {}
        for frozen in ("auto", "fp32"):
            args = SimpleNamespace(config=config, planned_stage="sft", overrides=[f"trainer.frozen_dtype={frozen}"])
            weights[frozen] = plan_stage(*_load(args)).weights
        assert weights["auto"] < 0.9 * weights["fp32"]


def test_alignment_lines_reference_and_rollouts(task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    config = _config(tmp_path / "dpo.yaml", "dpo", task, peft=None, **{"stage": "dpo"},
                     dpo={"reference": "on_the_fly"})  # full fine-tuning: a frozen copy, the stage from the file
    assert main(["plan", str(config)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["reference (frozen copy)"] == rows["weights"]
    assert main(["plan", str(_config(tmp_path / "dpo-lora.yaml", "dpo", task)), "--stage", "dpo"]) == 0
    assert "reference (adapters disabled)       " in capsys.readouterr().out
    assert main(["plan", str(_config(tmp_path / "ppo.yaml", "ppo", task)), "--stage", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "rollout buffers" in out and re.search(r"largest batch 4 x \d+ tokens", out)


def test_a_plan_over_the_limit_gives_advice_and_exit_code_1(task: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path / "sft.yaml", "sft", task)
    assert main(["plan", str(config), "--stage", "sft", "--memory-limit", "1KiB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit 0.0 MiB; options:" in out and "trainer.activation_checkpointing=full" in out


def test_plan_needs_a_training_stage(task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path / "sft.yaml", "sft", task)
    assert main(["plan", str(config)]) == 2
    assert "which stage is this config for? Pass --stage" in " ".join(capsys.readouterr().err.split())
    config.write_text(config.read_text() + "stage: eval\n")
    assert main(["plan", str(config)]) == 2
    assert "stage 'eval' does not train" in " ".join(capsys.readouterr().err.split())


def test_plan_help_imports_no_torch() -> None:
    code = ("import sys\nfrom lmcraft.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "--memory-limit" in proc.stdout and proc.stdout.strip().endswith("False")
