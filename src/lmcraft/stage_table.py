"""The CLI stages: name -> (module, one-line summary), in life-cycle order (what `lmcraft --help` lists).

Plain data with no imports, so the CLI's help and the pipeline's checks of stage names stay fast; a stage's
module (and torch) is imported only by `stage_module`, when that stage is used. Each stage module provides
`add_arguments(parser)` and `run(args) -> int | None`; a config-driven stage also has `config_class()`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["STAGES", "stage_config_class", "stage_module"]

# name -> (module, one-line summary). Keep in life-cycle order: this is what `--help` lists.
STAGES: dict[str, tuple[str, str]] = {
    "assets": ("lmcraft.stages.assets", "list / fetch the named offline models and data sets"),
    "prepare": ("lmcraft.stages.prepare", "clean, filter, deduplicate and pack a text corpus into token shards"),
    "tokenizer": ("lmcraft.stages.tokenizer", "train a BPE / WordPiece / Unigram tokenizer on a corpus"),
    "pretrain": ("lmcraft.stages.pretrain", "pre-train or keep pre-training a model (clm, mlm, nsp, sop, rtd, plm)"),
    "finetune": ("lmcraft.stages.finetune", "fine-tune on classification, NER, regression or text: full or PEFT"),
    "merge": ("lmcraft.stages.merge", "fold a PEFT adapter into its base model; write a Hugging Face folder"),
    "compare": ("lmcraft.stages.compare", "run one task with several fine-tuning methods; table + plot"),
    "plan": ("lmcraft.stages.plan", "will a training run fit? its memory plan from the config, no weights loaded"),
    "sft": ("lmcraft.stages.sft", "supervised instruction tuning on chat data (loss on assistant tokens)"),
    "reward": ("lmcraft.stages.reward", "train a reward model on preference pairs (Bradley-Terry)"),
    "ppo": ("lmcraft.stages.ppo", "RLHF with PPO against a reward model or rule (KL to a reference policy)"),
    "grpo": ("lmcraft.stages.grpo", "GRPO / DAPO / Dr.GRPO / RLOO on verifiable rewards (group advantages, "
             "no value model)"),
    "dpo": ("lmcraft.stages.dpo", "preference tuning: DPO / IPO / hinge / robust / SimPO / CPO / ORPO / KTO"),
    "distill": ("lmcraft.stages.distill", "knowledge distillation: a student trained on a teacher's token "
                "distributions (KL / reverse KL / GKD; on-policy; cached top-k teacher)"),
    "label-preferences": ("lmcraft.stages.label_preferences", "RLAIF: sample answers, rank them with an AI judge, "
                          "write preference pairs"),
    "convert": ("lmcraft.stages.convert", "convert a GGUF file into a Hugging Face-layout model folder"),
    "export": ("lmcraft.stages.export", "export a model or adapter as GGUF (f16, q8_0, q4_k_m, ...) + Modelfile"),
    "verify-export": ("lmcraft.stages.verify_export", "check an exported GGUF against its source model (table)"),
    "generate": ("lmcraft.stages.generate", "generate text from a model folder or asset name"),
    "serve": ("lmcraft.stages.serve", "OpenAI-compatible HTTP server (chat/completions, streaming, batching)"),
    "chat": ("lmcraft.stages.chat", "interactive multi-turn chat with a model (chat template)"),
    "eval": ("lmcraft.stages.eval", "evaluate prompting strategies on tasks; results JSON + markdown/HTML report"),
    "pipeline": ("lmcraft.stages.pipeline", "run the whole life cycle (a list of stages) and write one report"),
    "scaling": ("lmcraft.stages.scaling", "sweep model sizes / token budgets, fit scaling laws with CIs, plot"),
}


def stage_module(name: str) -> ModuleType:
    """The module of the stage `name` (imported now)."""
    return importlib.import_module(STAGES[name][0])


def stage_config_class(name: str) -> type | None:
    """The config class of the stage `name`, or None for a stage without one."""
    module = stage_module(name)
    return module.config_class() if hasattr(module, "config_class") else None
