"""`lmcraft compare` on a tiny config: three methods, one process each, a table and a plot."""

from __future__ import annotations

import json

import pytest
import yaml

from lmcraft.cli import main
from lmcraft.config import validate_config
from lmcraft.errors import ConfigError
from lmcraft.finetune.compare import plan_runs
from lmcraft.finetune.config import CompareConfig
from test_finetune_support import quick_trainer, sentiment_rows, tiny_model_folder, write_jsonl


def compare_config(tmp_path) -> dict:
    return {
        "task": "cls", "model": str(tiny_model_folder(tmp_path, "bert")), "output_dir": str(tmp_path / "cmp"),
        "threads": 1,
        "data": {"train": {"path": str(write_jsonl(tmp_path / "s.jsonl", sentiment_rows(40)))}, "max_length": 20},
        "trainer": quick_trainer(max_steps=3, eval_every=3, lr=1e-3),
        "compare": {"methods": ["full", "lora", "pfeiffer"], "peft_trainer": {"lr": 5e-3},
                    "runs": {"lora": {"peft": {"r": 2}, "trainer": {"lr": 1e-2}},
                             "pfeiffer": {"peft": {"method": "adapter", "style": "pfeiffer"}}}},
    }


def test_plan_resolves_names_and_per_method_settings(tmp_path) -> None:
    cfg = validate_config(CompareConfig, compare_config(tmp_path))
    runs = {r.name: r.config for r in plan_runs(cfg, ["full", "lora", "pfeiffer", "ia3"])}
    assert runs["full"].peft is None and runs["full"].trainer.lr == 1e-3
    assert runs["lora"].peft == {"method": "lora", "r": 2} and runs["lora"].trainer.lr == 1e-2
    assert runs["pfeiffer"].peft == {"method": "adapter", "style": "pfeiffer"} and runs["pfeiffer"].trainer.lr == 5e-3
    assert runs["ia3"].peft == {"method": "ia3"} and str(runs["ia3"].output_dir).endswith("cmp/ia3")
    assert not runs["ia3"].resume
    with pytest.raises(ConfigError, match="nonsense"):
        plan_runs(cfg, ["full", "nonsense"])


def test_compare_three_methods_writes_table_and_plot(tmp_path, capsys) -> None:
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(compare_config(tmp_path)))
    assert main(["compare", str(path), "--methods", "full,lora,pfeiffer"]) == 0
    out = tmp_path / "cmp"
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["full", "lora", "pfeiffer"]
    for r in rows:
        assert r["error"] is None and r["metric"] == "f1_macro" and r["metric_value"] is not None
        assert r["trainable_params"] > 0 and r["peak_memory_mb"] > 0 and r["tokens_per_second"] > 0
    assert rows[0]["trainable_percent"] == 100.0 and rows[1]["trainable_percent"] < rows[0]["trainable_percent"]
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    md = (out / "compare.md").read_text()
    assert "| method | trainable params | trainable % | peak memory (MiB)" in md and "compare.png" in md
    assert (out / "compare.csv").read_text().startswith("method,")
    assert "| pfeiffer |" in capsys.readouterr().out
    # a second call reuses the finished runs (same configs)
    assert main(["compare", str(path), "--methods", "full,lora,pfeiffer"]) == 0
    assert "reusing" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["compare-minilm-spam.yaml", "compare-smollm2-shakespeare.yaml"])
def test_compare_recipes_validate_and_plan(recipe: str) -> None:
    from pathlib import Path

    from lmcraft.config import load_config

    cfg = load_config(CompareConfig, Path(__file__).parent.parent / "recipes" / recipe)
    runs = plan_runs(cfg)
    assert [r.name for r in runs] == cfg.compare.methods and runs[0].name == "full"
