"""The alignment stages end to end on the toy task (tiny model): SFT preview and run, every PEFT method through
SFT / reward / DPO / PPO, RLAIF labelling, and exact resume of each stage after a SIGKILL."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmcraft.align import toy
from lmcraft.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = {"progress": False, "tensorboard": False, "plot": False}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = toy.build(tmp_path_factory.mktemp("toy"), num_sft=240, num_prompts=48, num_eval=8, hidden_size=32)
    rows = []
    for line in (folder / "prompts.jsonl").read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        items = " ".join(toy.CATEGORIES["fruits"][:3])
        rows.append({"prompt": prompt, "chosen": f"{items} {toy.TARGET_WORD}", "rejected": items})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def one_thread() -> Any:
    """The in-process reference run uses one thread, as the killed child (ENV) does: with two, a CPU without
    AVX-512 splits the reductions differently and the runs differ in the last bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_config(stage: str, task: Path, out: Path, start: Path | None = None, peft: dict | None = None,
                 **trainer: Any) -> dict[str, Any]:
    model = {"from": str(start or task / "base")}
    t = {"lr": 1e-2, "micro_batch_size": 4, "log_every": 1, "seed": 3, **QUIET, **trainer}
    if stage == "sft":
        cfg = {"data": {"train": [str(task / "sft.jsonl")], "max_length": 48, "limit": 64, "val_size": 8}}
    elif stage in ("reward", "dpo"):
        cfg = {"data": {"train": [str(task / "pairs.jsonl")], "max_length": 48, "limit": 24, "val_size": 4}}
    else:
        t.pop("max_steps", None)
        cfg = {"prompts": {"train": [str(task / "prompts.jsonl")]},
               "reward": {"kind": "rule", "rule": "contains", "words": [toy.TARGET_WORD]},
               "ppo": {"rollouts": 2, "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2,
                       "max_new_tokens": 6, "save_every": 1}}
    return {"model": model, "peft": peft, "trainer": t, "output_dir": str(out), **cfg}


def run_stage(stage: str, cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    assert main([stage, str(write_config(path, cfg)), "--no-progress"]) == 0
    return json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())


