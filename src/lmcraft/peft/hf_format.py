"""Hugging Face PEFT's on-disk layout: `adapter_config.json` dictionaries and tensor names, for every method PEFT has.

LoRA/DoRA/rsLoRA/QLoRA, AdaLoRA, IA3, prefix tuning, prompt tuning and P-tuning are written as PEFT 0.21 writes
them: the config holds exactly PEFT's keys (the keys every method shares are written once, in `common_keys`), and
tensors are named `base_model.model.<HF module path>.<adapter tensor>` (`...q_proj.lora_A.weight`), or
`prompt_embeddings` for prompt-learning methods, which PEFT stores folded. Module paths are mapped to the model
family's Hugging Face names through the `hub/names.py` tables (`attn_norm` -> `input_layernorm`, `head` -> `lm_head`).

`PEFT_LAYOUTS` says, per method config class, which PEFT type it is saved as, how its config is written, and whether
PEFT's config holds every field (QLoRA's quantisation does not fit; `io.py` writes lmcraft_config.json beside it).
Reading uses the canonical class of each PEFT type (a PEFT "LORA" file becomes a `LoraConfig`, with `use_dora`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmcraft.peft.adalora import AdaLoraConfig, svd_layers, triplet_key
from lmcraft.peft.ia3 import IA3Config
from lmcraft.peft.layers import ModulesToSave, PeftError, base_modules, clean_path, hf_module_names
from lmcraft.peft.lora import DoraConfig, LoraConfig, LoRAExperts
from lmcraft.peft.model import PeftModel, adapter_state_dict, load_adapter_state_dict
from lmcraft.peft.prefix import PrefixConfig
from lmcraft.peft.prompt import PromptConfig
from lmcraft.peft.ptuning import PTuningConfig
from lmcraft.peft.qlora import QLoraConfig
from lmcraft.peft.registry import MethodConfig, PromptLearningConfig

PEFT_PREFIX = "base_model.model."
PEFT_TASKS = {"lm": "CAUSAL_LM", "cls": "SEQ_CLS", "reward": "SEQ_CLS", "token_cls": "TOKEN_CLS", "qa": "QUESTION_ANS"}

# PEFT 0.21 LoraConfig keys lmcraft does not implement, with their neutral values.
LORA_UNSUPPORTED = {"bias": "none", "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                    "alpha_pattern": {}, "lora_bias": False, "use_qalora": False, "layer_replication": None,
                    "trainable_token_indices": None, "exclude_modules": None,
                    "alora_invocation_tokens": None, "use_bdlora": None, "fan_in_fan_out": False}


def peft_task_type(model: PeftModel) -> str | None:
    """PEFT's `task_type` for the model's head (None = a bare model, e.g. an MLM encoder)."""
    return PEFT_TASKS.get(getattr(model.base_model, "head_kind", "lm"))


def reject_unsupported(data: dict[str, Any], defaults: dict[str, Any], what: str) -> None:
    """Raise when a PEFT config uses a feature (a key with a non-default value) that lmcraft does not implement."""
    bad = [f"{k}={data[k]!r}" for k, d in defaults.items() if data.get(k, d) not in (d, None, {}, [])]
    if bad:
        raise PeftError(f"{what}: PEFT option(s) {', '.join(bad)} are not supported by lmcraft; "
                        f"re-create the adapter without them.")


# ---- names ---------------------------------------------------------------------------------------------------
def _hf_param_name(model: PeftModel, name: str) -> str:
    """One base-model parameter name (`head.weight`) in HF spelling (`lm_head.weight`); unchanged when unmapped."""
    module, _, param = name.rpartition(".")
    hf = hf_module_names(model.base_model)(module) if module else None
    return f"{hf}.{param}" if hf is not None else name


def peft_tensor_names(model: PeftModel, adapter: str) -> dict[str, str]:
    """Our clean adapter tensor name -> PEFT's name (without `base_model.model.`).

    Adapter tensors keep their local name after the HF path of the module they adapt; the tensors of a
    `modules_to_save` copy are base parameters and map one by one. A module packed into a larger HF one (GPT-2's
    q/k/v in `c_attn`) has no PEFT name of its own and keeps ours.
    """
    hf_module = hf_module_names(model.base_model)
    names: dict[str, str] = {}
    for path, layer in model.adapter_layers():
        module = clean_path(path)
        for local, _ in layer.adapter_parameters(adapter):
            ours = f"{module}.{local}"
            if isinstance(layer, ModulesToSave):
                names[ours] = _hf_param_name(model, ours)
            else:
                peft_local = LoRAExperts.PEFT_NAMES.get(local, local) if isinstance(layer, LoRAExperts) else local
                names[ours] = f"{hf_module(module) or module}.{peft_local}"
    counts: dict[str, int] = {}
    for hf in names.values():
        counts[hf] = counts.get(hf, 0) + 1
    return {ours: hf if counts[hf] == 1 else ours for ours, hf in names.items()}


def peft_modules_to_save(model: PeftModel, names: list[str]) -> list[str] | None:
    """Our `modules_to_save` in Hugging Face module names (None when empty, as PEFT writes it).

    A module without an HF name of its own (a classification head that HF stores as `score`) becomes the HF
    modules of its parameters.
    """
    hf_module = hf_module_names(model.base_model)
    params = [f"{clean_path(path)}.{name}" for path, module in base_modules(model.base_model) if path
              for name, _ in module.named_parameters(recurse=False)]
    out: list[str] = []
    for name in names:
        direct = hf_module(name)
        parts = [direct] if direct is not None else [
            _hf_param_name(model, p).rpartition(".")[0] for p in params if p.startswith(name + ".")]
        out = list(dict.fromkeys([*out, *(parts or [name])]))  # a module's weight and bias name it twice
    return out or None


def modules_to_save_from_peft(data: dict[str, Any]) -> list[str]:
    """PEFT's `modules_to_save` as written: `lmcraft.peft` accepts Hugging Face module names wherever it takes names."""
    return list(data.get("modules_to_save") or [])


