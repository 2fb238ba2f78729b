"""Hugging Face `config.json` <-> `ModelConfig`, for the llama, mistral, qwen2, qwen3, qwen3_moe, olmo2, granite,
smollm3, phi3, gemma, gemma2, gemma3_text, gpt2, bert, roberta, distilbert and electra families.

Each family is a table of one-to-one key renames (our field, HF key, HF's default when the key is absent)
plus the layout switches that define the family (norm type and place, MLP shape, how positions enter,
biases). The few keys that need logic (activation names, RoPE in its 4.x and 5.x spellings, sliding
window, labels) are handled by small functions below. HF keys we do not interpret are kept verbatim in
`ModelConfig.extra` so that saving writes them back.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcraft.errors import LmcraftError, ModelLoadError
from lmcraft.io import excerpt
from lmcraft.models.config import ModelConfig
from lmcraft.models.heads import HEADS
from lmcraft.models.rope import SUPPORTED_ROPE_TYPES

REQUIRED = object()  # marks an HF key without a usable default

# HF activation names -> ours, and ours -> the name each family writes.
ACTIVATIONS_IN = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}

# Keys that describe the file rather than the model, or that we regenerate on saving.
NOT_KEPT = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
            "lmcraft_head", "num_labels", "rope_theta", "rope_scaling", "rope_parameters", "layer_types",
            "hidden_act", "activation_function", "sliding_window", "use_sliding_window", "max_window_layers",
            "attention_bias", "n_inner", "hidden_activation", "no_rope_layers", "no_rope_layer_interval",
            "query_pre_attn_scalar", "rope_local_base_freq", "sliding_window_pattern", "use_bidirectional_attention",
            "attention_multiplier", "mlp_bias", "embedding_size",
            "classifier_activation", "classifier_pooling", "local_attention", "global_rope_theta",
            "local_rope_theta", "global_attn_every_n_layers", "mlp_only_layers",
            "num_experts", "num_local_experts"}


@dataclass(frozen=True)
class ConfigSpec:
    """How one family's config.json maps onto ModelConfig."""

    renames: tuple[tuple[str, str, Any], ...]  # (our field, HF key, HF default or REQUIRED)
    layout: dict[str, Any]  # ModelConfig fields fixed for the family
    act_key: str  # the HF key naming the activation
    act_out: dict[str, str]  # our activation -> HF name written
    read_extra: Callable[[dict[str, Any]], dict[str, Any]]  # the keys that need logic, HF -> ours
    write_extra: Callable[[ModelConfig], dict[str, Any]]  # ours -> HF
    architectures: dict[str, str] = field(default_factory=dict)  # head -> HF class name


_TOKENS = (("pad_token_id", "pad_token_id", None), ("initializer_range", "initializer_range", 0.02))


def _rope_family_renames(max_pos: int, bos: int | None, eos: int | None, *more: tuple[str, str, Any],
                         **defaults: Any) -> tuple[tuple[str, str, Any], ...]:
    """The renames Llama-like configs share, `more` family keys, and `defaults` (our field -> the family's HF default
    where it differs: a key equal to the class default may be absent from config.json)."""
    base = _TOKENS + (
        ("vocab_size", "vocab_size", REQUIRED), ("hidden_size", "hidden_size", REQUIRED),
        ("num_layers", "num_hidden_layers", REQUIRED), ("num_heads", "num_attention_heads", REQUIRED),
        ("num_kv_heads", "num_key_value_heads", None), ("head_dim", "head_dim", None),
        ("intermediate_size", "intermediate_size", REQUIRED), ("max_position_embeddings", "max_position_embeddings",
                                                                max_pos),
        ("norm_eps", "rms_norm_eps", 1e-6), ("attention_dropout", "attention_dropout", 0.0),
        ("tie_word_embeddings", "tie_word_embeddings", False), ("bos_token_id", "bos_token_id", bos),
        ("eos_token_id", "eos_token_id", eos),
    ) + more
    return tuple((ours, key, defaults.get(ours, default)) for ours, key, default in base)


# The switches of the newer families, off unless a family's layout or keys turn them on: saving checks them, so that
# e.g. a model with q/k norms is never written as a llama checkpoint.
_NO_SWITCHES = dict(post_norms=False, norm_unit_offset=False, qk_norm=None, layer_types=None, nope_layers=(),
                    rope_local_theta=None, embedding_multiplier=1.0, residual_multiplier=1.0, attention_scale=None,
                    attn_logit_softcap=None, logits_scaling=1.0, final_logit_softcap=None, num_experts=0)


def _rope_layout(*variable: str, **switches: Any) -> dict[str, Any]:
    """The layout of a RoPE decoder: pre-norm RMSNorm, gated MLP, the `switches` set, `variable` fields read from
    config.json (not fixed by the family) left out."""
    fixed = dict(arch="decoder", norm="rmsnorm", pre_norm=True, final_norm=True, mlp="gated", position="rope",
                 **_NO_SWITCHES)
    fixed.update(switches)
    return {k: v for k, v in fixed.items() if k not in variable}


