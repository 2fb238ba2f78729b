"""PEFT core: method registry, `apply`, trainable-parameter accounting, adapter save/load and `merge`.

    model = apply(base, {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]})
    print_trainable_parameters(model)          # llama-14m: trainable params: 81,920 / total 14,637,440 (0.5597%)
    ... train ...
    save_adapter(model, "out/adapter")          # adapter_config.json + adapter_model.safetensors
    model = load_adapter(base, "out/adapter")   # the same adapter on a fresh base
    plain = merge(model)                        # weights folded in where the math allows

A method is a config dataclass (subclass of `MethodConfig`, registered by `method` name) whose `inject` adds
wrapper layers and/or a prefix/prompt provider to a `PeftModel` under an adapter name.

On disk. Methods Hugging Face PEFT also has (LoRA/DoRA/rsLoRA/QLoRA, AdaLoRA, IA3, prefix tuning, prompt tuning,
P-tuning) are written in PEFT's layout: `adapter_config.json` with exactly the keys PEFT 0.21 writes, and
`adapter_model.safetensors` with PEFT's tensor names (`base_model.model.<module path>.lora_A.weight`, or
`prompt_embeddings` for prompt-learning methods, which PEFT stores folded). `peft.PeftModel.from_pretrained` loads
them onto the matching transformers model, and PEFT's own adapters load here. The other methods (bottleneck
adapters, BitFit, P-tuning v2, UniPELT) use lmcraft's layout: `adapter_config.json` holds `lmcraft_method` and the
config fields; tensor names are the clean module paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmcraft.errors import ConfigError
from lmcraft.peft.model import AdapterLayer, PeftError, PeftModel
from lmcraft.peft.nf4 import NF4Linear

CONFIG_NAME = "adapter_config.json"
LMCRAFT_CONFIG_NAME = "lmcraft_config.json"  # full lmcraft config next to a PEFT-layout config that cannot hold it
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

REGISTRY: dict[str, type[MethodConfig]] = {}
PEFT_TYPES: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method config available by its `method` name (and its PEFT type)."""
    REGISTRY[cls.method] = cls
    if cls.peft_type and cls.peft_canonical:
        PEFT_TYPES[cls.peft_type] = cls
    return cls