# ---- config dictionaries ---------------------------------------------------------------------------------------
def common_keys(model: PeftModel, cfg: MethodConfig, peft_type: str) -> dict[str, Any]:
    """The keys every PEFT method config holds (`base_model_name_or_path` is added when saving)."""
    return {"auto_mapping": None, "inference_mode": True,
            "modules_to_save": peft_modules_to_save(model, cfg.modules_to_save), "peft_type": peft_type,
            "revision": None, "task_type": peft_task_type(model)}


def prompt_learning_keys(model: PeftModel, cfg: PromptLearningConfig, per_kv_head: bool) -> dict[str, Any]:
    """PEFT's prompt-learning keys: `num_virtual_tokens` and the model's dimensions (prefix tuning counts key/value
    heads and width)."""
    c = model.base_model.config
    heads = c.num_kv_heads if per_kv_head else c.num_heads
    token_dim = c.num_kv_heads * c.head_dim if per_kv_head else c.hidden_size
    return {"num_attention_heads": heads, "num_layers": c.num_layers, "num_transformer_submodules": 1,
            "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": token_dim}


# A mixture-of-experts layer's parts that transformers holds as bare parameters, not nn.Linear: PEFT adapts them
# through `target_parameters` (module path after `model.layers.{i}.` + parameter). Our target name -> those.
_MOE_PARAMETERS = {"experts": tuple(f"mlp.experts.{p}" for p in LoRAExperts.PARAMS), "gate": ("mlp.gate.weight",)}
_LAYER = re.compile(r"model\.layers\.\d+\.")


def _peft_targets(model: PeftModel, targets: list[str] | str, peft_type: str) -> dict[str, Any]:
    """`target_modules` and `target_parameters` as PEFT needs them for `targets`: with LoRA, the stacked experts
    (`experts`) and the router (`gate`) of a MoE layer move to `target_parameters` (transformers' Qwen3-MoE experts
    are fused 3-D parameters and its router a `TopKRouter` module, neither a Linear `target_modules` could wrap)."""
    moe = {clean_path(path).rpartition(".")[2] for path, layer in model.adapter_layers()
           if isinstance(layer, LoRAExperts) or _LAYER.sub("", clean_path(path)) == "mlp.gate"}
    if not moe or isinstance(targets, str) or peft_type != "LORA":
        return {"target_modules": targets if isinstance(targets, str) else list(targets)}
    return {"target_modules": [t for t in targets if t not in moe],
            "target_parameters": [p for name in sorted(moe) for p in _MOE_PARAMETERS[name]]}


