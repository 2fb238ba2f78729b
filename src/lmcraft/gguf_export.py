"""Export a decoder (Llama, Mistral, Qwen2/3, Qwen3-MoE, OLMo 2, Granite, SmolLM3, Phi-3, Gemma 1/2/3, GPT-2; or a
PEFT adapter merged into one) as a GGUF file.

The file is what llama.cpp's `convert_hf_to_gguf.py` (+ `llama-quantize` for the quantised types) would write:
tensor names and layouts from `gguf_layout`, the importer's table read in reverse (q/k rows permuted for llama.cpp's
rope, GPT-2's Conv1D matrices transposed, Gemma's norms stored as `w + 1`, Qwen3-MoE's per-expert matrices stacked),
the `{arch}.*` hyper-parameters (the common ones and `gguf_layout.HYPER_PARAMETERS`, from the model's config.json),
the tokenizer as `tokenizer.ggml.*` (token list, merges, token types, special ids, `pre`, `add_bos_token`) and the
chat template. A model whose values llama.cpp's loader would override (`gguf_layout.LOADER_FIXED`: Gemma's layer
pattern, query scale and soft caps, SmolLM3's layers without RoPE; Qwen3-MoE's dense layers or unnormalised top-k
weights) is refused, since llama.cpp would compute another function. Weights are quantised by `gguf_quant`
(types per tensor from `gguf_quant.tensor_type`). It is written by `gguf.GGUFWriter` into an `io.atomic_file`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.errors import LmcraftError
from lmcraft.gguf_layout import (
    ARCHITECTURES,
    GGUF_ARCH_OF,
    HYPER_PARAMETERS,
    LLAMA3_REGEX,
    LOADER_FIXED,
    PRE_NAMES,
    QWEN2_REGEX,
    gemma_query_scalar,
    gemma_sliding_layers,
    gguf_name,
    permute_qk,
)
from lmcraft.gguf_quant import QUANTS, file_type, quantize, tensor_type
from lmcraft.io import atomic_file
from lmcraft.models.config import ModelConfig

__all__ = ["ExportError", "Source", "expected_tensors", "export_gguf", "gguf_tensors", "load_source"]

_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED, _BYTE = 1, 5, 3, 4, 6  # tokenizer.ggml.token_type values
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte-fallback pieces


class ExportError(LmcraftError):
    """The model (or its tokenizer) cannot be written as GGUF."""


@dataclass
class Source:
    """The model an export starts from, float32 on CPU, and its tokenizer."""

    model: Any  # LanguageModel
    tokenizer: Any  # lmcraft.tokenizer.load.Tokenizer
    name: str
    notes: list[str] = field(default_factory=list)


def load_source(name_or_path: str) -> Source:
    """A model folder, asset name or .gguf (`assets.resolve_model`), or a PEFT adapter folder (merged into its
    base first: QLoRA bases are dequantised, merged, and quantised once by the export)."""
    import torch

    from lmcraft.assets import resolve_model
    from lmcraft.hub import load_model
    from lmcraft.peft.io import CONFIG_NAME
    from lmcraft.tokenizer.load import load_tokenizer

    path = Path(name_or_path)
    notes = []
    if (path / CONFIG_NAME).is_file():
        from lmcraft.finetune.merge import load_merged

        model, folder = load_merged(path, head="lm")
        notes.append(f"merged the adapter {path} into its base {folder}")
    else:
        folder = resolve_model(name_or_path)
        model = load_model(folder, head="lm", dtype=torch.float32)
    model = model.float().eval()
    return Source(model, load_tokenizer(folder), path.name or str(name_or_path), notes)


def _check_model(model: Any) -> str:
    cfg = model.config
    if cfg.model_type not in GGUF_ARCH_OF or not cfg.is_causal or model.head_kind != "lm":
        raise ExportError(f"a {cfg.model_type} model with a {model.head_kind} head has no llama.cpp architecture; "
                          f"GGUF export supports decoders with an LM head: {', '.join(GGUF_ARCH_OF)}.")
    if cfg.rope_scaling:
        raise ExportError(f"rope_scaling {cfg.rope_scaling} is not exported (llama.cpp stores some kinds as a "
                          "rope_freqs tensor that lmcraft does not write); export a model without it.")
    if cfg.model_type != "gpt2" and (cfg.mlp_bias or (cfg.model_type == "llama" and cfg.qkv_bias != cfg.out_bias)):
        raise ExportError("MLP biases, or q/k/v biases without an output-projection bias, have no place in "
                          "llama.cpp's llama architecture.")
    arch = GGUF_ARCH_OF[cfg.model_type]
    problem = _loader_mismatch(arch, cfg)
    if problem:
        raise ExportError(f"this {cfg.model_type} model cannot run in llama.cpp's {arch} architecture: {problem}.")
    return arch


def _loader_mismatch(arch: str, cfg: ModelConfig) -> str | None:
    """What of `cfg` llama.cpp's loader would override for `arch` (see the module docstring); None when nothing."""
    if arch in ("gemma2", "gemma3"):
        sliding = gemma_sliding_layers(arch, cfg.num_layers)
        if [cfg.layer_window(i) is not None for i in range(cfg.num_layers)] != sliding:
            every = LOADER_FIXED["gemma_pattern"][arch]
            return (f"llama.cpp makes the last layer of every {every} global and the others sliding-window ones, "
                    "and this model's layer_types differ")
        scalar = gemma_query_scalar(arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        if abs((cfg.attention_scale or cfg.head_dim**-0.5) - scalar**-0.5) > 1e-6 * scalar**-0.5:
            return f"llama.cpp scales attention scores by 1/sqrt({scalar}), this model by {cfg.attention_scale}"
        caps = (cfg.attn_logit_softcap, cfg.final_logit_softcap)
        if arch == "gemma2" and None in caps:
            return "llama.cpp's gemma2 always soft-caps attention scores and logits, this model leaves one uncapped"
        if arch == "gemma3" and caps != (None, None):
            return f"llama.cpp's gemma3 applies no soft caps, this model caps at {caps}"
        local = cfg.rope_local_theta or cfg.rope_theta
        if arch == "gemma3" and local != LOADER_FIXED["gemma3_local_rope_base"]:
            return f"llama.cpp's local RoPE base is {LOADER_FIXED['gemma3_local_rope_base']:g}, this model's {local:g}"
    if arch == "smollm3":
        every = LOADER_FIXED["smollm3_nope_interval"]
        if cfg.nope_layers != tuple(i for i in range(cfg.num_layers) if (i + 1) % every == 0):
            return (f"llama.cpp leaves RoPE out of the last layer of every {every}, this model out of layers "
                    f"{list(cfg.nope_layers)}")
    if arch == "qwen3moe":
        if not all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
            return "llama.cpp's qwen3moe has a mixture of experts in every layer, this model has dense ones"
        if not cfg.norm_topk_prob:
            return "llama.cpp's qwen3moe renormalises the top-k router weights (norm_topk_prob: true)"
    return None


def gguf_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """The model's tensors under GGUF names, in llama.cpp's layout, float32 numpy."""
    from lmcraft.hub.save import hf_state_dict

    arch = _check_model(model)
    cfg = model.config
    heads = {"rope_q": cfg.num_heads, "rope_k": cfg.num_kv_heads}
    shift = np.float32(ARCHITECTURES[arch].norm_shift)
    out, experts = [], {}
    for name, tensor in hf_state_dict(model).items():
        found = gguf_name(arch, name)
        if found is None:
            raise ExportError(f"tensor {name} has no llama.cpp name in the {arch} architecture.")
        gname, layout = found
        x = tensor.detach().float().cpu().numpy()
        if layout == "experts":  # HF's expert e -> row e of the stacked GGUF tensor
            experts.setdefault(gname, {})[[int(p) for p in name.split(".") if p.isdigit()][1]] = x
            continue
        if layout == "transpose":
            x = np.ascontiguousarray(x.T)
        elif layout and ARCHITECTURES[arch].rope_permuted:
            x = permute_qk(x, heads[layout])
        elif gname.endswith("norm.weight") and shift:
            x = x + shift
        out.append((gname, x))
    out += [(gname, np.stack([by_expert[e] for e in sorted(by_expert)])) for gname, by_expert in experts.items()]
    return out


def expected_tensors(model: Any, quant: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (type, numpy shape) the export of `model` with `quant` writes."""
    tensors = gguf_tensors(model)
    names = {n for n, _ in tensors}
    tied = "output.weight" not in names
    cfg = model.config
    return {n: (tensor_type(n, x.shape, quant, cfg.num_layers, tied, cfg.num_experts), x.shape) for n, x in tensors}


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _pre_name(spec: dict[str, Any]) -> str:
    """`tokenizer.ggml.pre` for the pre-tokenizer of a tokenizer.json (one of the families llama.cpp knows)."""
    pre = spec.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    family = None
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        family = "gpt2"
    elif kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        family = "digits"
    elif kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        family = {LLAMA3_REGEX: "llama3", QWEN2_REGEX: "qwen2"}.get((items[0].get("pattern") or {}).get("Regex"))
    if family is None:
        raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is none of the split rules "
                          f"lmcraft can name for llama.cpp ({', '.join(PRE_NAMES.values())}); llama.cpp would "
                          "tokenize text differently, so the export stops here.")
    return PRE_NAMES[family]


def _space_prefix(spec: dict[str, Any]) -> bool:
    """SentencePiece's `add_space_prefix` from a byte-fallback BPE tokenizer.json: its normalizer replaces spaces by
    `▁` and (prefix) prepends one `▁`; anything else is not a SentencePiece pipeline llama.cpp reproduces."""
    norm = spec.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    kinds = [(n.get("type"), n.get("prepend") or (n.get("pattern") or {}).get("String"), n.get("content"))
             for n in steps]
    if spec.get("pre_tokenizer") is None and kinds in ([("Replace", " ", "\u2581")],
                                                       [("Prepend", "\u2581", None), ("Replace", " ", "\u2581")]):
        return len(kinds) == 2
    raise ExportError(f"the SentencePiece-style tokenizer's normalizer/pre-tokenizer ({json.dumps(norm)[:200]}, "
                      f"{json.dumps(spec.get('pre_tokenizer'))[:100]}) is not the one llama.cpp's SentencePiece "
                      "tokenizer applies (spaces as '\u2581', optionally one in front); the export stops here.")


def _sentencepiece_scores(merges: list[str], by_id: dict[int, str], vocab_size: int) -> list[float]:
    """Piece scores that make llama.cpp's SentencePiece tokenizer (join the adjacent pair whose concatenation scores
    highest) take the BPE's choices (merge the lowest-ranked pair): score(l + r) = -(rank of its first merge), the
    inverse of `gguf_import.sentencepiece_merges`. Pieces no merge makes (characters, bytes, special tokens), which
    llama.cpp never forms by joining either, score below all of them, each its own: -(number of merges + id)."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        first.setdefault(left + right, rank)
    return [-float(first.get(by_id.get(i, ""), len(merges) + i)) for i in range(vocab_size)]


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """`tokenizer.ggml.*`: a byte-level BPE as llama.cpp's `gpt2` model (tokens, merges, `pre`), a byte-fallback BPE
    over `▁`-spaced text (what SentencePiece vocabularies become in tokenizer.json) as its `llama` model (pieces,
    scores, `<0xNN>` byte pieces, `add_space_prefix`); then token types, special ids and the chat template."""
    backend = tokenizer.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    steps = [d.get("type") for d in decoder.get("decoders", [])] if decoder.get("type") == "Sequence" else []
    sentencepiece = model.get("type") == "BPE" and model.get("byte_fallback") and "ByteFallback" in steps
    if model.get("type") != "BPE" or (decoder.get("type") != "ByteLevel" and not sentencepiece):
        raise ExportError(f"only byte-level BPE and SentencePiece-style (byte-fallback BPE) tokenizers are exported "
                          f"(this one is {model.get('type')} with a {decoder.get('type')} decoder).")
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}, the model's embedding only {vocab_size} rows.")
    added = backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # as llama.cpp's converter: padding rows of the embedding become unused tokens
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(_CONTROL if added[i].special else _USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_BYTE if sentencepiece and _BYTE_PIECE.fullmatch(by_id[i]) else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(_sentencepiece_scores(merges, by_id, vocab_size))
        writer.add_add_space_prefix(_space_prefix(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(spec))
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
    writer.add_token_types(types)
    probe = backend.encode("a").ids
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
                             and len(probe) > 1)
    if tokenizer.chat_template:
        from lmcraft.tokenizer.chat import resolve_template

        writer.add_chat_template(resolve_template(tokenizer.chat_template))


# llama.cpp (llama-vocab.cpp) sets Phi-3's token attributes on any model whose general.name contains one of these
# (case-insensitive), looking its special tokens up by text: a vocabulary without them fails to load.
_PHI3_NAMES, _PHI3_TOKENS = ("phi3", "phi-3"), ("<unk>", "<s>", "<|endoftext|>")


def _general_name(source: Source) -> str:
    """`general.name`: the source's name, with "phi3"/"phi-3" spelled "phi_3" when the vocabulary lacks the Phi-3
    tokens llama.cpp would look up for such a name (a note says so)."""
    name = source.name
    if not any(key in name.lower() for key in _PHI3_NAMES):
        return name
    vocab = source.tokenizer.backend.get_vocab(with_added_tokens=True)
    missing = [t for t in _PHI3_TOKENS if t not in vocab]
    if not missing:
        return name
    safe = re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:3] + "_3", name)
    source.notes.append(f"general.name {name!r} is written as {safe!r}: llama.cpp looks up {', '.join(missing)} in "
                        "the vocabulary of any model whose name contains 'phi3' or 'phi-3', and fails to load this "
                        "one without them")
    return safe


