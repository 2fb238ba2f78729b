"""Fine-tuning: task data, heads, losses and metrics, freezing / gradual unfreezing / LLRD, merge and compare.

    from lmcraft.config import load_config
    from lmcraft.finetune.config import FinetuneConfig
    from lmcraft.finetune.runner import run_finetune
    results = run_finetune(load_config(FinetuneConfig, "recipes/finetune-minilm-spam.yaml"))

Modules: config (the stage configs), records + emails + data (reading and tokenising task data), tasks
(losses, predictions, metrics), evaluation (the trainer's loss_fn/eval_fn), layers (parameter depth, LLRD,
freezing, gradual unfreezing), heads (dropout), profiling (memory and speed), runner (one run), merge
(adapter -> full model), compare (many methods, one table and plot). PEFT wiring and the final save are
lmcraft.peft.training's; the chunked LM-head loss is lmcraft.objectives.lm_head's. The stages `lmcraft finetune`,
`lmcraft merge` and `lmcraft compare` are thin wrappers around them.
"""