def _targets_from_peft(data: dict[str, Any]) -> list[str] | str:
    """PEFT's `target_modules` + `target_parameters` -> our target names (`_peft_targets` read back)."""
    targets = data.get("target_modules")
    parameters = list(data.get("target_parameters") or [])
    if not parameters:
        return targets or ["q_proj", "v_proj"]
    if isinstance(targets, str):
        raise PeftError("LoRA adapter: a regular-expression target_modules together with target_parameters is not "
                        "supported; list the module names instead.")
    ours = list(targets or [])
    for name, params in _MOE_PARAMETERS.items():
        found = [p for p in parameters if any(p == q or p.endswith("." + q) for q in params)]
        if found and len({q for q in params if any(p == q or p.endswith("." + q) for p in found)}) != len(params):
            raise PeftError(f"LoRA adapter: target_parameters {found} adapt only part of {', '.join(params)}; "
                            f"lmcraft adapts the stacked experts' {' and '.join(params)} together.")
        if found:
            ours.append(name)
            parameters = [p for p in parameters if p not in found]
    if parameters:
        raise PeftError(f"LoRA adapter: target_parameters {parameters} are not supported; lmcraft reads PEFT's "
                        "parameter targets of a mixture-of-experts layer only (mlp.experts.gate_up_proj, "
                        "mlp.experts.down_proj, mlp.gate.weight).")
    return ours


def _lora_family(model: PeftModel, cfg: LoraConfig | AdaLoraConfig, peft_type: str, r: int,
                 **fields: Any) -> dict[str, Any]:
    """The keys PEFT 0.21 writes for a LoRA-family adapter (LoRA, AdaLoRA), filled from `cfg` and `fields`."""
    return {
        **common_keys(model, cfg, peft_type), **{k: v for k, v in LORA_UNSUPPORTED.items()},
        "arrow_config": None, "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "init_lora_weights": True, "kasa_config": None, "loftq_config": {}, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16, "r": r,
        "target_parameters": None, **_peft_targets(model, cfg.target_modules, peft_type), "use_dora": False,
        "use_rslora": False, "velora_config": None, **fields,
    }


def _lora_to_peft(model: PeftModel, cfg: LoraConfig) -> dict[str, Any]:
    return _lora_family(model, cfg, "LORA", cfg.r, use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                        init_lora_weights=cfg.init_lora_weights)


def _lora_from_peft(data: dict[str, Any]) -> LoraConfig:
    reject_unsupported(data, LORA_UNSUPPORTED, "LoRA adapter")
    targets = _targets_from_peft(data)
    return LoraConfig(r=data.get("r", 8), lora_alpha=data.get("lora_alpha", 8),
                      lora_dropout=data.get("lora_dropout", 0.0),
                      target_modules=targets if isinstance(targets, str) else sorted(targets),
                      use_rslora=bool(data.get("use_rslora")), use_dora=bool(data.get("use_dora")),
                      init_lora_weights=data.get("init_lora_weights", True) is not False,
                      modules_to_save=modules_to_save_from_peft(data))


def _adalora_to_peft(model: PeftModel, cfg: AdaLoraConfig) -> dict[str, Any]:
    return _lora_family(
        model, cfg, "ADALORA", 8, beta1=cfg.beta1, beta2=cfg.beta2, deltaT=cfg.deltaT, init_r=cfg.init_r,
        orth_reg_weight=cfg.orth_reg_weight, rank_pattern=cfg.rank_pattern, target_r=cfg.target_r,
        tfinal=cfg.tfinal, tinit=cfg.tinit, total_step=cfg.total_step,
    )


def _adalora_from_peft(data: dict[str, Any]) -> AdaLoraConfig:
    reject_unsupported(data, {**{k: v for k, v in LORA_UNSUPPORTED.items() if k != "rank_pattern"},
                              "target_parameters": None}, "AdaLoRA adapter")
    names = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
             "total_step", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern")
    return AdaLoraConfig(**{k: data[k] for k in names if data.get(k) is not None})


def _ia3_to_peft(model: PeftModel, cfg: IA3Config) -> dict[str, Any]:
    return {**common_keys(model, cfg, "IA3"), "exclude_modules": None, "fan_in_fan_out": False,
            "feedforward_modules": list(cfg.feedforward_modules), "init_ia3_weights": cfg.init_ia3_weights,
            "target_modules": list(cfg.target_modules)}


