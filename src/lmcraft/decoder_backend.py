"""Which engine computes the logits of `generate`, `chat`, `eval` and `serve`: `backend: auto | torch | llamacpp`.

* torch: lmcraft's own model (`models/`), any device.
* llamacpp: llama.cpp on CPU (`generate/llamacpp_backend.py`, the `llamacpp` extra). A .gguf MODEL is opened as
  it is; any other model (adapter merged first) is exported once to a GGUF file in the lmcraft cache,
  `<cache>/llamacpp/<sha256 of weights, config and tokenizer>-<f32|f16>.gguf` (f32 for fp32 weights, f16 for
  bf16), and opened from there. Tokenizer, chat template and token choice stay lmcraft's.
* auto: llamacpp when the device is the CPU, `llama_cpp` is importable and the model is a .gguf file or can be
  exported (a decoder of a llama.cpp architecture with a byte-level BPE or SentencePiece-style tokenizer); else
  torch. Why it chose torch is said in the returned note.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.errors import ConfigError, LmcraftError

__all__ = ["BACKENDS", "Decoder", "cached_gguf", "load_decoder", "to_backend"]

BACKENDS = ("auto", "torch", "llamacpp")
_CACHE_FORMAT = 2  # bump when the exporter's output for the same model changes


@dataclass
class Decoder:
    """A model ready to decode (a torch `LanguageModel` or a `LlamaCppModel`), its tokenizer and folder, the
    backend that was chosen and, when auto chose torch, why."""

    model: Any
    tokenizer: Any
    folder: Path
    backend: str
    note: str | None = None


def _check(backend: str, device: str | None) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if backend == "llamacpp" and device not in (None, "cpu"):
        raise ConfigError(f"backend llamacpp runs on the CPU; device {device!r} needs backend torch (or auto).")


def _auto_reason(device: str | None) -> str | None:
    """Why auto cannot use llama.cpp here (None: it can)."""
    from lmcraft.generate.llamacpp_backend import llama_cpp_available

    if device not in (None, "cpu"):
        return f"device {device}"
    if not llama_cpp_available():
        return "llama_cpp is not installed (pip install 'lmcraft[llamacpp]')"
    return None


def _model_hash(model: Any, tokenizer: Any) -> str:
    """sha256 over the weights (GGUF names, float32 bytes), the config and the tokenizer definition."""
    from lmcraft.gguf_export import gguf_tensors

    digest = hashlib.sha256(f"lmcraft-llamacpp-{_CACHE_FORMAT}".encode())
    digest.update(json.dumps(model.config.__dict__, sort_keys=True, default=str).encode())
    digest.update(tokenizer.backend.to_str().encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    for name, array in gguf_tensors(model):
        digest.update(name.encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def cached_gguf(model: Any, tokenizer: Any, quant: str = "f32", cache_dir: str | Path | None = None) -> Path:
    """The GGUF export (`quant` f32 or f16) of a torch model in the lmcraft cache, written the first time.
    Raises `gguf_export.ExportError` when the model or tokenizer has no llama.cpp form."""
    from lmcraft.assets import cache_root
    from lmcraft.gguf_export import Source, export_gguf

    path = cache_root(cache_dir) / "llamacpp" / f"{_model_hash(model, tokenizer)}-{quant}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(Source(model, tokenizer, path.stem), path, quant, progress=False)
    return path


def _mergeable(model: Any) -> Any:
    """A model with a PEFT adapter merged into plain weights (what llama.cpp can run); the model itself otherwise."""
    from lmcraft.peft.model import PeftModel

    if not isinstance(model, PeftModel):
        return model
    from lmcraft.peft import merge

    merged = merge(model)
    if isinstance(merged, PeftModel):
        raise LmcraftError("this adapter (prefix or prompt tuning) does not merge into the weights; llama.cpp "
                           "cannot run it: use backend torch.")
    return merged


def to_backend(model: Any, tokenizer: Any, folder: Path, backend: str = "auto", device: str | None = "cpu",
               threads: int | None = None) -> Decoder:
    """The loaded torch `model` (with an adapter, if any) on `backend`: itself for torch, its cached GGUF export
    in llama.cpp for llamacpp (auto: torch when llama.cpp is not available or the model not exportable)."""
    import torch

    from lmcraft.generate.llamacpp_backend import LlamaCppModel

    _check(backend, device)
    if backend == "torch":
        return Decoder(model, tokenizer, folder, "torch")
    if backend == "auto" and (reason := _auto_reason(device)) is not None:
        return Decoder(model, tokenizer, folder, "torch", f"backend auto chose torch: {reason}")
    quant = "f32" if next(model.parameters()).dtype == torch.float32 else "f16"
    try:
        path = cached_gguf(_mergeable(model), tokenizer, quant)
    except LmcraftError as err:  # ExportError included
        if backend == "llamacpp":
            raise
        return Decoder(model, tokenizer, folder, "torch", f"backend auto chose torch: not exportable to GGUF ({err})")
    return Decoder(LlamaCppModel(path, model.config, threads), tokenizer, folder, "llamacpp")


def load_decoder(name_or_path: str | Path, backend: str = "auto", dtype: Any = None, device: str | None = "cpu",
                 adapter: str | Path | None = None, threads: int | None = None) -> Decoder:
    """MODEL (folder, .gguf file or asset name; `assets.resolve_model`) with an optional PEFT `adapter`, on
    `backend`. A .gguf file without an adapter goes to llama.cpp as it is (its converted folder gives the
    tokenizer and config; no torch weights are loaded)."""
    from lmcraft.assets import resolve_model
    from lmcraft.hub import load_config, load_model
    from lmcraft.tokenizer.load import load_tokenizer

    _check(backend, device)
    folder = resolve_model(name_or_path)
    path = Path(name_or_path)
    if (path.suffix == ".gguf" and path.is_file() and adapter is None and backend != "torch"
            and (backend == "llamacpp" or _auto_reason(device) is None)):
        from lmcraft.generate.llamacpp_backend import LlamaCppModel

        return Decoder(LlamaCppModel(path, load_config(folder), threads), load_tokenizer(folder), folder, "llamacpp")
    model = load_model(folder, dtype=dtype, device=device)  # before the tokenizer: a bad weights file is named first
    tokenizer = load_tokenizer(folder)
    if adapter is not None:
        from lmcraft.peft import load_adapter

        model = load_adapter(model, adapter).eval()
    return to_backend(model, tokenizer, folder, backend, device, threads)