def test_sft_preview_then_training(task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = stage_config("sft", task, tmp_path / "sft", max_steps=6)
    cfg["data"].update(packing=True)
    cfg["samples"] = {"prompts": ["name some colors"], "max_new_tokens": 4}
    path = write_config(tmp_path / "sft.yaml", cfg)
    assert main(["sft", str(path), "--preview", "2", "--no-color"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("── ") == 2 and "<|im_start|>assistant\n«" in shown and "<|im_end|>\n»" in shown
    assert not (tmp_path / "sft" / "step-6").exists()  # preview does not train
    summary = run_stage("sft", cfg, path)
    assert summary["step"] == 6 and summary["data"]["rows"] < summary["data"]["examples"]  # packed
    assert summary["start_eval_loss"] > summary["eval_loss"]  # the start model is evaluated before step 1
    final = tmp_path / "sft" / "final"
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for message")
    samples = json.loads((tmp_path / "sft" / "samples.json").read_text())
    assert set(samples) == {"prompts", "before", "after"}
    history = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["split"] == "eval" and history[0]["loss"] > history[5]["loss"]


METHODS = {
    "lora": {"method": "lora", "r": 2},
    "dora": {"method": "dora", "r": 2},
    "qlora": {"method": "qlora", "r": 2, "blocksize": 32},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2},
    "adapter": {"method": "adapter", "reduction_factor": 8},
    "prefix": {"method": "prefix", "num_virtual_tokens": 2, "encoder_hidden_size": 8},
    "prompt": {"method": "prompt", "num_virtual_tokens": 2},
    "ptuning": {"method": "ptuning", "num_virtual_tokens": 2, "encoder_hidden_size": 8},
    "ptuning_v2": {"method": "ptuning_v2", "num_virtual_tokens": 2},
    "bitfit": {"method": "bitfit", "add_missing_biases": True},
    "ia3": {"method": "ia3"},
    "unipelt": {"method": "unipelt", "lora_r": 2, "num_virtual_tokens": 2, "prefix_hidden_size": 8,
                "adapter_reduction_factor": 8},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_peft_method_through_every_stage(task: Path, tmp_path: Path, name: str) -> None:
    peft = METHODS[name]
    for stage in ("sft", "reward", "dpo", "ppo"):
        cfg = stage_config(stage, task, tmp_path / stage, peft=peft, max_steps=2)
        if stage == "dpo":
            cfg["dpo"] = {"reference": "on_the_fly"}
        if stage == "ppo":
            cfg["ppo"].update(rollouts=1, ppo_epochs=1)
        summary = run_stage(stage, cfg, tmp_path / f"{stage}.yaml")
        assert summary["step"] == 2, stage
        final = tmp_path / stage / "final"
        assert (final / "adapter_config.json").is_file() and (final / "tokenizer.json").is_file()
        records = [json.loads(r) for r in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["split"] == "train")


LOSS_SETTINGS = {"hinge": {}, "robust": {"label_smoothing": 0.1}, "simpo": {"beta": 2.0, "gamma": 0.5},
                 "cpo": {"nll_weight": 1.0}, "orpo": {"beta": 0.1}, "kto": {"desirable_weight": 1.0}}


@pytest.mark.parametrize("loss", list(LOSS_SETTINGS))
def test_every_preference_loss_through_the_stage(task: Path, tmp_path: Path, loss: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `dpo.loss` trains end to end (full fine-tuning, so a reference would be a frozen copy); the reference-free
    ones never build a reference, and KTO reads LLaMA-Factory's messages + label layout."""
    from lmcraft.align.preference_losses import REFERENCE_FREE
    from lmcraft.peft import training

    cfg = stage_config("dpo", task, tmp_path / "dpo", max_steps=2, eval_every=2)
    cfg["dpo"] = {"loss": loss, **LOSS_SETTINGS[loss]}
    if loss == "kto":
        rows = [json.loads(line) for line in (task / "pairs.jsonl").read_text().splitlines()]
        kto = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}],
                "label": side == "chosen"} for r in rows for side in ("chosen", "rejected")]
        (tmp_path / "kto.json").write_text(json.dumps(kto))
        cfg["data"]["train"] = [str(tmp_path / "kto.json")]
    built = []
    monkeypatch.setattr(training, "reference_policy", lambda model: built.append(1) or training.ReferencePolicy(
        copy.deepcopy(model)))
    summary = run_stage("dpo", cfg, tmp_path / "dpo.yaml")
    assert summary["step"] == 2 and summary["loss"] == loss and summary["eval_reward_accuracy"] is not None
    if loss not in REFERENCE_FREE:  # the start model is its own reference: every implicit reward is 0, none wins
        assert summary["start_eval_reward_accuracy"] == 0.0
    else:  # the start model's own ranking of the held-out pairs
        assert 0.0 <= summary["start_eval_reward_accuracy"] <= 1.0
    assert built == ([] if loss in REFERENCE_FREE else [1])
    assert (tmp_path / "dpo" / "reference_train.json").is_file() == (loss in ("hinge", "robust"))
    records = [json.loads(r) for r in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    if loss == "kto":
        assert summary["examples"] == 20 and all(r["kl"] >= 0 for r in train)


def test_precomputed_reference_ties_the_start_policy_under_bf16(task: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference log-probs are precomputed in the training's precision (here bf16 autocast), so the start
    policy's implicit rewards on the held-out pairs are exactly 0: every pair ties, the loss is log 2."""
    monkeypatch.setenv("LMCRAFT_AUTO_PRECISION", "bf16")
    cfg = stage_config("dpo", task, tmp_path / "dpo", peft={"method": "lora", "r": 2}, max_steps=1, eval_every=1)
    cfg["dpo"] = {"loss": "sigmoid", "reference": "precompute"}
    run_stage("dpo", cfg, tmp_path / "dpo.yaml")
    start = json.loads((tmp_path / "dpo" / "start_eval.json").read_text())
    assert start["eval_reward_margin"] == 0.0 and start["eval_reward_chosen"] == 0.0
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_kto_on_preference_pairs_holds_out_whole_pairs(task: Path, tmp_path: Path) -> None:
    """KTO reads a pair file as labelled answers (chosen desirable, rejected not); val_size holds out whole records,
    so no held-out prompt is trained on, and the held-out pairs are scored by their implicit rewards: every pair ties
    at the start (0.5), and the score moves once the policy leaves its reference."""
    from lmcraft.align.config import PairsData
    from lmcraft.align.dpo import answer_pairs, load_unpaired
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.tokenizer.load import load_tokenizer

    cfg = stage_config("dpo", task, tmp_path / "kto", peft={"method": "lora", "r": 2}, max_steps=3, eval_every=3)
    cfg["dpo"] = {"loss": "kto", "beta": 0.5}
    data = PairsData(**cfg["data"])
    train, held = load_unpaired(data, ChatFormatter(load_tokenizer(task / "base"), train_on="last"))
    assert held is not None and len(held) == 8 and len(train) == 40  # 4 of 24 pairs, two answers each
    assert len(answer_pairs(held)) == 4 and len(answer_pairs(train)) == 20
    assert not {ex.source for ex, _ in train.items} & {ex.source for ex, _ in held.items}
    summary = run_stage("dpo", cfg, tmp_path / "kto.yaml")
    assert summary["start_eval_pair_reward_accuracy"] == 0.5 and summary["eval_pairs"] == 4
    wins, ties, losses = summary["pair_wins"], summary["pair_ties"], summary["pair_losses"]
    assert wins + ties + losses == 4 and summary["eval_pair_reward_accuracy"] == (wins + ties / 2) / 4
    assert 0.0 < summary["pair_sign_test_p"] <= 1.0 and len(summary["pair_win_interval"]) == 2


def test_full_finetuning_chain_sft_reward_ppo_and_dpo(task: Path, tmp_path: Path) -> None:
    """Full fine-tuning (frozen-copy references), and stages started from an earlier stage's adapter folder."""
    run_stage("sft", stage_config("sft", task, tmp_path / "sft", peft={"method": "lora", "r": 2}, max_steps=4),
              tmp_path / "sft.yaml")
    sft = tmp_path / "sft" / "final"
    rm = run_stage("reward", stage_config("reward", task, tmp_path / "rm", start=sft, max_steps=6, eval_every=6),
                   tmp_path / "rm.yaml")
    assert rm["eval_accuracy"] is not None and (tmp_path / "rm" / "final" / "model.safetensors").is_file()
    cfg = stage_config("ppo", task, tmp_path / "ppo", start=sft)
    cfg["reward"] = {"kind": "reward_model", "from": str(tmp_path / "rm" / "final")}
    ppo = run_stage("ppo", cfg, tmp_path / "ppo.yaml")
    assert ppo["rollouts"] == 2 and (tmp_path / "ppo" / "rollouts.jsonl").is_file()
    dpo = stage_config("dpo", task, tmp_path / "dpo", start=sft, peft={"method": "lora", "r": 2}, max_steps=3)
    dpo["dpo"] = {"loss": "ipo", "beta": 0.5}
    dpo["score_eval"] = {"scorer": {"kind": "rule", "rule": "contains", "words": [toy.TARGET_WORD]},
                         "prompts": [str(task / "eval_prompts.jsonl")], "max_new_tokens": 4}
    summary = run_stage("dpo", {**dpo, "trainer": {**dpo["trainer"], "eval_every": 3}}, tmp_path / "dpo.yaml")
    assert summary["start_score"] is not None and summary["eval_score"] is not None
    # the start evaluation reuses the start score instead of sampling the held-out answers again
    assert json.loads((tmp_path / "dpo" / "start_eval.json").read_text())["eval_score"] == summary["start_score"]
    # the DPO adapter's base is the SFT adapter folder: loading it rebuilds SFT + DPO
    assert json.loads((tmp_path / "dpo" / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(sft.resolve())
    from lmcraft.align.modeling import load_start_model

    model, _ = load_start_model(tmp_path / "dpo" / "final")
    assert model.head_kind == "lm"


def test_label_preferences_ranking_and_constitution(task: Path, tmp_path: Path) -> None:
    base = {"policy": {"from": str(task / "base")}, "prompts": [str(task / "prompts.jsonl")], "limit": 6,
            "samples_per_prompt": 3, "generation": {"max_new_tokens": 5}, "part_size": 4}
    rank = {**base, "judge": {"kind": "rule", "rule": "length", "target": 3},
            "output": str(tmp_path / "ranked.jsonl")}
    assert main(["label-preferences", str(write_config(tmp_path / "rank.yaml", rank))]) == 0
    rows = [json.loads(r) for r in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert rows and all(max(r["scores"]) > min(r["scores"]) for r in rows)
    assert not (tmp_path / "ranked.jsonl.parts").exists()
    first = (tmp_path / "ranked.jsonl").read_text()
    assert main(["label-preferences", str(tmp_path / "rank.yaml")]) == 0  # seeded per part: same file again
    assert (tmp_path / "ranked.jsonl").read_text() == first
    from lmcraft.align.data import load_preferences

    assert len(load_preferences([tmp_path / "ranked.jsonl"])) == len(rows)  # readable by reward / dpo
    cai = {**base, "constitution": {"principles": [{"critique": "What is wrong?", "revision": "Fix it."}]},
           "output": str(tmp_path / "cai.jsonl")}
    assert main(["label-preferences", str(write_config(tmp_path / "cai.yaml", cai))]) == 0
    for row in map(json.loads, (tmp_path / "cai.jsonl").read_text().splitlines()):
        assert len(row["critiques"]) == 1 and row["chosen"] != row["rejected"]


# ---- exact resume after SIGKILL -----------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
from lmcraft.train import trainer
step = trainer.Trainer._optimizer_step
def killing_step(self):
    out = step(self)
    if self.state.step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
trainer.Trainer._optimizer_step = killing_step
from lmcraft.cli import main
main(sys.argv[1:])
"""


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (step_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(step_dir / name)


def records(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock throughput."""
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.parametrize("stage, peft, kill_at", [
    ("sft", None, 5),                                   # full fine-tuning, packed: checkpoints at 4, 8
    ("sft", {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 8}, 6),
    ("reward", {"method": "lora", "r": 2}, 5),
    ("dpo", {"method": "lora", "r": 2}, 5),
    ("ppo", {"method": "lora", "r": 2}, 6),             # 4 steps per rollout: killed inside the second rollout
])
def test_stage_resumes_exactly_after_sigkill(task: Path, tmp_path: Path, stage: str, peft: dict | None,
                                             kill_at: int, one_thread: None) -> None:
    def config(out: Path) -> dict[str, Any]:
        cfg = stage_config(stage, task, out, peft=peft, max_steps=8, save_every=4, eval_every=4)
        if stage == "sft":
            cfg["data"]["packing"] = True
        if stage == "ppo":
            cfg["trainer"] = {k: v for k, v in cfg["trainer"].items() if k not in ("save_every", "eval_every")}
        return cfg

    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stage(stage, config(full), tmp_path / "full.yaml")
    path = write_config(tmp_path / "killed.yaml", config(killed))
    proc = subprocess.run([sys.executable, "-c", KILLER.format(kill_at=kill_at), stage, str(path), "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in killed.glob("step-*")) == ["step-4"]
    assert main([stage, str(path), "--no-progress"]) == 0
    a, b = weights(full / "step-8"), weights(killed / "step-8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(full) == records(killed) and len(records(full)) >= 8
    if stage == "ppo":
        assert (full / "rollouts.jsonl").read_text() == (killed / "rollouts.jsonl").read_text()


def test_reward_model_on_an_encoder(task: Path, tmp_path: Path) -> None:
    """An encoder (BERT layout) reward model: the scalar head reads the last real token, which sees the whole text."""
    from lmcraft.hub import save_model
    from lmcraft.models import LanguageModel, preset
    from lmcraft.tokenizer.load import load_tokenizer

    tok = load_tokenizer(task / "base")
    torch.manual_seed(0)
    cfg = preset("bert-tiny", vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0)
    save_model(LanguageModel(cfg), tmp_path / "bert", tokenizer_dir=task / "base")  # an MLM checkpoint
    cfg = stage_config("reward", task, tmp_path / "rm", start=tmp_path / "bert", max_steps=12, eval_every=12)
    cfg["template"] = "alpaca"
    summary = run_stage("reward", cfg, tmp_path / "rm.yaml")
    assert summary["eval_accuracy"] is not None
    assert json.loads((tmp_path / "rm" / "final" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")
                                          if p.name.split("-")[0] in ("sft", "reward", "dpo", "ppo", "rlaif")))
def test_recipes_validate(recipe: str) -> None:
    from lmcraft.config import load_config
    from lmcraft.stages import dpo, label_preferences, ppo, reward, sft

    stage = recipe.split("-")[0]
    cls = label_preferences.LabelConfig if stage == "rlaif" else {
        "sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo}[stage].config_class()
    load_config(cls, Path(__file__).parents[1] / "recipes" / recipe)