def _ia3_from_peft(data: dict[str, Any]) -> IA3Config:
    reject_unsupported(data, {"exclude_modules": None, "fan_in_fan_out": False}, "IA3 adapter")
    targets, ff = data.get("target_modules"), data.get("feedforward_modules")
    if isinstance(targets, str) or isinstance(ff, str):
        raise PeftError("IA3 adapter: regular-expression target_modules/feedforward_modules are not supported; "
                        "list the module names instead.")
    return IA3Config(target_modules=sorted(targets or ["k_proj", "v_proj", "down_proj"]),
                     feedforward_modules=sorted(ff or []),
                     init_ia3_weights=data.get("init_ia3_weights", True) is not False,
                     modules_to_save=modules_to_save_from_peft(data))


def _prefix_to_peft(model: PeftModel, cfg: PrefixConfig) -> dict[str, Any]:
    """Saved tables are folded, so the config says prefix_projection=false (what the file holds)."""
    return {**common_keys(model, cfg, "PREFIX_TUNING"), **prompt_learning_keys(model, cfg, per_kv_head=True),
            "encoder_hidden_size": cfg.encoder_hidden_size, "init_weights": None, "prefix_projection": False}


def _prefix_from_peft(data: dict[str, Any]) -> PrefixConfig:
    reject_unsupported(data, {"num_transformer_submodules": 1, "init_weights": None}, "prefix-tuning adapter")
    return PrefixConfig(num_virtual_tokens=data["num_virtual_tokens"], prefix_projection=False,
                        encoder_hidden_size=data.get("encoder_hidden_size") or 512,
                        modules_to_save=modules_to_save_from_peft(data))


def _prompt_to_peft(model: PeftModel, cfg: PromptConfig) -> dict[str, Any]:
    text = cfg.init == "text" and cfg.tokenizer is not None
    init = "TEXT" if text else "SAMPLE_VOCAB" if cfg.init == "vocab" else "RANDOM"
    return {**common_keys(model, cfg, "PROMPT_TUNING"), **prompt_learning_keys(model, cfg, per_kv_head=False),
            "prompt_tuning_init": init, "prompt_tuning_init_text": cfg.init_text if text else None,
            "tokenizer_kwargs": None, "tokenizer_name_or_path": cfg.tokenizer if text else None}


def _prompt_from_peft(data: dict[str, Any]) -> PromptConfig:
    reject_unsupported(data, {"num_transformer_submodules": 1}, "prompt-tuning adapter")
    return PromptConfig(num_virtual_tokens=data["num_virtual_tokens"], modules_to_save=modules_to_save_from_peft(data))


