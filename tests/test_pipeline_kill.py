"""A real pipeline (tokenizer -> prepare -> pretrain -> continued pretraining), SIGKILLed in the middle of its
pretrain stage and rerun, ends with exactly the results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WORDS = ["cat", "dog", "owl", "fox", "walks", "sleeps", "sings", "near", "the", "river", "barn", "hill", "red", "grey"]


def _corpus(folder: Path) -> str:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for f in range(2):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(150)]
        (folder / f"part{f}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return str(folder / "*.txt")


def _recipe(path: Path, run_dir: Path, corpus: str) -> Path:
    trainer = {"lr": 3e-3, "warmup_steps": 5, "micro_batch_size": 8, "eval_every": 20, "eval_max_batches": 2,
               "save_every": 10, "log_every": 1, "progress": False, "plot": False}
    tiny = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": 64}
    stages = [
        {"name": "tokenizer", "stage": "tokenizer", "output_key": "output",
         "config": {"inputs": [{"path": corpus, "text_mode": "paragraph"}], "kind": "bpe", "vocab_size": 320}},
        {"name": "prepare", "stage": "prepare", "output_key": "output",
         "config": {"inputs": [{"path": corpus, "text_mode": "paragraph"}], "steps": [{"type": "exact_dedup"}],
                    "pack": {"tokenizer": "${tokenizer}", "val_fraction": 0.05}}},
        {"name": "pretrain", "stage": "pretrain",
         "config": {"model": {"preset": "llama-14m", "overrides": tiny}, "objective": {"name": "clm"},
                    "tokenizer": {"path": "${tokenizer}"}, "data": {"packed": "${prepare}/packed", "seq_len": 32},
                    "trainer": {**trainer, "max_steps": 120}, "samples": {"prompts": ["the"], "max_new_tokens": 8}}},
        {"name": "more", "stage": "pretrain",
         "config": {"model": {"from": "${pretrain}/final"}, "objective": {"name": "clm"},
                    "tokenizer": {"path": "${pretrain}/final"},
                    "data": {"packed": "${prepare}/packed", "seq_len": 32},
                    "trainer": {**trainer, "max_steps": 20}, "samples": {"prompts": ["the"], "max_new_tokens": 8}}},
    ]
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), "stages": stages}, sort_keys=False))
    return path


def _pipeline(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmcraft", "pipeline", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(folder: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]


def _stage_processes(recipe_dir: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(recipe_dir) in cmdline and "pretrain" in cmdline:
                found.append(int(proc.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_pipeline_killed_mid_stage_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    full_run, killed_run = tmp_path / "full", tmp_path / "killed"
    full = _pipeline(_recipe(tmp_path / "full.yaml", full_run, corpus))
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]

    recipe = _recipe(tmp_path / "killed.yaml", killed_run, corpus)
    first = _pipeline(recipe)
    deadline = time.monotonic() + 300
    while not (killed_run / "pretrain" / "step-10").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the pretrain stage never wrote step-10"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    assert not (killed_run / "pretrain" / "final").exists(), "the stage finished before the kill; kill earlier"
    deadline = time.monotonic() + 10
    while _stage_processes(killed_run) and time.monotonic() < deadline:  # the stage dies with the pipeline
        time.sleep(0.1)
    assert not _stage_processes(killed_run)

    second = _pipeline(recipe)
    assert second.wait(timeout=600) == 0, second.stderr.read()[-3000:]
    for stage in ("pretrain", "more"):
        a = load_file(full_run / stage / "final" / "model.safetensors")
        b = load_file(killed_run / stage / "final" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        assert _losses(full_run / stage) == _losses(killed_run / stage), stage
        summary_a = json.loads((full_run / stage / "summary.json").read_text())
        summary_b = json.loads((killed_run / stage / "summary.json").read_text())
        assert summary_a["samples"] == summary_b["samples"], stage
    assert (killed_run / "report.html").exists()
