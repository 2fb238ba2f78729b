"""SimPO of SmolLM2-135M-Instruct (LoRA) on dpo_en_demo, scored on held-out pairs before and after (markdown table).

    nice -n 10 python docs/results/align-simpo-eval.py OUT_DIR > docs/results/align-simpo-smollm2.md

The demo's preference data (asset dpo-en-demo, 300 pairs): pairs 0-199 may be trained on, pairs 200-263 are held
out (sizes chosen so the whole script fits 8 minutes on a shared 2-core CPU). Held-out reward accuracy: the fraction
of held-out pairs whose chosen answer has the higher SimPO reward beta * avg log pi(y|x) (per-token average log-prob
of the answer), with a 95% Wilson interval; the change is a paired bootstrap over the held-out pairs (10,000
resamples, 95% percentile interval), as is the change in the mean margin
avg log pi(y_c|x) - avg log pi(y_r|x).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcraft.align.data import load_preferences
from lmcraft.align.instruct import ChatFormatter
from lmcraft.align.modeling import load_stage_tokenizer, load_start_model
from lmcraft.align.reward import build_pair_data
from lmcraft.data.records import read_records
from lmcraft.evaluate import wilson_interval
from lmcraft.io import write_json
from lmcraft.objectives.lm_head import model_sequence_logprobs, scored_batches
from lmcraft.stages.dpo import config_class, run_dpo

TRAIN, HELD_OUT = range(0, 200), range(200, 264)
MAX_LENGTH = 96
STEPS = 12


def config(out: Path, train_file: Path) -> dict[str, Any]:
    return {"model": {"from": "smollm2-135m-instruct", "threads": 2},
            "peft": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": [str(train_file)], "limit": 48, "max_length": MAX_LENGTH},
            "dpo": {"loss": "simpo", "beta": 2.0, "gamma": 0.5},
            "trainer": {"lr": 5.0e-4, "max_steps": STEPS, "micro_batch_size": 2, "warmup_steps": 2, "save_every": STEPS,
                        "log_every": 1, "progress": False, "tensorboard": False, "plot": False},
            "output_dir": str(out / "simpo")}


def average_logps(model_source: str | Path, held_out: Path) -> np.ndarray:
    """(pairs, 2) per-token average answer log-probs (chosen, rejected) of the held-out pairs under a model."""
    model, tok_dir = load_start_model(model_source)
    formatter = ChatFormatter(load_stage_tokenizer(tok_dir), train_on="last")
    data = build_pair_data(load_preferences([held_out]), formatter, MAX_LENGTH)

    def score(rows: slice) -> np.ndarray:
        batch = data.collate(data.items[rows])
        logps, counts = model_sequence_logprobs(model, batch["labels"], input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"])
        b = logps.shape[0] // 2
        avg = (logps / counts).double().numpy()
        return np.stack([avg[:b], avg[b:]], axis=1)

    return np.concatenate(scored_batches(model, len(data), 8, score))


def paired_interval(before: np.ndarray, after: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(before), size=(10_000, len(before)))
    diffs = after[idx].mean(1) - before[idx].mean(1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    pairs = [r.fields for r in read_records("asset:dpo-en-demo/dpo_en_demo.json")]
    train_file, held_file = out / "train.json", out / "held_out.json"
    write_json(train_file, [pairs[i] for i in TRAIN])
    write_json(held_file, [pairs[i] for i in HELD_OUT])
    cfg = config_class().model_validate(config(out, train_file))
    t0, c0 = time.perf_counter(), time.process_time()
    before = average_logps("smollm2-135m-instruct", held_file)
    t1 = time.perf_counter()
    summary = run_dpo(cfg)
    history = [json.loads(r) for r in (out / "simpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if r["split"] == "train"]
    t2 = time.perf_counter()
    after = average_logps(out / "simpo" / "final", held_file)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(before)
    rows = []
    for name, m in (("start (SmolLM2-135M-Instruct)", before), (f"after SimPO ({STEPS} steps)", after)):
        wins = int((m[:, 0] > m[:, 1]).sum())
        lo, hi = wilson_interval(wins, n)
        margin = m[:, 0] - m[:, 1]
        rows.append(f"| {name} | {wins}/{n} = {wins / n:.3f} [{lo:.3f}, {hi:.3f}] | {margin.mean():+.4f} |")
    acc_b, acc_a = (before[:, 0] > before[:, 1]).astype(float), (after[:, 0] > after[:, 1]).astype(float)
    d_lo, d_hi = paired_interval(acc_b, acc_a)
    m_b, m_a = before[:, 0] - before[:, 1], after[:, 0] - after[:, 1]
    g_lo, g_hi = paired_interval(m_b, m_a)
    print(f"""# SimPO of SmolLM2-135M-Instruct (LoRA) on dpo_en_demo: held-out reward accuracy before and after

`python docs/results/align-simpo-eval.py OUT` (under `nice -n 10`, on the shared 2-core CPU machine, 2 torch threads):
`lmcraft dpo` with `dpo.loss: simpo` (beta 2, gamma 0.5, no reference model), LoRA r8 on q/v, lr 5e-4, {STEPS} steps x 2
pairs from the first {cfg.data.limit} of pairs 0-199 (sequences <= {MAX_LENGTH} tokens); held out: pairs 200-263 of the
asset dpo-en-demo ({n} pairs after tokenisation). Reward accuracy = fraction of held-out pairs where the chosen answer
has the higher per-token average log-prob (the SimPO reward up to beta); 95% Wilson intervals; margin = mean of
avg log pi(y_c|x) - avg log pi(y_r|x).

| policy | held-out reward accuracy [95% CI] | mean margin |
|---|---|---|
{rows[0]}
{rows[1]}

Change (paired bootstrap over the {n} held-out pairs, 95%): accuracy {acc_a.mean() - acc_b.mean():+.3f}
[{d_lo:+.3f}, {d_hi:+.3f}], margin {m_a.mean() - m_b.mean():+.4f} [{g_lo:+.4f}, {g_hi:+.4f}].

Training: {summary['step']} steps, train loss (mean of 2 pairs) {losses[0]:.3f} at step 1, {losses[-1]:.3f} at
step {len(losses)} (mean of the last 4: {np.mean(losses[-4:]):.3f}).
Times: scoring before {t1 - t0:.0f} s, training {t2 - t1:.0f} s, whole script {wall:.0f} s wall / {cpu:.0f} s CPU
(other jobs shared the machine).
""")


if __name__ == "__main__":
    main()