def _ptuning_to_peft(model: PeftModel, cfg: PTuningConfig) -> dict[str, Any]:
    return {**common_keys(model, cfg, "P_TUNING"), **prompt_learning_keys(model, cfg, per_kv_head=False),
            "encoder_dropout": cfg.encoder_dropout, "encoder_hidden_size": cfg.encoder_hidden_size,
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_reparameterization_type": cfg.encoder_reparameterization_type}


def _ptuning_from_peft(data: dict[str, Any]) -> PTuningConfig:
    reject_unsupported(data, {"num_transformer_submodules": 1}, "P-tuning adapter")
    return PTuningConfig(num_virtual_tokens=data["num_virtual_tokens"],
                         encoder_reparameterization_type=data.get("encoder_reparameterization_type", "MLP"),
                         encoder_hidden_size=data.get("encoder_hidden_size") or 256,
                         encoder_num_layers=data.get("encoder_num_layers", 2),
                         encoder_dropout=data.get("encoder_dropout", 0.0),
                         modules_to_save=modules_to_save_from_peft(data))


@dataclass(frozen=True)
class PeftLayout:
    """How one method config class is saved in PEFT's layout."""

    peft_type: str
    to_peft: Callable[[PeftModel, Any], dict[str, Any]]
    lossless: bool = True  # False: PEFT's config cannot hold every field; lmcraft_config.json is written beside it


PEFT_LAYOUTS: dict[type[MethodConfig], PeftLayout] = {
    LoraConfig: PeftLayout("LORA", _lora_to_peft),
    DoraConfig: PeftLayout("LORA", _lora_to_peft),
    QLoraConfig: PeftLayout("LORA", _lora_to_peft, lossless=False),
    AdaLoraConfig: PeftLayout("ADALORA", _adalora_to_peft),
    IA3Config: PeftLayout("IA3", _ia3_to_peft),
    PrefixConfig: PeftLayout("PREFIX_TUNING", _prefix_to_peft),
    PromptConfig: PeftLayout("PROMPT_TUNING", _prompt_to_peft),
    PTuningConfig: PeftLayout("P_TUNING", _ptuning_to_peft),
}
PEFT_READERS: dict[str, Callable[[dict[str, Any]], MethodConfig]] = {
    "LORA": _lora_from_peft, "ADALORA": _adalora_from_peft, "IA3": _ia3_from_peft,
    "PREFIX_TUNING": _prefix_from_peft, "PROMPT_TUNING": _prompt_from_peft, "P_TUNING": _ptuning_from_peft,
}


def peft_layout(cfg: MethodConfig) -> PeftLayout | None:
    """The PEFT layout of `cfg`'s method, or None when the method is saved in lmcraft's layout."""
    return PEFT_LAYOUTS.get(type(cfg))


def config_from_peft(data: dict[str, Any], where: str) -> MethodConfig:
    """A method config from PEFT's adapter_config.json contents (`where` names the file in errors)."""
    peft_type = data.get("peft_type")
    if peft_type not in PEFT_READERS:
        raise PeftError(f"{where}: peft_type {peft_type!r} is not supported; supported: {', '.join(PEFT_READERS)}")
    return PEFT_READERS[peft_type](data)


# ---- tensors ---------------------------------------------------------------------------------------------------
def _adalora_surviving(model: PeftModel, adapter: str, cfg: AdaLoraConfig) -> dict[str, torch.Tensor]:
    """AdaLoRA's surviving triplets only (rows of A and E, columns of B), as PEFT saves them."""
    names = peft_tensor_names(model, adapter)
    out = {}
    for path, m in svd_layers(model, adapter):
        module = clean_path(path)
        a, b, e = m.lora_A[adapter], m.lora_B[adapter], m.lora_E[adapter]
        keep = (cfg.rank_pattern or {}).get(triplet_key(path))
        if keep is not None and len(keep) == e.shape[0]:
            k = torch.tensor(keep, device=e.device)
            a, b, e = a[k], b[:, k], e[k]
        for local, t in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
            out[PEFT_PREFIX + names[f"{module}.{local}"]] = t
    return out


def peft_tensors(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors contents under PEFT's names."""
    cfg = model.peft_configs[adapter]
    names = peft_tensor_names(model, adapter)
    state = adapter_state_dict(model, adapter)
    if isinstance(cfg, AdaLoraConfig):
        return _adalora_surviving(model, adapter, cfg)
    if isinstance(cfg, PromptLearningConfig):  # the folded table, plus any modules_to_save
        others = {PEFT_PREFIX + names[k]: v for k, v in state.items() if not k.startswith("provider.")}
        return {"prompt_embeddings": model.providers[adapter].table().detach(), **others}
    return {PEFT_PREFIX + names[k]: v for k, v in state.items()}


def load_peft_tensors(model: PeftModel, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load PEFT-named tensors into adapter `adapter` (whose config was read from the same folder)."""
    cfg = model.peft_configs[adapter]
    if isinstance(cfg, AdaLoraConfig):  # the file holds surviving triplets only: shrink the layers to fit
        for path, m in svd_layers(model, adapter):
            keep = (cfg.rank_pattern or {}).get(triplet_key(path))
            if keep is not None and sum(keep) != len(keep):
                m.resize(adapter, torch.tensor(keep))
    state: dict[str, torch.Tensor] = {}
    if isinstance(cfg, PromptLearningConfig):
        if "prompt_embeddings" not in tensors:
            raise PeftError(f"a PEFT prompt-learning adapter holds 'prompt_embeddings'; found {sorted(tensors)}")
        model.providers[adapter].load_table(tensors.pop("prompt_embeddings"))
        state = {k: p.detach() for k, p in model.named_adapter_parameters(adapter) if k.startswith("provider.")}
    ours = {PEFT_PREFIX + hf: name for name, hf in peft_tensor_names(model, adapter).items()}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise PeftError(f"tensor {key!r} does not start with {PEFT_PREFIX!r}, as PEFT adapter tensors do")
        state[ours.get(key, key[len(PEFT_PREFIX):])] = value
    load_adapter_state_dict(model, state, adapter)