def _add_hyper_parameters(writer: Any, arch: str, model: Any) -> None:
    from lmcraft.hub.hf_config import to_hf_config

    cfg = model.config
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    hf = to_hf_config(cfg, model.head_kind)
    for hyper in HYPER_PARAMETERS.get(arch, ()):
        hyper.write(writer, arch, hf)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def export_gguf(source: Source, out: str | Path, quant: str = "f16", progress: bool = True) -> dict[str, int]:
    """Write `source` as a GGUF file at `out` (atomically) with the `quant` mix; returns a count of tensor types."""
    import gguf
    from gguf.gguf_writer import WriterState

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}.")
    model, cfg = source.model, source.model.config
    arch = _check_model(model)
    if cfg.sliding_window and arch == "phi3":
        source.notes.append(f"sliding_window={cfg.sliding_window} is stored, but llama.cpp's phi3 attends to the "
                            "whole context (its loader turns Phi-3's sliding window off)")
    elif cfg.sliding_window and arch not in ("gemma2", "gemma3"):
        source.notes.append(f"sliding_window={cfg.sliding_window} is not stored: llama.cpp's {arch} architecture "
                            "attends to the whole context")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(_general_name(source))
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyper_parameters(writer, arch, model)
    _add_tokenizer(writer, source.tokenizer, cfg.vocab_size)

    tensors = gguf_tensors(model)
    tied = "output.weight" not in {n for n, _ in tensors}
    counts: Counter[str] = Counter()
    for name, x in tensors:
        qtype = tensor_type(name, x.shape, quant, cfg.num_layers, tied, cfg.num_experts)
        data = quantize(x, qtype)
        raw = None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, data, raw_dtype=raw)
        counts[qtype] += 1
    with atomic_file(Path(out)) as fh:
        writer.fout, writer.state = [fh], WriterState.EMPTY  # GGUFWriter writes into our temporary file
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.fout = None  # atomic_file closes, syncs and renames it
    return dict(counts)
