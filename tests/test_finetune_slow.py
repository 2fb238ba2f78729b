"""The finetune recipes on the real assets (MiniLM-L6 + SpamAssassin, SmolLM2 + Shakespeare), a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmcraft.cli import main

RECIPES = Path(__file__).parent.parent / "recipes"
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()  # the runs set threads=1 in this process
    yield
    torch.set_num_threads(before)


def test_minilm_spam_recipe_with_lora_then_merge(tmp_path) -> None:
    from lmcraft.hub import load_model

    out = tmp_path / "run"
    assert main(["finetune", str(RECIPES / "finetune-minilm-spam.yaml"), f"output_dir={out}", "threads=1",
                 "data.max_train_examples=32", "data.max_validation_examples=32", "data.max_length=32",
                 "trainer.max_steps=2", "trainer.eval_every=2", "trainer.progress=false", "peft.method=lora",
                 "trainer.lr=1e-3"]) == 0
    results = json.loads((out / "summary.json").read_text())
    assert results["labels"] == ["ham", "spam"] and results["method"] == "lora"
    assert 0 <= results["validation"]["accuracy"] <= 1
    assert main(["merge", str(out / "final"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert merged.head_kind == "cls" and merged.config.extra["id2label"] == {"0": "ham", "1": "spam"}


def test_smollm2_shakespeare_recipe_runs_qlora(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["finetune", str(RECIPES / "finetune-smollm2-shakespeare-lora.yaml"), f"output_dir={out}",
                 "threads=1", "peft.method=qlora", "data.max_length=32", "data.max_train_examples=4",
                 "data.max_validation_examples=2", "trainer.max_steps=1", "trainer.micro_batch_size=2",
                 "trainer.eval_every=null", "trainer.progress=false", "trainer.warmup_steps=0"]) == 0
    results = json.loads((out / "summary.json").read_text())
    assert results["method"] == "qlora" and results["metric"] == "ppl" and results["metric_value"] > 1
    assert (out / "final" / "adapter_model.safetensors").is_file()
