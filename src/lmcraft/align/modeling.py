"""Start models of the alignment stages: load a starting model (asset, folder, .gguf, adapter chain), its tokenizer.

Where a stage starts (`model.from`): a Hugging Face folder, a model asset name, a .gguf file, or the output of an
earlier lmcraft stage. An adapter folder (adapter_config.json, e.g. `runs/sft/final` after LoRA SFT) is loaded onto
its base model (`base_model_name_or_path`) and merged into it, so the next stage starts from exactly the SFT model:
its reference policy (adapters disabled, or a frozen copy) is then the SFT model. The base may itself be an adapter
folder (a DPO adapter trained on top of a LoRA SFT run records the SFT adapter folder as its base), so chains of
stages need no merged copies on disk; `save.merge: true` writes a standalone merged model for other tools. Methods
whose adapters cannot be merged (prefix/prompt tuning, bottleneck adapters) cannot be continued this way; the error
says so.

PEFT wiring, checkpoint format and the final save are lmcraft.peft.training's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmcraft.errors import ConfigError, LmcraftError
from lmcraft.io import read_json

if TYPE_CHECKING:
    from torch import nn

    from lmcraft.tokenizer.load import Tokenizer
    from lmcraft.train import TrainerConfig

__all__ = ["base_source_of", "load_start_model", "load_stage_tokenizer", "model_folder", "planned_steps", "reward_head",
           "tokenizer_folder"]


def _adapter_base(folder: Path) -> str:
    data = read_json(folder / "adapter_config.json")
    base = data.get("base_model_name_or_path")
    if not base:
        raise LmcraftError(f"{folder / 'adapter_config.json'}: base_model_name_or_path is empty, so the base model of "
                           "this adapter is unknown; give the base folder or asset as model.from and the adapter via "
                           "a stage that loads adapters")
    return str(base)


def model_folder(source: str | Path) -> Path:
    """The Hugging Face folder at the root of `source` (following adapter folders to their bases)."""
    from lmcraft.assets import resolve_model

    path = Path(str(source)).expanduser()
    return model_folder(_adapter_base(path)) if (path / "adapter_config.json").is_file() else resolve_model(source)


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

    return ("reward", None) if load_config(model_folder(source)).arch == "decoder" else ("cls", 1)


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
            if read_json(path / "adapter_config.json").get("modules_to_save"):
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
        from lmcraft.peft.training import fit_head

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


def base_source_of(source: str | Path) -> str:
    """What an adapter trained from `source` records as its base: an asset name as given, else the absolute path
    (of a model folder, .gguf file, or an earlier stage's adapter folder)."""
    from lmcraft.assets import REGISTRY

    text = str(source)
    return text if text in REGISTRY else str(Path(text).expanduser().resolve())