_SILU_OUT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_FULL, _SLIDING = "full_attention", "sliding_attention"


def _read_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE from `rope_parameters` (transformers 5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(hf.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params.update(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    theta = float(params.pop("rope_theta"))
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"it asks for rope type {rope_type!r}, which lmcraft does not implement; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelLoadError(f"it sets partial_rotary_factor={partial}; lmcraft rotates the whole head.")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    return {"rope_theta": theta, "rope_scaling": None if rope_type == "default" else params}


def _windows(window: int | None, types: list[str], mixed: bool) -> dict[str, Any]:
    """`sliding_window` and `layer_types` from one window and the per-layer kinds; None when uniform."""
    if window is None or set(types) <= {_FULL}:
        return {"sliding_window": None, "layer_types": None}
    if set(types) == {_SLIDING}:
        return {"sliding_window": window, "layer_types": None}
    if not mixed:
        raise ModelLoadError("it mixes sliding-window and full-attention layers (layer_types), which this family's "
                             "lmcraft mapping does not support.")
    return {"sliding_window": window, "layer_types": tuple(types)}


def _read_window(hf: dict[str, Any], default_window: int | None, mixed: bool = False) -> dict[str, Any]:
    """Sliding windows from `sliding_window` (+ qwen2's `use_sliding_window`/`max_window_layers`) or `layer_types`."""
    window = hf.get("sliding_window", default_window)
    layers = hf["num_hidden_layers"]
    if "use_sliding_window" in hf or "max_window_layers" in hf:  # qwen2: layers >= max_window_layers slide
        first = hf.get("max_window_layers", 28) if hf.get("use_sliding_window") and window is not None else layers
        types = hf.get("layer_types") or [_SLIDING if i >= first else _FULL for i in range(layers)]
    else:
        types = hf.get("layer_types") or [_SLIDING if window is not None else _FULL] * layers
    return _windows(window, types, mixed)


def _attention_bias(hf: dict[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return {"qkv_bias": bias, "out_bias": bias, "mlp_bias": bool(hf.get("mlp_bias", False))}


def _read_llama(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_read_rope(hf), **_attention_bias(hf)}


def _read_mistral(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_read_rope(hf), **_read_window(hf, 4096)}


def _read_qwen2(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_read_rope(hf), "qkv_bias": True, **_read_window({"max_window_layers": 28, **hf}, 4096, mixed=True)}


def _read_qwen3(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_read_llama(hf), **_read_window({"max_window_layers": 28, **hf}, 4096, mixed=True)}


def _read_qwen3_moe(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: one sliding window for every layer when `use_sliding_window`; `mlp_only_layers` may be null;
    the expert count is `num_experts` (Hub checkpoints) or `num_local_experts` (transformers 5 writes that)."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
    return {**_read_llama(hf), **_windows(window, [_SLIDING] * hf["num_hidden_layers"], mixed=False),
            "mlp_only_layers": tuple(hf.get("mlp_only_layers") or ()),
            "num_experts": hf.get("num_experts", hf.get("num_local_experts", 128))}


def _read_smollm3(hf: dict[str, Any]) -> dict[str, Any]:
    """SmolLM3: `no_rope_layers[i]` = 1 when layer i rotates (default: every `no_rope_layer_interval`-th does not)."""
    layers = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    rotates = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(rotates) != layers:
        raise ModelLoadError(f"no_rope_layers has {len(rotates)} entries for {layers} layers.")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types") or [_SLIDING if window is not None and not r else _FULL for r in rotates]
    return {**_read_llama(hf), **_windows(window, types, mixed=True),
            "nope_layers": tuple(i for i, r in enumerate(rotates) if not r)}


def _read_phi3(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_read_rope(hf), **_read_window(hf, None)}


def _gemma_common(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 1/2/3 beyond RoPE: h_0 = sqrt(hidden) E[x]; Gemma 2/3 score by query_pre_attn_scalar^-1/2 and
    interleave sliding-window layers (every `sliding_window_pattern`-th layer global when layer_types is absent)."""
    if hf.get("use_bidirectional_attention"):
        raise ModelLoadError("it sets use_bidirectional_attention=true; lmcraft reads causal Gemma models only.")
    out = {**_attention_bias(hf), "embedding_multiplier": float(hf["hidden_size"]) ** 0.5}
    if hf.get("model_type") == "gemma":
        return out
    layers, every = hf["num_hidden_layers"], hf.get("sliding_window_pattern", 2 if hf["model_type"] == "gemma2" else 6)
    types = hf.get("layer_types") or [_SLIDING if (i + 1) % every else _FULL for i in range(layers)]
    out.update(_windows(hf.get("sliding_window", 4096), types, mixed=True))
    out["attention_scale"] = float(hf.get("query_pre_attn_scalar", 256)) ** -0.5
    return out


def _read_gemma(hf: dict[str, Any]) -> dict[str, Any]:
    return {**_read_rope(hf), **_gemma_common(hf)}


def _read_gemma3(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 text: global RoPE as usual (base 1e6 by default), a plain one of base `rope_local_base_freq` (1e4)
    on sliding-window layers."""
    params = hf.get("rope_parameters") or {}
    if _FULL in params or _SLIDING in params:  # 5.x: one rope dict per layer kind
        rope = _read_rope({**hf, "rope_parameters": {"rope_theta": 1e6, **(params.get(_FULL) or {})}})
        local = _read_rope({"rope_parameters": {"rope_theta": 1e4, **(params.get(_SLIDING) or {})}})
    else:
        rope = _read_rope({**hf, "rope_theta": hf.get("rope_theta", 1e6)})
        local = {"rope_theta": float(hf.get("rope_local_base_freq", 1e4)), "rope_scaling": None}
    if local["rope_scaling"] is not None:
        raise ModelLoadError("its sliding-window layers use a scaled RoPE; lmcraft supports plain local RoPE only.")
    return {**rope, **_gemma_common(hf), "rope_local_theta": local["rope_theta"]}


def _write_rope(cfg: ModelConfig) -> dict[str, Any]:
    """Written in the 4.x spelling (rope_theta + rope_scaling), which transformers 4.x and 5.x both read."""
    return {"rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
            "head_dim": cfg.head_dim}


def _require(cfg: ModelConfig, ok: bool, what: str) -> None:
    if not ok:
        raise LmcraftError(f"this {cfg.model_type} model cannot be written as a Hugging Face {cfg.model_type} "
                             f"checkpoint: {what}.")


def _layer_types(cfg: ModelConfig) -> list[str]:
    return list(cfg.layer_types or [_SLIDING if cfg.sliding_window is not None else _FULL] * cfg.num_layers)


def _write_bias(cfg: ModelConfig, mlp_bias: bool = True) -> dict[str, Any]:
    """`attention_bias` (one switch for q, k, v and o) and, where the family has it, `mlp_bias`."""
    _require(cfg, cfg.qkv_bias == cfg.out_bias, f"{cfg.model_type} has one attention_bias for q, k, v and o")
    _require(cfg, mlp_bias or not cfg.mlp_bias, f"{cfg.model_type} has no MLP biases")
    return {"attention_bias": cfg.qkv_bias, **({"mlp_bias": cfg.mlp_bias} if mlp_bias else {})}


def _write_llama(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.sliding_window is None, f"{cfg.model_type} has no sliding window")
    return {**_write_rope(cfg), **_write_bias(cfg)}


def _write_olmo2(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.sliding_window is None, "olmo2 has no sliding window")
    return {**_write_rope(cfg), **_write_bias(cfg, mlp_bias=False)}


def _write_granite(cfg: ModelConfig) -> dict[str, Any]:
    scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim**-0.5
    return {**_write_llama(cfg), "attention_multiplier": scale}


def _write_mistral(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), f"{cfg.model_type} has no biases")
    return {**_write_rope(cfg), "sliding_window": cfg.sliding_window}


def _qwen_windows(cfg: ModelConfig) -> dict[str, Any]:
    sliding = cfg.sliding_window is not None
    return {"use_sliding_window": sliding, "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if sliding else cfg.num_layers, "layer_types": _layer_types(cfg)}


def _write_qwen2(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias, "qwen2 has q/k/v biases only")
    return {**_write_rope(cfg), **_qwen_windows(cfg)}


def _write_qwen3(cfg: ModelConfig) -> dict[str, Any]:
    return {**_write_rope(cfg), **_write_bias(cfg, mlp_bias=False), **_qwen_windows(cfg)}


def _write_qwen3_moe(cfg: ModelConfig) -> dict[str, Any]:
    return {**_write_rope(cfg), **_write_bias(cfg, mlp_bias=False),
            "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "num_experts": cfg.num_experts}


def _write_smollm3(cfg: ModelConfig) -> dict[str, Any]:
    return {**_write_rope(cfg), **_write_bias(cfg), "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg),
            "no_rope_layers": [int(i not in cfg.nope_layers) for i in range(cfg.num_layers)]}


def _write_gemma(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, abs(cfg.embedding_multiplier - cfg.hidden_size**0.5) < 1e-6 * cfg.hidden_size**0.5,
             "gemma scales the embeddings by sqrt(hidden_size)")
    out = {**_write_rope(cfg), **_write_bias(cfg, mlp_bias=False)}
    if cfg.model_type == "gemma":
        _require(cfg, cfg.sliding_window is None, "gemma has no sliding window")
        return out
    scalar = (cfg.attention_scale or cfg.head_dim**-0.5) ** -2
    return {**out, "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
            "sliding_window": cfg.sliding_window, "layer_types": _layer_types(cfg)}


def _write_gemma3(cfg: ModelConfig) -> dict[str, Any]:
    return {**_write_gemma(cfg), "rope_local_base_freq": cfg.rope_local_theta or cfg.rope_theta}


def _write_phi3(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), "phi3 has no biases")
    return {**_write_rope(cfg), "sliding_window": cfg.sliding_window}


def _read_gpt2(hf: dict[str, Any]) -> dict[str, Any]:
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ModelLoadError("it changes GPT-2's attention scaling (scale_attn_weights=false or "
                             "scale_attn_by_inverse_layer_idx=true); lmcraft scales by 1/sqrt(head_dim) only.")
    if hf.get("add_cross_attention"):
        raise ModelLoadError("it enables cross-attention (add_cross_attention=true); not supported.")
    inner = hf.get("n_inner")
    return {"intermediate_size": inner if inner is not None else 4 * hf["n_embd"]}


def _write_gpt2(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.num_kv_heads == cfg.num_heads and cfg.head_dim * cfg.num_heads == cfg.hidden_size,
             "gpt2 has neither grouped-query attention nor a separate head_dim")
    return {"n_inner": cfg.intermediate_size, "embd_pdrop": cfg.extra.get("embd_pdrop", cfg.dropout)}


def _read_bert(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"it sets position_embedding_type={hf['position_embedding_type']!r}; "
                             "lmcraft supports 'absolute' BERT positions only.")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ModelLoadError("it makes BERT a decoder (is_decoder/add_cross_attention); not supported.")
    return {}


def _write_bert(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.num_kv_heads == cfg.num_heads and cfg.head_dim * cfg.num_heads == cfg.hidden_size,
             f"{cfg.model_type} has neither grouped-query attention nor a separate head_dim")
    _require(cfg, cfg.model_type == "electra" or cfg.embedding_size in (None, cfg.hidden_size),
             f"{cfg.model_type} embeds at the hidden width (embedding_size differs only in electra)")
    _require(cfg, cfg.model_type == "roberta" or cfg.position_offset == 0,
             f"{cfg.model_type} positions start at 0 (position_offset is roberta's)")
    return {}


def _read_roberta(hf: dict[str, Any]) -> dict[str, Any]:
    """RoBERTa counts positions from padding_idx + 1 (its position table reserves the first pad_token_id + 1 rows)."""
    return {**_read_bert(hf), "position_offset": hf.get("pad_token_id", 1) + 1}


def _write_roberta(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.pad_token_id is not None and cfg.position_offset == cfg.pad_token_id + 1,
             "roberta positions start at pad_token_id + 1 (position_offset)")
    return _write_bert(cfg)


def _read_distilbert(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("sinusoidal_pos_embds"):
        raise ModelLoadError("it sets sinusoidal_pos_embds=true; lmcraft supports learned DistilBERT positions only.")
    return {}


def _read_electra(hf: dict[str, Any]) -> dict[str, Any]:
    width = hf.get("embedding_size", 128)
    return {**_read_bert(hf), "embedding_size": None if width == hf["hidden_size"] else width}


def _write_electra(cfg: ModelConfig) -> dict[str, Any]:
    return {**_write_bert(cfg), "embedding_size": cfg.embedding_size or cfg.hidden_size}


def _read_modernbert(hf: dict[str, Any]) -> dict[str, Any]:
    """ModernBERT: every `global_attn_every_n_layers`-th layer (from 0) attends globally with RoPE base
    `global_rope_theta` (160000), the others to keys within local_attention // 2 on either side with base
    `local_rope_theta` (10000); the 5.x spelling is `rope_parameters` keyed by layer kind."""
    params = hf.get("rope_parameters") or {}
    full = _read_rope({"rope_parameters": {"rope_theta": hf.get("global_rope_theta", 160000.0),
                                           **(params.get(_FULL) or {})}})
    local = _read_rope({"rope_parameters": {"rope_theta": hf.get("local_rope_theta", 10000.0),
                                            **(params.get(_SLIDING) or {})}})
    if full["rope_scaling"] or local["rope_scaling"]:
        raise ModelLoadError("it scales ModernBERT's RoPE (rope_type other than default); not supported.")
    every = hf.get("global_attn_every_n_layers", 3)
    types = hf.get("layer_types") or [_SLIDING if i % every else _FULL for i in range(hf["num_hidden_layers"])]
    head_act = hf.get("classifier_activation", "gelu")
    if ACTIVATIONS_IN.get(head_act) not in ("gelu", "relu"):
        raise ModelLoadError(f"it sets classifier_activation={head_act!r}; lmcraft supports gelu and relu there.")
    pooling = hf.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ModelLoadError(f"it sets classifier_pooling={pooling!r}; expected 'cls' or 'mean'.")
    bias = bool(hf.get("attention_bias", False))
    return {"rope_theta": full["rope_theta"], "rope_local_theta": local["rope_theta"], "layer_types": tuple(types),
            "sliding_window": hf.get("local_attention", 128), "qkv_bias": bias, "out_bias": bias,
            "pooler_activation": ACTIVATIONS_IN[head_act], "mlm_activation": ACTIVATIONS_IN[head_act],
            "cls_pooling": "first" if pooling == "cls" else "mean"}


def _write_modernbert(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg, cfg.qkv_bias == cfg.out_bias, "modernbert has one attention_bias for Wqkv and Wo")
    _require(cfg, cfg.mlm_activation in (None, cfg.pooler_activation),
             "modernbert has one classifier_activation for its MLM and classification heads")
    _require(cfg, cfg.rope_scaling is None, "lmcraft writes ModernBERT's default RoPE only")
    _require(cfg, cfg.num_kv_heads == cfg.num_heads and cfg.head_dim * cfg.num_heads == cfg.hidden_size,
             "modernbert has neither grouped-query attention nor a separate head_dim")
    layer_types = list(cfg.layer_types or [_FULL] * cfg.num_layers)
    _require(cfg, _SLIDING not in layer_types or cfg.sliding_window is not None, "sliding layers need a window")
    return {"attention_bias": cfg.qkv_bias, "classifier_activation": _BERT_ACT_OUT[cfg.pooler_activation],
            "classifier_pooling": "cls" if cfg.cls_pooling == "first" else "mean", "layer_types": layer_types,
            "local_attention": cfg.sliding_window or 128, "global_rope_theta": cfg.rope_theta,
            "local_rope_theta": cfg.rope_local_theta or cfg.rope_theta}


def _rope_spec(read: Callable, write: Callable, prefix: str, renames: tuple[tuple[str, str, Any], ...],
               layout: dict[str, Any] | None = None, act_key: str = "hidden_act", lm_class: str | None = None,
               heads: tuple[str, ...] = ("lm", "cls", "reward", "token_cls", "value")) -> ConfigSpec:
    classes = {"lm": lm_class or f"{prefix}ForCausalLM", "cls": f"{prefix}ForSequenceClassification",
               "reward": f"{prefix}ForSequenceClassification", "token_cls": f"{prefix}ForTokenClassification",
               "value": f"{prefix}ForTokenClassification"}
    return ConfigSpec(renames, _rope_layout() if layout is None else layout, act_key, _SILU_OUT, read, write,
                      {head: classes[head] for head in heads})


_GRANITE_KEYS = (("embedding_multiplier", "embedding_multiplier", 1.0),
                 ("residual_multiplier", "residual_multiplier", 1.0),
                 ("attention_scale", "attention_multiplier", 1.0), ("logits_scaling", "logits_scaling", 1.0))
_GEMMA = dict(tie_word_embeddings=True, pad_token_id=0)
_MOE_KEYS = (("num_experts_per_tok", "num_experts_per_tok", 8),
             ("moe_intermediate_size", "moe_intermediate_size", 768), ("norm_topk_prob", "norm_topk_prob", False),
             ("decoder_sparse_step", "decoder_sparse_step", 1), ("router_aux_loss_coef", "router_aux_loss_coef", 0.001))
_GEMMA_VARIABLE = ("embedding_multiplier", "attention_scale", "attn_logit_softcap", "final_logit_softcap",
                   "layer_types")


def _softcaps(attn: float | None, final: float | None) -> tuple[tuple[str, str, Any], ...]:
    return (("attn_logit_softcap", "attn_logit_softcapping", attn),
            ("final_logit_softcap", "final_logit_softcapping", final))


_BERT_RENAMES = (
    ("initializer_range", "initializer_range", 0.02), ("vocab_size", "vocab_size", REQUIRED),
    ("hidden_size", "hidden_size", REQUIRED), ("num_layers", "num_hidden_layers", REQUIRED),
    ("num_heads", "num_attention_heads", REQUIRED), ("intermediate_size", "intermediate_size", REQUIRED),
    ("max_position_embeddings", "max_position_embeddings", 512), ("norm_eps", "layer_norm_eps", 1e-12),
    ("dropout", "hidden_dropout_prob", 0.1), ("attention_dropout", "attention_probs_dropout_prob", 0.1),
    ("type_vocab_size", "type_vocab_size", 2), ("classifier_dropout", "classifier_dropout", None),
    ("tie_word_embeddings", "tie_word_embeddings", True),
)
_BERT_LAYOUT = dict(arch="encoder", norm="layernorm", pre_norm=False, final_norm=False, mlp="plain",
                    position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, embed_norm=True, **_NO_SWITCHES)
_BERT_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}


def _encoder_archs(prefix: str) -> dict[str, str]:
    return {"mlm": f"{prefix}ForMaskedLM", "cls": f"{prefix}ForSequenceClassification",
            "token_cls": f"{prefix}ForTokenClassification", "qa": f"{prefix}ForQuestionAnswering"}


FAMILIES: dict[str, ConfigSpec] = {
    "llama": _rope_spec(_read_llama, _write_llama, "Llama", _rope_family_renames(2048, 1, 2)),
    "mistral": _rope_spec(_read_mistral, _write_mistral, "Mistral", _rope_family_renames(32768, 1, 2)),
    "qwen2": _rope_spec(_read_qwen2, _write_qwen2, "Qwen2", _rope_family_renames(32768, None, None),
                        _rope_layout("layer_types")),
    "qwen3": _rope_spec(_read_qwen3, _write_qwen3, "Qwen3", _rope_family_renames(32768, None, None, head_dim=128),
                        _rope_layout("layer_types", qk_norm="head")),
    "qwen3_moe": _rope_spec(_read_qwen3_moe, _write_qwen3_moe, "Qwen3Moe",
                            _rope_family_renames(32768, None, None, *_MOE_KEYS),
                            _rope_layout("num_experts", *(ours for ours, _, _ in _MOE_KEYS), qk_norm="head")),
    "olmo2": _rope_spec(_read_llama, _write_olmo2, "Olmo2",
                        _rope_family_renames(2048, None, 50279, norm_eps=1e-5, pad_token_id=1),
                        _rope_layout(pre_norm=False, post_norms=True, qk_norm="full"), heads=("lm", "cls", "reward")),
    "granite": _rope_spec(_read_llama, _write_granite, "Granite", _rope_family_renames(2048, 1, 2, *_GRANITE_KEYS),
                          _rope_layout(*(ours for ours, _, _ in _GRANITE_KEYS)), heads=("lm",)),
    "smollm3": _rope_spec(_read_smollm3, _write_smollm3, "SmolLM3",
                          _rope_family_renames(32768, 128000, 128001, tie_word_embeddings=True, pad_token_id=128004),
                          _rope_layout("layer_types", "nope_layers")),
    "phi3": _rope_spec(_read_phi3, _write_phi3, "Phi3",
                       _rope_family_renames(4096, 1, 32000, norm_eps=1e-5, pad_token_id=32000)),
    "gemma": _rope_spec(_read_gemma, _write_gemma, "Gemma", _rope_family_renames(8192, 2, 1, head_dim=256, **_GEMMA),
                        _rope_layout("embedding_multiplier", norm_unit_offset=True)),
    "gemma2": _rope_spec(_read_gemma, _write_gemma, "Gemma2",
                         _rope_family_renames(8192, 2, 1, *_softcaps(50.0, 30.0), head_dim=256, **_GEMMA),
                         _rope_layout(*_GEMMA_VARIABLE, norm_unit_offset=True, post_norms=True),
                         act_key="hidden_activation"),
    "gemma3_text": _rope_spec(_read_gemma3, _write_gemma3, "Gemma3Text",
                              _rope_family_renames(131072, 2, 1, *_softcaps(None, None), head_dim=256, **_GEMMA),
                              _rope_layout(*_GEMMA_VARIABLE, "rope_local_theta", norm_unit_offset=True,
                                           post_norms=True, qk_norm="head"),
                              act_key="hidden_activation", lm_class="Gemma3ForCausalLM", heads=("lm", "cls", "reward")),
    "gpt2": ConfigSpec(
        _TOKENS + (
            ("vocab_size", "vocab_size", REQUIRED), ("hidden_size", "n_embd", REQUIRED),
            ("num_layers", "n_layer", REQUIRED), ("num_heads", "n_head", REQUIRED),
            ("max_position_embeddings", "n_positions", 1024), ("norm_eps", "layer_norm_epsilon", 1e-5),
            ("dropout", "resid_pdrop", 0.1), ("attention_dropout", "attn_pdrop", 0.1),
            ("tie_word_embeddings", "tie_word_embeddings", True), ("bos_token_id", "bos_token_id", 50256),
            ("eos_token_id", "eos_token_id", 50256),
        ),
        dict(arch="decoder", norm="layernorm", pre_norm=True, final_norm=True, mlp="plain", position="learned",
             qkv_bias=True, out_bias=True, mlp_bias=True, **_NO_SWITCHES),
        "activation_function", {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"},
        _read_gpt2, _write_gpt2,
        {"lm": "GPT2LMHeadModel", "cls": "GPT2ForSequenceClassification", "reward": "GPT2ForSequenceClassification",
         "token_cls": "GPT2ForTokenClassification", "value": "GPT2ForTokenClassification"},
    ),
    "bert": ConfigSpec(
        (("pad_token_id", "pad_token_id", None), *_BERT_RENAMES, ("bos_token_id", "bos_token_id", None),
         ("eos_token_id", "eos_token_id", None)),
        _BERT_LAYOUT, "hidden_act", _BERT_ACT_OUT, _read_bert, _write_bert, _encoder_archs("Bert"),
    ),
    # ---- encoder families beyond BERT (roberta, distilbert, electra) ----
    "roberta": ConfigSpec(
        _BERT_RENAMES + (("pad_token_id", "pad_token_id", 1), ("bos_token_id", "bos_token_id", 0),
                         ("eos_token_id", "eos_token_id", 2)),
        {**_BERT_LAYOUT, "pooler_dropout": True, "mlm_activation": "gelu"}, "hidden_act", _BERT_ACT_OUT,
        _read_roberta, _write_roberta, _encoder_archs("Roberta"),
    ),
    "distilbert": ConfigSpec(
        (
            ("pad_token_id", "pad_token_id", 0), ("initializer_range", "initializer_range", 0.02),
            ("vocab_size", "vocab_size", REQUIRED), ("hidden_size", "dim", REQUIRED),
            ("num_layers", "n_layers", REQUIRED), ("num_heads", "n_heads", REQUIRED),
            ("intermediate_size", "hidden_dim", REQUIRED), ("max_position_embeddings", "max_position_embeddings", 512),
            ("dropout", "dropout", 0.1), ("attention_dropout", "attention_dropout", 0.1),
            ("classifier_dropout", "seq_classif_dropout", 0.2), ("tie_word_embeddings", "tie_word_embeddings", True),
            ("bos_token_id", "bos_token_id", None), ("eos_token_id", "eos_token_id", None),
        ),
        {**_BERT_LAYOUT, "norm_eps": 1e-12, "type_vocab_size": 0, "pooler_activation": "relu"},
        "activation", _BERT_ACT_OUT, _read_distilbert, _write_bert, _encoder_archs("DistilBert"),
    ),
    "electra": ConfigSpec(
        _BERT_RENAMES + (("pad_token_id", "pad_token_id", 0), ("bos_token_id", "bos_token_id", None),
                         ("eos_token_id", "eos_token_id", None)),
        {**_BERT_LAYOUT, "pooler_activation": "gelu", "pooler_dropout": True, "mlm_activation": "gelu"},
        "hidden_act", _BERT_ACT_OUT,
        _read_electra, _write_electra, {**_encoder_archs("Electra"), "rtd": "ElectraForPreTraining"},
    ),
    "modernbert": ConfigSpec(
        (
            ("pad_token_id", "pad_token_id", 50283), ("initializer_range", "initializer_range", 0.02),
            ("vocab_size", "vocab_size", REQUIRED), ("hidden_size", "hidden_size", REQUIRED),
            ("num_layers", "num_hidden_layers", REQUIRED), ("num_heads", "num_attention_heads", REQUIRED),
            ("intermediate_size", "intermediate_size", REQUIRED),
            ("max_position_embeddings", "max_position_embeddings", 8192), ("norm_eps", "norm_eps", 1e-5),
            ("norm_bias", "norm_bias", False), ("mlp_bias", "mlp_bias", False), ("dropout", "mlp_dropout", 0.0),
            ("attention_dropout", "attention_dropout", 0.0), ("classifier_dropout", "classifier_dropout", 0.0),
            ("head_bias", "classifier_bias", False), ("mlm_decoder_bias", "decoder_bias", True),
            ("tie_word_embeddings", "tie_word_embeddings", True), ("bos_token_id", "bos_token_id", 50281),
            ("eos_token_id", "eos_token_id", 50282),
        ),
        {**{k: v for k, v in _NO_SWITCHES.items() if k not in ("layer_types", "rope_local_theta")},
         "arch": "encoder", "norm": "layernorm", "pre_norm": True, "final_norm": True, "mlp": "gated",
         "position": "rope", "embed_norm": True, "type_vocab_size": 0, "first_attn_norm": False, "head_norm": True,
         "pooler_dropout": False, "embedding_size": None, "position_offset": 0},
        "hidden_activation", _SILU_OUT, _read_modernbert, _write_modernbert,
        {"mlm": "ModernBertForMaskedLM", "cls": "ModernBertForSequenceClassification",
         "token_cls": "ModernBertForTokenClassification"},
    ),
}
ACT_DEFAULTS = {**dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "granite", "smollm3",
                                 "phi3"), "silu"),
                **dict.fromkeys(("gemma", "gemma2", "gemma3_text"), "gelu_pytorch_tanh"), "gpt2": "gelu_new",
                "bert": "gelu",
                # encoder families beyond BERT
                "roberta": "gelu", "distilbert": "gelu", "electra": "gelu", "modernbert": "gelu"}

# Endings of HF architecture class names -> the head they carry. Bare backbones (LlamaModel, BertModel) have none.
ARCH_SUFFIX_HEADS = (("ElectraForPreTraining", "rtd"),  # before ForPreTraining (BERT's MLM + NSP checkpoints)
                     ("ForCausalLM", "lm"), ("LMHeadModel", "lm"), ("ForMaskedLM", "mlm"), ("ForPreTraining", "mlm"),
                     ("ForSequenceClassification", "cls"), ("ForTokenClassification", "token_cls"),
                     ("ForQuestionAnswering", "qa"))


def supported_types() -> str:
    return ", ".join(FAMILIES)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a model folder (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"{file}: no such file; a Hugging Face model folder needs a config.json.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}, line {e.lineno}: invalid JSON ({e.msg}).") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object at the top level.")
    return data


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed HF config dict."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(f"{source}: model_type {model_type!r} is not supported; supported types: "
                             f"{supported_types()}.")
    spec = FAMILIES[model_type]
    fields: dict[str, Any] = {"model_type": model_type, **spec.layout}
    for ours, key, default in spec.renames:
        if key not in hf and default is REQUIRED:
            raise ModelLoadError(f"{source}: the {model_type} config lacks the required key {key!r}.")
        fields[ours] = hf.get(key, default)
    act = hf.get(spec.act_key, ACT_DEFAULTS[model_type])
    if act not in ACTIVATIONS_IN:
        raise ModelLoadError(f"{source}: activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS_IN)}.")
    fields["activation"] = ACTIVATIONS_IN[act]
    try:
        fields.update(spec.read_extra(hf))
    except ModelLoadError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    labels = hf.get("id2label")
    fields["num_labels"] = len(labels) if labels else int(hf.get("num_labels", 2))
    used = {key for _, key, _ in spec.renames} | NOT_KEPT
    fields["extra"] = {k: v for k, v in hf.items() if k not in used}
    _check_values(fields, source)
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: inconsistent model config: {e}.") from None


_POSITIVE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "num_kv_heads",
             "head_dim", "max_position_embeddings", "norm_eps", "rope_theta", "num_labels", "num_experts_per_tok",
             "moe_intermediate_size", "decoder_sparse_step")
_FRACTIONS = ("dropout", "attention_dropout", "classifier_dropout")


def _check_values(fields: dict[str, Any], source: str) -> None:
    """Check every value read from config.json against ModelConfig's field types (pydantic, lax: "12" is 12)
    and ranges, so that `rms_norm_eps: "abc"` or `vocab_size: -1` fails here naming the key, not later."""
    from pydantic import TypeAdapter, ValidationError

    renamed = {ours: key for ours, key, _ in FAMILIES[fields["model_type"]].renames}
    hints = typing.get_type_hints(ModelConfig)
    for name, value in fields.items():
        key = renamed.get(name, name)
        try:
            checked = TypeAdapter(hints[name]).validate_python(value)  # the value itself is kept as written
        except ValidationError as err:
            raise ModelLoadError(f"{source}: key {key!r} = {excerpt(repr(value))}: "
                                 f"{err.errors()[0]['msg']}.") from None
        bad = (name in _POSITIVE and checked is not None and not checked > 0) or (
            name in _FRACTIONS and checked is not None and not 0 <= checked < 1)
        if bad:
            wanted = "a number above 0" if name in _POSITIVE else "a fraction in [0, 1)"
            raise ModelLoadError(f"{source}: key {key!r} = {value!r}: expected {wanted}.")


def load_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a Hugging Face `config.json` (a model folder or the file) of a supported family."""
    path = Path(path)
    return config_from_hf(read_config_json(path), str(path / "config.json" if path.is_dir() else path))


def head_from_config(hf: dict[str, Any]) -> str | None:
    """The head an HF checkpoint carries, from `architectures`; None for a bare backbone (e.g. BertModel)."""
    if hf.get("lmcraft_head") in HEADS:
        return hf["lmcraft_head"]
    names = hf.get("architectures") or []
    for name in names:
        for suffix, head in ARCH_SUFFIX_HEADS:
            if name.endswith(suffix):
                return head
    if not names or any(name.endswith("Model") for name in names):
        return None
    raise ModelLoadError(f"config.json architectures {names} name a head lmcraft does not have; lmcraft reads "
                         "causal-LM, masked-LM, sequence- and token-classification checkpoints and bare backbones.")


def default_head(arch: str) -> str:
    """The head given to a bare backbone: an LM head for decoders, a classification head for encoders."""
    return "lm" if arch == "decoder" else "cls"


def to_hf_config(cfg: ModelConfig, head: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The Hugging Face `config.json` dict for `cfg` with the given head (default: lm for decoders, mlm for
    encoders) and storage dtype ("float32", "bfloat16", ...)."""
    if cfg.model_type not in FAMILIES:
        raise LmcraftError(f"model_type {cfg.model_type!r} cannot be saved; supported types: {supported_types()}.")
    spec = FAMILIES[cfg.model_type]
    head = head or ("lm" if cfg.arch == "decoder" else "mlm")
    if head not in spec.architectures:
        raise LmcraftError(f"a {head!r} head cannot be written as a Hugging Face {cfg.model_type} checkpoint; "
                             f"heads with a {cfg.model_type} class: {', '.join(spec.architectures)}.")
    for name, value in spec.layout.items():
        _require(cfg, getattr(cfg, name) == value, f"{name}={getattr(cfg, name)!r} (the family needs {value!r})")
    out: dict[str, Any] = dict(cfg.extra)
    out.update({key: getattr(cfg, ours) for ours, key, _ in spec.renames})
    out[spec.act_key] = spec.act_out[cfg.activation]
    out.update(spec.write_extra(cfg))
    num_labels = 1 if head in ("reward", "value") else cfg.num_labels
    labels = out.get("id2label")
    if not labels or len(labels) != num_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    if head in ("reward", "value"):
        out["lmcraft_head"] = head
    out.update({"architectures": [spec.architectures[head]], "model_type": cfg.model_type, "torch_dtype": dtype})
    return dict(sorted(out.items()))