@dataclass(kw_only=True)
class MethodConfig:
    """Base of every method config. `modules_to_save` names base modules (e.g. "head") trained as full copies."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None  # Hugging Face PEFT's name when the on-disk layout is PEFT's
    peft_canonical: ClassVar[bool] = True  # the class PEFT files of `peft_type` load as
    peft_lossless: ClassVar[bool] = True  # False: PEFT's config cannot hold all fields; lmcraft_config.json does
    modules_to_save: list[str] = field(default_factory=list)

    def inject(self, model: PeftModel, adapter: str) -> None:
        """Add this method's layers/provider to `model` under the name `adapter`."""
        raise NotImplementedError

    def regularization(self, model: PeftModel, adapter: str) -> torch.Tensor | None:
        """An extra loss term the method asks for (AdaLoRA's orthogonality penalty), or None."""
        return None

    # ---- plain dict (lmcraft layout, YAML configs) --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"method"})
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"peft method {cls.method!r}: unknown key(s) {', '.join(unknown)}.{hint} "
                              f"Allowed: {', '.join(sorted(names))}.")
        try:
            return cls(**{k: v for k, v in data.items() if k != "method"})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"peft method {cls.method!r}: {err}") from None

    # ---- Hugging Face PEFT layout (only for methods with a `peft_type`) ---------------------------
    def to_peft(self, model: PeftModel, adapter: str) -> dict[str, Any]:
        """adapter_config.json in PEFT's key set (without `base_model_name_or_path`)."""
        raise NotImplementedError

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> MethodConfig:
        raise NotImplementedError

    def peft_tensors(self, model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
        """adapter_model.safetensors contents under PEFT's names."""
        head = _head_name(model)
        return {PEFT_PREFIX + to_hf_name(k, head): v for k, v in adapter_state_dict(model, adapter).items()}

    def load_peft_tensors(self, model: PeftModel, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        head = _head_name(model)
        ours = {}
        for k, v in tensors.items():
            if not k.startswith(PEFT_PREFIX):
                raise PeftError(f"tensor {k!r} does not start with {PEFT_PREFIX!r}, as PEFT adapter tensors do")
            ours[from_hf_name(k[len(PEFT_PREFIX):], head)] = v
        load_adapter_state_dict(model, ours, adapter)


@dataclass(kw_only=True)
class PromptLearningConfig(MethodConfig):
    """Methods with a prefix/prompt provider; PEFT stores their folded table as one tensor `prompt_embeddings`."""

    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

    def peft_tensors(self, model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
        """`prompt_embeddings` (the folded table) plus any modules_to_save under PEFT names."""
        others = {k: v for k, v in super().peft_tensors(model, adapter).items()
                  if not k.startswith(PEFT_PREFIX + "provider.")}
        return {"prompt_embeddings": model.providers[adapter].table().detach(), **others}

    def load_peft_tensors(self, model: PeftModel, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        if "prompt_embeddings" not in tensors:
            raise PeftError(f"a PEFT prompt-learning adapter holds 'prompt_embeddings'; found {sorted(tensors)}")
        model.providers[adapter].load_table(tensors["prompt_embeddings"])
        others = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
        provider = {k: p.detach() for k, p in model.named_adapter_parameters(adapter) if k.startswith("provider.")}
        head = _head_name(model)
        ours = {from_hf_name(k[len(PEFT_PREFIX):], head): v for k, v in others.items()}
        load_adapter_state_dict(model, {**ours, **provider}, adapter)


def prompt_learning_dims(model: PeftModel, per_kv_head: bool) -> dict[str, Any]:
    """PEFT's num_layers / num_attention_heads / token_dim (prefix tuning counts key/value heads and width)."""
    c = model.base_model.config
    heads = c.num_kv_heads if per_kv_head else c.num_heads
    token_dim = c.num_kv_heads * c.head_dim if per_kv_head else c.hidden_size
    return {"num_attention_heads": heads, "num_layers": c.num_layers, "num_transformer_submodules": 1,
            "token_dim": token_dim}


def config_from_dict(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """`{"method": "lora", "r": 8}` -> `LoraConfig(r=8)`; a config object passes through."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a peft config needs a 'method' key; known methods: {', '.join(sorted(REGISTRY))}")
    method = data["method"]
    if method not in REGISTRY:
        raise ConfigError(f"unknown peft method {method!r}; known methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method].from_dict(data)


# ---- names: ours <-> Hugging Face (Llama family) ---------------------------------------------------
_HF_PARTS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_HF_HEADS = {"lm": "lm_head", "cls": "score", "reward": "score"}


_PEFT_TASKS = {"lm": "CAUSAL_LM", "cls": "SEQ_CLS", "reward": "SEQ_CLS", "token_cls": "TOKEN_CLS"}


def peft_task_type(model: PeftModel) -> str | None:
    """PEFT's `task_type` for the model's head (None = a bare model, e.g. an MLM encoder)."""
    return _PEFT_TASKS.get(getattr(model.base_model, "head_kind", "lm"))


def reject_unsupported(data: dict[str, Any], defaults: dict[str, Any], what: str) -> None:
    """Raise when a PEFT config uses a feature (a key with a non-default value) that lmcraft does not implement."""
    bad = [f"{k}={data[k]!r}" for k, d in defaults.items() if data.get(k, d) not in (d, None, {}, [])]
    if bad:
        raise PeftError(f"{what}: PEFT option(s) {', '.join(bad)} are not supported by lmcraft; "
                        f"re-create the adapter without them.")


def _head_name(model: PeftModel) -> str:
    return _HF_HEADS.get(getattr(model.base_model, "head_kind", "lm"), "head")


def peft_modules_to_save(model: PeftModel, names: list[str]) -> list[str] | None:
    """Our `modules_to_save` in Hugging Face module names (None when empty, as PEFT writes it)."""
    return [to_hf_name(n, _head_name(model)) for n in names] or None


def modules_to_save_from_peft(data: dict[str, Any]) -> list[str]:
    head = "score" if data.get("task_type") == "SEQ_CLS" else "lm_head"
    return [from_hf_name(n, head) for n in data.get("modules_to_save") or []]


def to_hf_name(name: str, head: str = "lm_head") -> str:
    """`head.weight` -> `lm_head.weight`, `...attn_norm...` -> `...input_layernorm...`; projections are unchanged."""
    parts = [_HF_PARTS.get(p, p) for p in name.split(".")]
    if parts[0] == "head":
        parts[0] = head
    return ".".join(parts)


def from_hf_name(name: str, head: str = "lm_head") -> str:
    inverse = {v: k for k, v in _HF_PARTS.items()}
    parts = [inverse.get(p, p) for p in name.split(".")]
    if parts[0] == head:
        parts[0] = "head"
    return ".".join(parts)


# ---- apply / trainable -------------------------------------------------------------------------------
def apply(model: nn.Module, cfg: MethodConfig | dict[str, Any], adapter_name: str = "default") -> PeftModel:
    """Add a PEFT method to `model`: freezes the base, adds the adapter, returns the `PeftModel` wrapper."""
    cfg = config_from_dict(cfg)
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.add_adapter(adapter_name, cfg)
    return peft_model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains: hand these to the optimizer."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); shared tensors count once and NF4 weights count as their full element count."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.weight_numel for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return `trainable params: X / total Y (Z%)`."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,} / total {total:,} ({100 * trainable / max(total, 1):.4f}%)"
    print(line)
    return line


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """The active adapter's extra loss term (e.g. AdaLoRA's weighted orthogonality penalty), or None."""
    if not isinstance(model, PeftModel) or model.active_adapter is None:
        return None
    return model.peft_configs[model.active_adapter].regularization(model, model.active_adapter)


# ---- state dicts -------------------------------------------------------------------------------------
def _require_peft(model: nn.Module, adapter: str | None) -> str:
    if not isinstance(model, PeftModel):
        raise PeftError(f"expected a model returned by lmcraft.peft.apply, got {type(model).__name__}")
    adapter = adapter or model.active_adapter
    if adapter not in model.peft_configs:
        raise PeftError(f"no adapter named {adapter!r}; adapters here: {', '.join(model.peft_configs) or '(none)'}")
    return adapter


def adapter_state_dict(model: PeftModel, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under clean names (`model.layers.0.self_attn.q_proj.lora_A.weight`, `provider.*`)."""
    adapter = _require_peft(model, adapter)
    return {n: p.detach() for n, p in model.named_adapter_parameters(adapter)}


def load_adapter_state_dict(model: PeftModel, state: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Copy `state` (clean names) into the adapter's parameters; every name must match in both directions."""
    adapter = _require_peft(model, adapter)
    params = dict(model.named_adapter_parameters(adapter))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise PeftError(f"adapter tensors do not fit adapter {adapter!r}: missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if value.shape != p.shape:
                raise PeftError(f"adapter tensor {name}: shape {tuple(value.shape)} in the file, "
                                f"{tuple(p.shape)} in the model")
            p.copy_(value.to(p.dtype))


# ---- files ---------------------------------------------------------------------------------------------
def _write_files(directory: Path, files: dict[str, Any]) -> None:
    """Write {name: dict (JSON) | tensors (safetensors)} into `directory`, each file atomically (temp + rename).

    Other files in the folder are kept, except a stale lmcraft_config.json, which would override the new config.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = directory / f".tmp-{name}-{os.getpid()}"
        if name.endswith(".json"):
            tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in content.items()}, str(tmp))
        os.replace(tmp, directory / name)
    if LMCRAFT_CONFIG_NAME not in files:
        (directory / LMCRAFT_CONFIG_NAME).unlink(missing_ok=True)


def save_adapter(model: PeftModel, directory: str | os.PathLike[str], adapter: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write one adapter (default: the active one) to `directory`; see the module docstring for the layout."""
    adapter = _require_peft(model, adapter)
    cfg = model.peft_configs[adapter]
    files: dict[str, Any] = {}
    if cfg.peft_type:
        files[CONFIG_NAME] = {**cfg.to_peft(model, adapter), "base_model_name_or_path": base_model_name_or_path}
        files[WEIGHTS_NAME] = cfg.peft_tensors(model, adapter)
        if not cfg.peft_lossless:
            files[LMCRAFT_CONFIG_NAME] = cfg.to_dict()
    else:
        files[CONFIG_NAME] = {"lmcraft_method": cfg.method, "base_model_name_or_path": base_model_name_or_path,
                              **dataclasses.asdict(cfg)}
        files[WEIGHTS_NAME] = adapter_state_dict(model, adapter)
    directory = Path(directory)
    _write_files(directory, files)
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PeftError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None


def read_adapter_config(directory: str | os.PathLike[str]) -> tuple[MethodConfig, bool]:
    """(method config, whether the tensors are in PEFT's layout) of an adapter folder."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise PeftError(f"{path}: adapter config not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = _read_json(path)
    data.pop("base_model_name_or_path", None)
    if "lmcraft_method" in data:
        return config_from_dict({"method": data.pop("lmcraft_method"), **data}), False
    if (directory / LMCRAFT_CONFIG_NAME).is_file():
        return config_from_dict(_read_json(directory / LMCRAFT_CONFIG_NAME)), True
    peft_type = data.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise PeftError(f"{path}: peft_type {peft_type!r} is not supported; supported: {', '.join(PEFT_TYPES)}")
    return PEFT_TYPES[peft_type].from_peft(data), True


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = "default") -> PeftModel:
    """Add the adapter stored in `directory` to `model` (a base model or a `PeftModel`) and activate it."""
    directory = Path(directory)
    cfg, peft_layout = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise PeftError(f"{weights}: adapter weights not found")
    tensors = load_file(str(weights))
    peft_model = apply(model, cfg, adapter_name)
    if peft_layout:
        cfg.load_peft_tensors(peft_model, adapter_name, tensors)
    else:
        load_adapter_state_dict(peft_model, tensors, adapter_name)
    peft_model.set_adapter(adapter_name)  # loading may have replaced parameters (AdaLoRA ranks, folded prompts)
    return peft_model


# ---- merge ---------------------------------------------------------------------------------------------
def merge(model: PeftModel, adapter: str | None = None) -> nn.Module:
    """Fold adapter `adapter` (default: active) into the model and drop every wrapper and other adapter.

    Weight methods (LoRA, DoRA, QLoRA, AdaLoRA, IA3, BitFit, modules_to_save) become plain base weights and the
    bare base model is returned. Prefix/prompt methods cannot enter the weights; their reparameterisation (prefix
    MLP, P-tuning encoder) is folded into a plain table and the `PeftModel` is returned. Bottleneck adapters and
    UniPELT's gates depend non-linearly on the input and raise `PeftError`.
    """
    adapter = _require_peft(model, adapter)
    layers = sorted(model.adapter_layers(), key=lambda item: -item[0].count("."))
    replacements = [(path, layer.merged(adapter)) for path, layer in layers]  # raises before anything changes
    for path, new in replacements:
        parent_path, _, attr = path.rpartition(".")
        setattr(model.base_model.get_submodule(parent_path), attr, new)
    for p in model.base_model.parameters():
        p.requires_grad_(False)
    for name in list(model.peft_configs):
        if name != adapter:
            model.delete_adapter(name)
    if adapter not in model.providers:
        return model.base_model
    model.providers[adapter].fold()
    model.set_adapter(adapter)
    return model


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "REGISTRY",
    "AdapterLayer",
    "MethodConfig",
    "PeftError",
    "PeftModel",
    "adapter_state_dict",
    "apply",
    "config_from_dict",
    "count_parameters",
    "load_adapter",
    "load_adapter_state_dict",
    "merge",
    "print_trainable_parameters",
    "read_adapter_config",
    "regularization_loss",
    "register",
    "save_adapter",
    "trainable_parameters",
]
