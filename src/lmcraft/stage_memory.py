"""The memory plan of a training stage's config, without loading weights (what `lmcraft plan` prints).

The stage's model is built from its config alone with the parameters on the meta device (config.json and the
safetensors headers), the config's PEFT method applied, the data read as the stage would to find the largest
micro-batch, and the planner's table made (`lmcraft.train.plan`): weights, gradients, optimizer state, activations
(measured on stand-ins of 1 and 2 layers) with and without checkpointing, LM-head loss, and what alignment stages
hold besides the model:

- reference policy (dpo except simpo/cpo/orpo, ppo, grpo with beta > 0): the model with its adapters disabled under
  PEFT (nothing extra), else a frozen copy of the weights (dpo's `reference: precompute` frees it before step 0);
- ppo: a reward-model or judge scorer's weights; the rollout's per-token buffers (old-policy and reference log-probs,
  values, rewards, advantages, returns: 6 x fp32);
- grpo: the rollout's old-policy (and, with beta > 0, reference) log-probs, fp32 per completion token.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from lmcraft.config import StageConfig
from lmcraft.errors import ConfigError

__all__ = ["TRAINING_STAGES", "plan_stage"]

TRAINING_STAGES = ("pretrain", "finetune", "sft", "reward", "dpo", "ppo", "grpo")
ROLLOUT_BUFFERS = 6  # fp32 values per rollout token in PPO: old and reference log-probs, values, rewards, adv., returns


def plan_stage(stage: str, cfg: StageConfig) -> Any:
    """The `MemoryPlan` of the stage `stage` run with the validated config `cfg`, its model on the meta device."""
    from lmcraft.train.plan import can_plan, plan_memory, resident_bytes, stand_in_activations

    build, shape, extras = _PLANNERS[stage](cfg)
    model = build(None)
    if not can_plan(model):
        raise ConfigError(f"{stage}: the planner knows models built on lmcraft's LanguageModel; this config builds "
                          f"a {type(model).__name__}")
    import torch

    from lmcraft.peft.training import is_peft
    from lmcraft.precision import resolve_precision
    from lmcraft.train.distributed import resolve_device
    from lmcraft.train.frozen import frozen_dtype_for, frozen_linears_in

    t = cfg.trainer
    runtime = resident_bytes()  # the model is on meta: all of it is the process's own
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device).precision
    frozen = frozen_dtype_for(t.frozen_dtype, precision, t.strategy, is_peft(model))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):  # as the Trainer runs
        per_token = stand_in_activations(build, _language_model(model).config.num_layers, t.activation_checkpointing)
        with frozen_linears_in(model, frozen) if frozen is not None else nullcontext():
            return plan_memory(model, shape, t.activation_checkpointing, t.chunked_loss, t.optimizer, extras(model),
                               per_token, runtime)


Builder = Callable[[int | None], Any]  # layers (None: as configured) -> the model, parameters on meta
Planner = Callable[[StageConfig], tuple[Builder, tuple[int, int], Callable[[Any], list[tuple[str, int]]]]]


def _language_model(model: Any) -> Any:
    inner = getattr(model, "module", model)
    return getattr(inner, "base_model", inner)


def _layers(cfg: StageConfig, layers: int | None) -> Any:
    """`cfg` with its first `layers` layers (None: as it is)."""
    import dataclasses

    if layers is None:
        return cfg
    return dataclasses.replace(cfg, num_layers=layers, nope_layers=tuple(i for i in cfg.nope_layers if i < layers),
                               layer_types=cfg.layer_types[:layers] if cfg.layer_types is not None else None)


def _weights_bytes(model: Any) -> int:
    uniq = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in uniq) + sum(b.numel() * b.element_size() for b in model.buffers())


def _folder_bytes(source: str, dtype: str | None = None) -> int:
    """Bytes of the weights of the model folder or asset `source` (from its config; nothing read)."""
    from lmcraft.align.modeling import model_folder
    from lmcraft.hub.load import folder_spec, model_on_meta

    return _weights_bytes(model_on_meta(*folder_spec(model_folder(source), dtype=dtype)))


# ------------------------------------------------------------------------------------------- alignment stages
def _alignment(stage: str) -> Planner:
    def planner(cfg: StageConfig) -> tuple[Builder, tuple[int, int], Callable[[Any], list[tuple[str, int]]]]:
        from lmcraft.align.modeling import load_stage_tokenizer, model_folder, reward_head, tokenizer_folder
        from lmcraft.hub.load import folder_spec, model_on_meta
        from lmcraft.peft.training import prepare_for_training

        source = cfg.model.from_
        head = reward_head(source)[0] if stage == "reward" else None
        mcfg, head, dtype = folder_spec(model_folder(source), head, cfg.model.dtype)
        tokenizer = load_stage_tokenizer(tokenizer_folder(source), cfg.template)

        def build(layers: int | None) -> Any:
            return prepare_for_training(model_on_meta(_layers(mcfg, layers), head, dtype), cfg.peft, head, 1).model

        rows, tokens = _alignment_batch(stage, cfg, tokenizer)
        return build, (rows, tokens), lambda model: _alignment_extras(stage, cfg, model, tokens)
    return planner


def _alignment_batch(stage: str, cfg: StageConfig, tokenizer: Any) -> tuple[int, int]:
    """(rows, tokens) of the stage's largest training micro-batch, from its data as the stage builds it."""
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.train.plan import largest_batch_shape

    micro = cfg.trainer.micro_batch_size
    if stage == "sft":
        from lmcraft.align.sft import build_sft_data, load_sft_conversations

        d = cfg.data
        convs, _ = load_sft_conversations(d)
        train = build_sft_data(convs, ChatFormatter(tokenizer, train_on=d.train_on), d.max_length, d.truncation,
                               d.packing)
    elif stage in ("reward", "dpo"):
        from lmcraft.align.reward import load_pairs

        formatter = ChatFormatter(tokenizer, train_on="last")
        if stage == "dpo" and cfg.dpo.loss == "kto":
            from lmcraft.align.dpo import load_unpaired

            train, _ = load_unpaired(cfg.data, formatter)
        else:
            train, _ = load_pairs(cfg.data, formatter)
    elif stage == "ppo":  # rollout rows: prompt + completion
        from lmcraft.align.ppo import load_ppo_prompts

        prompts, _ = load_ppo_prompts(cfg.prompts, ChatFormatter(tokenizer), cfg.ppo.rollout_batch_size)
        return micro, max(len(p["ids"]) for p in prompts) + cfg.ppo.max_new_tokens
    else:  # grpo: rows of prompt + completion
        from lmcraft.align.rewards import task_items

        items, _ = task_items(cfg.task)
        formatter = ChatFormatter(tokenizer)
        return micro, max(len(formatter.prompt_ids(i["messages"])) for i in items) + cfg.grpo.max_new_tokens
    shape = largest_batch_shape(train, micro, train.collate)
    if shape is None:
        raise ConfigError(f"{stage}: no training example to plan for")
    return shape


