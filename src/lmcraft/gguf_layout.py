"""llama.cpp's GGUF layout, in one table shared by the importer (`gguf_import`) and the exporter (`gguf_export`).

* **Architectures** (`ARCHITECTURES`): GGUF `general.architecture` <-> Hugging Face `model_type`. Mistral has no
  GGUF architecture of its own: llama.cpp's converter writes it as `llama` (same tensors, same rope), so a Mistral
  model exports as `llama` and imports back as a Llama. Gemma's RMSNorm scales by `1 + w`; llama.cpp's converter
  stores `w + 1` for every `*norm.weight` of the gemma, gemma2 and gemma3 architectures (`norm_shift`), so the
  GGUF value is the factor itself and the importer subtracts the shift again.
* **Tensor names** (`TENSORS`): per architecture, GGUF name <-> HF name and the layout change between them:
  `rope` (llama.cpp rotates adjacent pairs `(2i, 2i+1)` of each head, HF's `rotate_half` rotates `(i, i + d/2)`,
  so q/k rows - and their biases - are permuted inside every head, see `permute_qk`) and `transpose` (GPT-2's
  Conv1D stores `(in, out)`; GGUF stores every matrix as `(out, in)`, like `nn.Linear`) and `experts` (Qwen3-MoE:
  HF stores expert e's projection as `mlp.experts.{e}.gate_proj.weight` (I, H); GGUF stacks the E of them into one
  `ffn_gate_exps` (E, I, H)). GPT-2's fused `c_attn` (q, k, v stacked) is GGUF's `attn_qkv` as it is, Phi-3's
  `qkv_proj`/`gate_up_proj` are `attn_qkv`/`ffn_up` as they are.
* **Hyper-parameters** (`HYPER_PARAMETERS`): the `{arch}.*` metadata keys beyond the ones every rope decoder has,
  each with the config.json key it holds (Granite's four scalars, Gemma 2's soft caps, sliding windows, Qwen3-MoE's
  expert counts); the importer reads them into config.json, the exporter writes them from it.
* **Pre-tokenizers** (`PRE_TOKENIZERS`): the `tokenizer.ggml.pre` names llama.cpp writes, grouped by the split
  rules they stand for (llama.cpp's `llama-vocab.cpp` lists the regexes), and the name lmcraft writes for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "GGUF_ARCH_OF",
    "HYPER_PARAMETERS",
    "LOADER_FIXED",
    "GPT2_REGEX",
    "LLAMA3_REGEX",
    "PRE_FAMILIES",
    "PRE_NAMES",
    "QWEN2_REGEX",
    "TENSORS",
    "HyperParameter",
    "TensorName",
    "gemma_query_scalar",
    "gemma_sliding_layers",
    "gguf_name",
    "hf_name",
    "permute_qk",
    "short_float",
    "unpermute_qk",
]


@dataclass(frozen=True)
class Architecture:
    hf_model_type: str  # the HF model_type a GGUF of this architecture imports as
    hf_class: str
    rope_permuted: bool  # llama.cpp permutes q/k rows for its rope layout
    norm_shift: float = 0.0  # GGUF stores w + norm_shift for every *norm.weight (Gemma's 1 + w RMSNorm)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", True),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", False),
    "gpt2": Architecture("gpt2", "GPT2LMHeadModel", False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", False),
    "olmo2": Architecture("olmo2", "Olmo2ForCausalLM", False),
    "granite": Architecture("granite", "GraniteForCausalLM", True),  # llama.cpp's Granite converter is Llama's
    "phi3": Architecture("phi3", "Phi3ForCausalLM", False),
    "gemma": Architecture("gemma", "GemmaForCausalLM", False, 1.0),
    "gemma2": Architecture("gemma2", "Gemma2ForCausalLM", False, 1.0),
    "gemma3": Architecture("gemma3_text", "Gemma3ForCausalLM", False, 1.0),
    "smollm3": Architecture("smollm3", "SmolLM3ForCausalLM", True),  # llama.cpp's SmolLM3 converter is Llama's
    "qwen3moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", False),
}
# HF model_type -> the GGUF architecture it exports as: the reverse of ARCHITECTURES, and Mistral as Llama
GGUF_ARCH_OF: dict[str, str] = {**{a.hf_model_type: name for name, a in ARCHITECTURES.items()}, "mistral": "llama"}


@dataclass(frozen=True)
class HyperParameter:
    """The metadata key `{arch}.<gguf>` and the config.json key `hf` it holds. `kind`: GGUF value type ("u32",
    "f32"). `default`: what the importer writes when the file lacks the key (a callable gets the config built so
    far; None: the key is required)."""

    gguf: str
    hf: str
    kind: str = "u32"
    default: Any = None

    def read(self, metadata: dict[str, Any], arch: str, config: dict[str, Any]) -> Any:
        """The value for config.json (None when the file lacks a required key)."""
        value = metadata.get(f"{arch}.{self.gguf}")
        if value is None:
            value = self.default(config) if callable(self.default) else self.default
        return None if value is None else short_float(value) if self.kind == "f32" else int(value)

    def write(self, writer: Any, arch: str, hf_config: dict[str, Any]) -> None:
        """Add the key to a `gguf.GGUFWriter` from the config.json dict (nothing when the config has no value)."""
        value = hf_config.get(self.hf)
        if value is not None:
            add = writer.add_float32 if self.kind == "f32" else writer.add_uint32
            add(f"{arch}.{self.gguf}", float(value) if self.kind == "f32" else int(value))


def short_float(x: float) -> float:
    """The shortest decimal that round-trips the float32 GGUF stores (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


_WINDOW = HyperParameter("attention.sliding_window", "sliding_window")
# GGUF architecture -> its keys beyond the Llama-like ones (which `gguf_export` writes and `gguf_import` reads for
# every rope decoder)
HYPER_PARAMETERS: dict[str, tuple[HyperParameter, ...]] = {
    "granite": (  # h_0 = m_e E[x], x + m_r f(x), softmax(m_a q k^T), logits / s
        HyperParameter("embedding_scale", "embedding_multiplier", "f32", 1.0),
        HyperParameter("residual_scale", "residual_multiplier", "f32", 1.0),
        HyperParameter("attention.scale", "attention_multiplier", "f32", lambda config: config["head_dim"] ** -0.5),
        HyperParameter("logit_scale", "logits_scaling", "f32", 1.0),
    ),
    "phi3": (HyperParameter("attention.sliding_window", "sliding_window", default=0),),
    "gemma2": (_WINDOW, HyperParameter("attn_logit_softcapping", "attn_logit_softcapping", "f32", 50.0),
               HyperParameter("final_logit_softcapping", "final_logit_softcapping", "f32", 30.0)),
    "gemma3": (_WINDOW,),
    "qwen3moe": (HyperParameter("expert_count", "num_experts"),
                 HyperParameter("expert_used_count", "num_experts_per_tok"),
                 HyperParameter("expert_feed_forward_length", "moe_intermediate_size")),
}


# What llama.cpp's loader (llama-model.cpp) fixes instead of reading from the file, so a model must have these values
# to run there: Gemma 2/3's layer pattern (every 2nd / 6th layer global, the others sliding), Gemma 3's local RoPE
# base, SmolLM3's layers without RoPE (every 4th), the 27B Gemma layer counts (whose query scale differs).
LOADER_FIXED: dict[str, Any] = {
    "gemma_pattern": {"gemma2": 2, "gemma3": 6}, "gemma_27b_layers": {"gemma2": 46, "gemma3": 62},
    "gemma3_local_rope_base": 10000.0, "smollm3_nope_interval": 4,
}


def gemma_sliding_layers(arch: str, num_layers: int) -> list[bool]:
    """Which layers llama.cpp's Gemma 2/3 loader makes sliding-window ones: all but every `pattern`-th."""
    every = LOADER_FIXED["gemma_pattern"][arch]
    return [(i + 1) % every != 0 for i in range(num_layers)]


def gemma_query_scalar(arch: str, num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> int:
    """HF's `query_pre_attn_scalar` llama.cpp's Gemma 2/3 loader implies: scores scaled by 1/sqrt(head_dim), but by
    1/sqrt(hidden/heads) for the 27B models."""
    return hidden_size // num_heads if num_layers == LOADER_FIXED["gemma_27b_layers"][arch] else head_dim


@dataclass(frozen=True)
class TensorName:
    gguf: str  # GGUF name; "{i}" = layer index
    hf: str  # HF name; "{i}" = layer index
    layout: str = ""  # "" | "rope_q" | "rope_k" | "transpose" | "experts" (HF name has "{e}", the expert)


_LLAMA_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_OLMO2_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                **_QK_NORMS}
_GEMMA2_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


def _rope_family(norms: dict[str, str], fused: bool = False, experts: bool = False) -> tuple[TensorName, ...]:
    """A Llama-like decoder: the per-layer `norms` (GGUF -> HF, weights only), attention and gated MLP. `fused`:
    Phi-3's q/k/v in one `attn_qkv` (HF `qkv_proj`) and gate/up in one `ffn_up` (HF `gate_up_proj`), rows stacked
    in that order in both formats. `experts`: every MLP a mixture of experts (Qwen3-MoE): the router
    `ffn_gate_inp` (HF `mlp.gate`) and the stacked `ffn_{gate,up,down}_exps` (HF per expert)."""
    layer = [(f"{g}.weight", f"{h}.weight", "") for g, h in norms.items()] + [
        ("attn_output.weight", "self_attn.o_proj.weight", ""),
        ("attn_output.bias", "self_attn.o_proj.bias", ""),
    ]
    if experts:
        layer += [("ffn_gate_inp.weight", "mlp.gate.weight", "")]
        layer += [(f"ffn_{p}_exps.weight", f"mlp.experts.{{e}}.{p}_proj.weight", "experts")
                  for p in ("gate", "up", "down")]
    else:
        layer += [("ffn_down.weight", "mlp.down_proj.weight", "")]
    if fused:
        layer += [("attn_qkv.weight", "self_attn.qkv_proj.weight", ""),
                  ("ffn_up.weight", "mlp.gate_up_proj.weight", "")]
    else:
        if not experts:
            layer += [("ffn_gate.weight", "mlp.gate_proj.weight", ""), ("ffn_up.weight", "mlp.up_proj.weight", "")]
        layer += [(f"attn_{p}.{param}", f"self_attn.{p}_proj.{param}", f"rope_{p}" if p in "qk" else "")
                  for p in "qkv" for param in ("weight", "bias")]
    return (
        TensorName("token_embd.weight", "model.embed_tokens.weight"),
        TensorName("output_norm.weight", "model.norm.weight"),
        TensorName("output.weight", "lm_head.weight"),
        *(TensorName(f"blk.{{i}}.{g}", f"model.layers.{{i}}.{h}", lay) for g, h, lay in layer),
    )


def _gpt2() -> tuple[TensorName, ...]:
    layer = [
        ("attn_norm", "ln_1", ""), ("ffn_norm", "ln_2", ""), ("attn_qkv", "attn.c_attn", "transpose"),
        ("attn_output", "attn.c_proj", "transpose"), ("ffn_up", "mlp.c_fc", "transpose"),
        ("ffn_down", "mlp.c_proj", "transpose"),
    ]
    return (
        TensorName("token_embd.weight", "transformer.wte.weight"),
        TensorName("position_embd.weight", "transformer.wpe.weight"),
        TensorName("output_norm.weight", "transformer.ln_f.weight"),
        TensorName("output_norm.bias", "transformer.ln_f.bias"),
        TensorName("output.weight", "lm_head.weight"),
        *(TensorName(f"blk.{{i}}.{g}.{param}", f"transformer.h.{{i}}.{h}.{param}", lay if param == "weight" else "")
          for g, h, lay in layer for param in ("weight", "bias")),
    )


_ROPE = _rope_family(_LLAMA_NORMS)
TENSORS: dict[str, tuple[TensorName, ...]] = {
    "llama": _ROPE, "qwen2": _ROPE, "granite": _ROPE, "gemma": _ROPE, "smollm3": _ROPE, "gpt2": _gpt2(),
    "qwen3": _rope_family({**_LLAMA_NORMS, **_QK_NORMS}),
    "qwen3moe": _rope_family({**_LLAMA_NORMS, **_QK_NORMS}, experts=True),
    "olmo2": _rope_family(_OLMO2_NORMS),
    "phi3": _rope_family(_LLAMA_NORMS, fused=True),
    "gemma2": _rope_family(_GEMMA2_NORMS),
    "gemma3": _rope_family({**_GEMMA2_NORMS, **_QK_NORMS}),
}


def _lookup(arch: str, name: str, side: str) -> tuple[TensorName, str] | None:
    """The rule whose `side` template matches `name`, and the layer index ("" for global tensors); the numbers in
    `name` stand for "{i}" (the layer) and then "{e}" (the expert)."""
    parts = name.split(".")
    numbers = [p for p in parts if p.isdigit()]
    slots = iter(("{i}", "{e}"))
    template = ".".join(next(slots, p) if p.isdigit() else p for p in parts)
    for t in TENSORS[arch]:
        if getattr(t, side) == template:
            return t, numbers[0] if numbers else ""
    return None


def hf_name(arch: str, name: str) -> tuple[str, str] | None:
    """GGUF tensor name -> (HF name, layout), or None when the architecture has no such tensor. For the `experts`
    layout the HF name keeps "{e}": one GGUF tensor holds every expert's (`hf_name(...)[0].format(e=e)`)."""
    found = _lookup(arch, name, "gguf")
    return None if found is None else (found[0].hf.replace("{i}", found[1]), found[0].layout)


def gguf_name(arch: str, name: str) -> tuple[str, str] | None:
    """HF tensor name -> (GGUF name, layout), or None when the architecture has no such tensor."""
    found = _lookup(arch, name, "hf")
    return None if found is None else (found[0].gguf.replace("{i}", found[1]), found[0].layout)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order (what llama.cpp's converter does): row h*d + s*d/2 + i -> h*d + 2i + s."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> HF row order, the inverse of `permute_qk`: row h*d + 2i + s -> h*d + s*d/2 + i."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# Pre-tokenizers
# ----------------------------------------------------------------------------------------------

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> pre-tokenizer family (the names llama.cpp's converter writes).
PRE_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
}
# family -> the tokenizer.ggml.pre name lmcraft writes for it
PRE_NAMES: dict[str, str] = {"gpt2": "gpt-2", "digits": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}
