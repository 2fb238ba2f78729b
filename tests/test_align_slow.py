"""Real assets: SmolLM2-135M-Instruct's own template masks alpaca_en_demo answers; one LoRA SFT step chains into DPO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmcraft.cli import main

pytestmark = pytest.mark.slow


def test_smollm2_template_masks_only_the_answer() -> None:
    from lmcraft.align.data import load_conversations
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.align.modeling import load_stage_tokenizer, tokenizer_folder

    tok = load_stage_tokenizer(tokenizer_folder("smollm2-135m-instruct"))
    conv = load_conversations(["asset:alpaca-en-demo/alpaca_en_demo.json"], limit=2)[1]
    ex = ChatFormatter(tok).tokenize(conv.messages)
    trained = tok.decode([i for i, t in zip(ex.input_ids, ex.trained, strict=True) if t])
    assert trained == conv.messages[-1]["content"] + "<|im_end|>\n"
    assert ex.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_smollm2_lora_sft_then_dpo(tmp_path: Path) -> None:
    trainer = {"max_steps": 1, "micro_batch_size": 1, "progress": False, "tensorboard": False, "plot": False}
    sft = {"model": {"from": "smollm2-135m-instruct"}, "peft": {"method": "lora", "r": 4},
           "data": {"train": ["asset:alpaca-en-demo/alpaca_en_demo.json"], "limit": 4, "max_length": 64},
           "trainer": trainer, "output_dir": str(tmp_path / "sft")}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    assert main(["sft", str(tmp_path / "sft.yaml")]) == 0
    dpo = {"model": {"from": str(tmp_path / "sft" / "final")}, "peft": {"method": "lora", "r": 4},
           "data": {"train": ["asset:dpo-en-demo/dpo_en_demo.json"], "limit": 2, "max_length": 64},
           "trainer": trainer, "output_dir": str(tmp_path / "dpo")}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    assert main(["dpo", str(tmp_path / "dpo.yaml")]) == 0
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["step"] == 1
    config = json.loads((tmp_path / "dpo" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "sft" / "final").resolve())