def _alignment_extras(stage: str, cfg: StageConfig, model: Any, tokens: int) -> list[tuple[str, int]]:
    from lmcraft.peft.training import is_peft

    extras = []
    copy = _weights_bytes(_language_model(model))
    reference = {"dpo": cfg.dpo.loss not in ("simpo", "cpo", "orpo") if stage == "dpo" else False,
                 "ppo": True, "grpo": stage == "grpo" and cfg.grpo.beta > 0}.get(stage, False)
    if reference:
        precomputed = stage == "dpo" and cfg.dpo.loss != "kto" and cfg.dpo.reference == "precompute"
        if is_peft(model):
            extras.append(("reference (adapters disabled)", 0))
        else:
            extras.append(("reference (log-probs precomputed)" if precomputed else "reference (frozen copy)",
                           0 if precomputed else copy))
    if stage == "ppo":
        if cfg.reward.kind != "rule":
            extras.append((f"{cfg.reward.kind} scorer (frozen)", _folder_bytes(cfg.reward.from_)))
        extras.append(("rollout buffers (old log-probs, values...)",
                       ROLLOUT_BUFFERS * 4 * cfg.ppo.rollout_batch_size * tokens))
    if stage == "grpo":
        g = cfg.grpo
        kept = 1 + (g.beta > 0)
        extras.append(("old-policy log-probs of a rollout", kept * 4 * g.rows * g.max_new_tokens))
    return extras


