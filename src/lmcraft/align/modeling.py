"""Model wiring shared by the alignment stages: load a starting model, add a PEFT method, checkpoint, save.

Where a stage starts (`model.from`): a Hugging Face folder, a model asset name, a .gguf file, or the output of an
earlier lmcraft stage. An adapter folder (adapter_config.json, e.g. `runs/sft/final` after LoRA SFT) is loaded onto
its base model (`base_model_name_or_path`) and merged into it, so the next stage starts from exactly the SFT model:
its reference policy (adapters disabled, or a frozen copy) is then the SFT model. The base may itself be an adapter
folder (a DPO adapter trained on top of a LoRA SFT run records the SFT adapter folder as its base), so chains of
stages need no merged copies on disk; `save.merge: true` writes a standalone merged model for other tools. Methods
whose adapters cannot be merged (prefix/prompt tuning, bottleneck adapters) cannot be continued this way; the error
says so.

Checkpoints of PEFT runs hold only the trainable tensors (adapters, value/reward heads) in
adapter_model.safetensors, loaded onto the same frozen base on resume. The final model is a Hugging Face folder
(full fine-tuning) or a PEFT adapter folder, with the tokenizer files and the chat template either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.errors import ConfigError, LmcraftError

if TYPE_CHECKING:
    from torch import nn

    from lmcraft.tokenizer.load import Tokenizer
    from lmcraft.train import Callback, LossOutput, TrainerConfig, WeightsFormat

__all__ = [
    "add_peft",
    "base_source_of",
    "checkpoint_format",
    "is_peft",
    "load_start_model",
    "load_stage_tokenizer",
    "peft_callbacks",
    "planned_steps",
    "reward_head",
    "tokenizer_folder",
    "save_final",
    "unwrap",
    "with_regularization",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP/FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def is_peft(model: nn.Module) -> bool:
    from lmcraft.peft import PeftModel

    return isinstance(unwrap(model), PeftModel)


def _adapter_base(folder: Path) -> str:
    data = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = data.get("base_model_name_or_path")
    if not base:
        raise LmcraftError(f"{folder / 'adapter_config.json'}: base_model_name_or_path is empty, so the base model of "
                           "this adapter is unknown; give the base folder or asset as model.from and the adapter via "
                           "a stage that loads adapters")
    return str(base)


def _model_folder(source: str | Path) -> Path:
    """The Hugging Face folder at the root of `source` (following adapter folders to their bases)."""
    from lmcraft.assets import resolve_model

    path = Path(str(source)).expanduser()
    return _model_folder(_adapter_base(path)) if (path / "adapter_config.json").is_file() else resolve_model(source)


def tokenizer_folder(source: str | Path) -> Path:
    """The folder whose tokenizer a model loaded from `source` uses (an adapter folder's own, else its base's)."""
    from lmcraft.assets import resolve_model

    path = Path(str(source)).expanduser()
    if (path / "adapter_config.json").is_file():
        return path if (path / "tokenizer.json").is_file() else tokenizer_folder(_adapter_base(path))
    return resolve_model(source)


def reward_head(source: str | Path) -> tuple[str, int | None]:
    """(head, num_labels) of a reward model built on `source`: the scalar `reward` head of decoders (last real token),
    or for encoders a one-label `cls` head (pooled [CLS]), the layout Hugging Face knows for BERT."""
    from lmcraft.hub import load_config

    return ("reward", None) if load_config(_model_folder(source)).arch == "decoder" else ("cls", 1)


def load_start_model(source: str | Path, head: str | None = None, dtype: str | None = None,
                     device: str | None = None, num_labels: int | None = None) -> tuple[nn.Module, Path]:
    """(model in eval mode, folder holding its tokenizer) for a model folder, asset, .gguf or adapter folder.

    Adapter folders are merged into their base (see the module docstring); `head` is passed to `hub.load_model`, and
    a `cls` head gets `num_labels` outputs when given.
    """
    from lmcraft.assets import resolve_model
    from lmcraft.hub import load_model

    path = Path(str(source)).expanduser()
    if (path / "adapter_config.json").is_file():
        import warnings

        from lmcraft import peft
        from lmcraft.hub import HubWarning

        with warnings.catch_warnings():
            if json.loads((path / "adapter_config.json").read_text()).get("modules_to_save"):
                # the adapter carries the trained head: the base's fresh head is replaced below
                warnings.filterwarnings("ignore", message=".*newly initialised", category=HubWarning)
            base, _ = load_start_model(_adapter_base(path), head, dtype, device, num_labels)
        merged = peft.merge(peft.load_adapter(base, path))
        if isinstance(merged, peft.PeftModel):
            method = merged.peft_configs[merged.active_adapter].method
            raise LmcraftError(f"{path}: a {method} adapter cannot be merged into its base model, so a new stage "
                               "cannot start from it; train the earlier stage with a mergeable method (LoRA, DoRA, "
                               "IA3, BitFit, AdaLoRA) or full fine-tuning")
        return merged.eval(), tokenizer_folder(path)
    folder = resolve_model(source)
    model = load_model(folder, head=head, dtype=dtype, device=device)
    if num_labels is not None and model.head_kind == "cls":
        from lmcraft.finetune.heads import fit_head

        fit_head(model, num_labels)
    return model, folder


def load_stage_tokenizer(folder: Path, template: str | None = None) -> Tokenizer:
    """The tokenizer of `folder`, its chat template replaced by `template` (Jinja source, a .jinja file or a built-in
    name) when given. The Jinja source (never a built-in's name) is stored on the tokenizer, so that saving it saves
    a template other tools can run."""
    from lmcraft.tokenizer.chat import resolve_template
    from lmcraft.tokenizer.load import load_tokenizer

    tok = load_tokenizer(folder)
    if template is not None:
        file = Path(template).expanduser()
        tok.chat_template = file.read_text(encoding="utf-8") if template.endswith(".jinja") and file.is_file() \
            else template
    if tok.chat_template is None:
        raise ConfigError(f"{folder}: the tokenizer has no chat template; set `template:` to a built-in name "
                          "(chatml, llama3, zephyr, alpaca), a .jinja file or Jinja source")
    tok.chat_template = resolve_template(tok.chat_template)
    return tok


def planned_steps(trainer: TrainerConfig, num_examples: int) -> int:
    """Optimizer steps the trainer will run over `num_examples` (one process), as `Trainer.total_steps` counts them."""
    if trainer.max_steps is not None:
        return trainer.max_steps
    batches = num_examples // trainer.micro_batch_size
    return -(-trainer.epochs * batches // trainer.grad_accum)


def add_peft(model: nn.Module, peft_cfg: dict[str, Any] | None, total_steps: int) -> nn.Module:
    """Apply the PEFT method of `peft_cfg` (None = full fine-tuning: everything trains).

    As in `lmcraft finetune` (`finetune.adapters.method_config`): a head other than the LM head (the new reward
    head) trains as a full copy next to the adapter, and AdaLoRA's `total_step` defaults to the run's steps.
    """
    if peft_cfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from lmcraft import peft
    from lmcraft.finetune.adapters import method_config

    return peft.apply(model, method_config(peft_cfg, getattr(model, "head_kind", "lm"), total_steps))


def checkpoint_format(model: nn.Module) -> WeightsFormat:
    """Whole state dict when everything trains (full fine-tuning); else only the trainable tensors (adapters, new
    heads, PPO's value head) in adapter_model.safetensors, which load back onto the same frozen base."""
    from lmcraft.finetune.adapters import AdapterWeights
    from lmcraft.train import WeightsFormat

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return WeightsFormat() if len(trainable) == len(list(model.parameters())) else AdapterWeights(trainable)


def with_regularization(loss_fn: Callable[[nn.Module, Any], LossOutput], peft_model: nn.Module
                        ) -> Callable[[nn.Module, Any], LossOutput]:
    """Add the PEFT method's regularizer R (AdaLoRA's orthogonality penalty) to a summed loss: the micro-batch adds
    R * num_targets, so that the trainer's division by the targets adds exactly R to the mean loss."""
    from lmcraft import peft

    if peft.regularization_loss(peft_model) is None:
        return loss_fn

    def wrapped(model: nn.Module, batch: Any) -> LossOutput:
        out = loss_fn(model, batch)
        reg = peft.regularization_loss(peft_model)
        out.loss_sum = out.loss_sum + reg * out.num_targets
        out.metrics = {**out.metrics, "peft_reg": reg.detach()}
        return out

    return wrapped


def peft_callbacks(model: nn.Module) -> list[Callback]:
    """AdaLoRA's rank allocator (`finetune.adapters.AdaLoraAllocator`) when `model` carries an AdaLoRA adapter."""
    from lmcraft import peft
    from lmcraft.finetune.adapters import AdaLoraAllocator

    m = unwrap(model)
    if isinstance(m, peft.PeftModel) and isinstance(m.peft_configs.get(m.active_adapter), peft.AdaLoraConfig):
        return [AdaLoraAllocator(m)]
    return []


def save_final(model: nn.Module, out_dir: Path, tokenizer: Tokenizer, base_source: str | None,
               merge: bool = False) -> dict[str, str]:
    """Write the trained model to `out_dir/final` (HF folder, or PEFT adapter folder) with the tokenizer and chat
    template; with `merge` and a mergeable adapter also `out_dir/merged` (a full HF folder). Returns the paths."""
    from lmcraft import hub, peft

    final = out_dir / "final"
    paths = {"final": str(final)}
    m = unwrap(model)
    if isinstance(m, peft.PeftModel):
        peft.save_adapter(m, final, base_model_name_or_path=base_source)
        tokenizer.save(final)
        if merge:
            merged = peft.merge(m)
            if isinstance(merged, peft.PeftModel):
                raise LmcraftError(f"save.merge: a {m.peft_configs[m.active_adapter].method} adapter cannot be merged "
                                   "into the base weights; the adapter is in " + str(final))
            hub.save_model(merged, out_dir / "merged")
            tokenizer.save(out_dir / "merged")
            paths["merged"] = str(out_dir / "merged")
    else:
        hub.save_model(m, final)
        tokenizer.save(final)
    return paths


def base_source_of(source: str | Path) -> str:
    """What an adapter trained from `source` records as its base: an asset name as given, else the absolute path
    (of a model folder, .gguf file, or an earlier stage's adapter folder)."""
    from lmcraft.assets import REGISTRY

    text = str(source)
    return text if text in REGISTRY else str(Path(text).expanduser().resolve())
