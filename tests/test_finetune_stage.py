"""`lmcraft finetune` and `lmcraft merge` end to end on tiny models and toy data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmcraft.cli import main
from test_finetune_support import VOCAB, ner_rows, quick_trainer, sentiment_rows, tiny_model_folder, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::lmcraft.hub.HubWarning")  # toy MLM checkpoints get new cls heads


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft-assets")
    return {"bert": tiny_model_folder(root, "bert"), "llama": tiny_model_folder(root, "llama"),
            "sentiment": write_jsonl(root / "sentiment.jsonl", sentiment_rows(48)),
            "ner": write_jsonl(root / "ner.jsonl", ner_rows(48))}


def finetune(tmp_path: Path, config: dict, *overrides: str) -> dict:
    path = tmp_path / "ft.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    assert main(["finetune", str(path), *overrides]) == 0
    return json.loads((Path(config["output_dir"]) / "summary.json").read_text())


def base_config(tmp_path: Path, assets: dict, task: str = "cls", arch: str = "bert", **extra) -> dict:
    data = "ner" if task == "token_cls" else "sentiment"
    source = {"path": str(assets[data])}
    if task == "regression":
        source["label_field"] = "score"
    return {"task": task, "model": str(assets[arch]), "output_dir": str(tmp_path / "out"), "threads": 1,
            "data": {"train": source, "max_length": 12 if task == "clm" else 24, "validation_fraction": 0.25},
            "trainer": quick_trainer(max_steps=4, eval_every=2), **extra}


def test_lora_classification_then_merge_gives_the_same_logits(tmp_path, assets, capsys) -> None:
    from lmcraft import peft
    from lmcraft.hub import load_model
    from lmcraft.peft.training import fit_head

    cfg = base_config(tmp_path, assets, peft={"method": "lora", "r": 4, "target_modules": "all-linear",
                                              "init_lora_weights": False})
    results = finetune(tmp_path, cfg)
    assert "lora: trainable params:" in capsys.readouterr().out
    final = Path(results["final"])
    info = json.loads((final / "finetune.json").read_text())
    assert info["head"] == "cls" and info["labels"] == ["neg", "pos"] and results["method"] == "lora"
    assert 0 < results["trainable_percent"] < 100 and results["peak_memory_mb"] > 0 and results["step_seconds"] > 0
    assert {"accuracy", "f1_macro", "f1_micro", "precision_macro", "recall_macro", "mcc"} <= set(results["validation"])

    assert main(["merge", str(final), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert merged.head_kind == "cls" and merged.config.extra["id2label"] == {"0": "neg", "1": "pos"}
    base = load_model(assets["bert"], head="cls", dtype=torch.float32)
    fit_head(base, 2, ["neg", "pos"])
    adapted = peft.load_adapter(base, final).eval()
    ids = torch.randint(4, len(VOCAB), (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = adapted(ids, attention_mask=mask).logits
        got = merged(ids, attention_mask=mask).logits
        plain = load_model(assets["bert"], head="cls")
        fit_head(plain, 2)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, plain(ids, attention_mask=mask).logits, atol=1e-3)  # the adapter changed it


def test_random_init_keeps_the_architecture_and_drops_the_weights(tmp_path, assets) -> None:
    """init: random is the from-scratch baseline: same config and tokenizer, none of the pre-trained weights."""
    from lmcraft.hub import load_model

    results = finetune(tmp_path, base_config(tmp_path, assets, init="random",
                                             trainer=quick_trainer(max_steps=1, lr=1e-12)))
    assert results["init"] == "random"
    pretrained, final = load_model(assets["bert"]), load_model(results["final"])
    assert final.config.hidden_size == pretrained.config.hidden_size
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        ours, theirs = final.state_dict()[name], pretrained.state_dict()[name]
        assert not torch.allclose(ours, theirs)
        assert abs(float(ours.std()) - final.config.initializer_range) < 0.2 * final.config.initializer_range


def test_full_token_classification_writes_a_loadable_hf_folder(tmp_path, assets) -> None:
    from lmcraft.hub import load_model

    results = finetune(tmp_path, base_config(tmp_path, assets, "token_cls", freeze={"embeddings": True}))
    assert results["metric"] == "entity_f1" and {"entity_precision", "token_accuracy"} <= set(results["validation"])
    final = load_model(results["final"])
    assert final.head_kind == "token_cls" and final.config.num_labels == 4
    assert final.config.extra["id2label"]["0"] == "B-LOC"
    assert results["trainable_params"] < results["total_params"]  # embeddings frozen


def test_regression_and_decoder_classification(tmp_path, assets) -> None:
    reg = finetune(tmp_path, base_config(tmp_path, assets, "regression", dropout=0.0, classifier_dropout=0.2))
    assert reg["metric"] == "pearson" and {"mse", "mae", "spearman"} <= set(reg["validation"])
    dec = finetune(tmp_path / "dec", base_config(tmp_path / "dec", assets, "cls", "llama", peft={"method": "ia3"}),
                   "trainer.precision=bf16")
    assert dec["method"] == "ia3" and dec["precision"] == "bf16" and dec["metric_value"] is not None


def test_early_stopping_on_a_metric_keeps_the_best_model(tmp_path, assets) -> None:
    stop = {"metric": "eval_accuracy", "mode": "max", "patience": 2, "min_delta": 1.0}  # nothing beats the first
    cfg = base_config(tmp_path, assets, trainer=quick_trainer(max_steps=20, eval_every=1, early_stopping=stop))
    results = finetune(tmp_path, cfg)
    assert results["stopped"] == "early_stopping" and results["steps"] == 3 and results["best_step"] == 1
    best = json.loads((tmp_path / "out" / "best" / "best.json").read_text())
    assert best == {"metric": "eval_accuracy", "step": 1, "value": results["validation"]["accuracy"]}


def test_clm_lora_gradual_unfreezing_and_llrd(tmp_path, assets) -> None:
    cfg = base_config(tmp_path, assets, "clm", "llama", peft={"method": "lora", "r": 2},
                      gradual_unfreezing={"every": 1, "unit": "steps"}, layer_lr_decay=0.8)
    results = finetune(tmp_path, cfg)
    assert results["metric"] == "ppl" and results["metric_value"] > 1
    assert (Path(results["final"]) / "adapter_model.safetensors").is_file()


def test_adalora_allocates_ranks_during_training(tmp_path, assets) -> None:
    cfg = base_config(tmp_path, assets, peft={"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1,
                                              "tfinal": 1, "deltaT": 1})
    results = finetune(tmp_path, cfg)
    saved = json.loads((Path(results["final"]) / "adapter_config.json").read_text())
    assert saved["total_step"] == 4 and saved["rank_pattern"]
    assert all(sum(keep) <= 4 for keep in saved["rank_pattern"].values())
    assert sum(sum(keep) for keep in saved["rank_pattern"].values()) == 2 * len(saved["rank_pattern"])


def test_merge_refuses_prompt_tuning(tmp_path, assets, capsys) -> None:
    results = finetune(tmp_path, base_config(tmp_path, assets, peft={"method": "prompt", "num_virtual_tokens": 2}))
    assert main(["merge", results["final"], "--out", str(tmp_path / "m")]) == 2
    assert "virtual tokens" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "m").exists()