# ------------------------------------------------------------------------------------------- pretrain, finetune
def _pretrain(cfg: StageConfig) -> tuple[Builder, tuple[int, int], Callable[[Any], list[tuple[str, int]]]]:
    from lmcraft.hub.load import ParametersOnMeta
    from lmcraft.objectives import build_objective
    from lmcraft.pretrain.inputs import packed_folder, resolve_tokenizer
    from lmcraft.pretrain.model import model_config
    from lmcraft.tokenizer.load import load_tokenizer

    out = Path(cfg.output_dir)
    if cfg.tokenizer.train is not None and not (out / "tokenizer").is_dir():
        raise ConfigError("this run trains its tokenizer first, so its vocabulary is not known yet: run "
                          "`lmcraft tokenizer` and give tokenizer.path, or plan after the run has trained it")
    packed = packed_folder(cfg.data.packed) if cfg.data.packed is not None else None
    tokenizer = load_tokenizer(resolve_tokenizer(cfg, out, packed, progress=False))
    seq_len = cfg.data.seq_len
    objective = build_objective(cfg.objective.name, tokenizer, seq_len, **cfg.objective.options)
    mcfg, _ = model_config(cfg.model, tokenizer, seq_len, progress=False)

    def build(layers: int | None) -> Any:
        with ParametersOnMeta():
            return objective.build_model(_layers(mcfg, layers))

    return build, (cfg.trainer.micro_batch_size, seq_len), lambda model: []


def _finetune(cfg: StageConfig) -> tuple[Builder, tuple[int, int], Callable[[Any], list[tuple[str, int]]]]:
    import torch

    from lmcraft.assets import resolve, resolve_model
    from lmcraft.finetune.data import Collator, build_task_data
    from lmcraft.finetune.layers import freeze_parameters
    from lmcraft.finetune.tasks import make_task
    from lmcraft.hub.load import folder_spec, model_on_meta
    from lmcraft.peft.training import fit_head, prepare_for_training
    from lmcraft.tokenizer.load import load_tokenizer
    from lmcraft.train.plan import largest_batch_shape

    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolve(cfg.tokenizer) if cfg.tokenizer else folder)
    data = build_task_data(cfg.data, cfg.task, tokenizer)
    task = make_task(cfg.task, data.labels, **data.task_options)
    mcfg, head, _ = folder_spec(folder, task.head, torch.float32)

    def build(layers: int | None) -> Any:
        model = model_on_meta(_layers(mcfg, layers), head, torch.float32)
        if head in ("cls", "token_cls"):
            fit_head(model, data.num_labels, data.labels)
        model = prepare_for_training(model, cfg.peft, head, 1).model
        freeze_parameters(model, cfg.freeze.embeddings, min(cfg.freeze.bottom_layers, layers or mcfg.num_layers))
        return model

    shape = largest_batch_shape(data.train, cfg.trainer.micro_batch_size, Collator(cfg.task, data.pad_token_id))
    if shape is None:
        raise ConfigError("finetune: no training example to plan for")
    return build, shape, lambda model: []


_PLANNERS: dict[str, Planner] = {"pretrain": _pretrain, "finetune": _finetune,
                                 **{s: _alignment(s) for s in ("sft", "reward", "dpo", "ppo", "grpo")}}
