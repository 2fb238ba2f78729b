"""Import a GGUF file (llama.cpp's format: llama, qwen2, qwen3, qwen3moe, olmo2, granite, smollm3, phi3, gemma,
gemma2, gemma3, gpt2) as a Hugging Face-layout model folder.

`convert_gguf(path, out_dir)` reads the file with the pure-Python `gguf` package and writes
`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
`generation_config.json`, so that the result opens in lmcraft, in `transformers` and in any other
tool that reads HF folders.

Three pieces of math live here:

* **Dequantisation** (`dequantize`). GGUF stores a weight row as blocks. For the "legacy" types
  a block of 32 values holds an fp16 scale `d` (and for `_1` types an fp16 offset `m`) and small
  integers `q`: Q4_0 `x = d * (q - 8)`, Q4_1 `x = d * q + m`, Q5_0 `x = d * (q - 16)`,
  Q5_1 `x = d * q + m` (q has 5 bits, the 5th stored in a separate 32-bit mask), Q8_0
  `x = d * q` (q is int8). The "K" types use super-blocks of 256 values split into 8 or 16
  sub-blocks, each with its own 6-bit (Q4_K, Q5_K) or int8 (Q6_K) scale: Q4_K/Q5_K
  `x = d * sc_j * q - dmin * m_j`, Q6_K `x = d * sc_j * (q - 32)`. Every function below works on a
  whole tensor at once (numpy arrays of shape `(n_blocks, block_bytes)`), never block by block.
* **Layout** (`lmcraft.gguf_layout`, shared with the exporter): tensor names per architecture, llama.cpp's
  permutation of q/k rows for its rope layout (`unpermute_qk` undoes it), GPT-2's transposed matrices,
  Gemma's norms stored as `w + 1` (the importer writes HF's `w`), Qwen3-MoE's stacked experts (split into HF's
  per-expert tensors) and the family hyper-parameters.
* **Tokenizer** (`build_tokenizer`). A GGUF has no `tokenizer.json`. A byte-level BPE vocabulary
  (`tokenizer.ggml.model = gpt2`) comes with its merges, token types and a pre-tokenizer name
  (`tokenizer.ggml.pre`); we rebuild the HF `tokenizers` pipeline that name stands for (llama.cpp's
  `llama-vocab.cpp` lists the regexes). A SentencePiece vocabulary (`llama`) has pieces and scores but no
  merges: llama.cpp's tokenizer repeatedly joins the adjacent pair whose concatenation is the highest-scoring
  piece (ties: leftmost). A BPE whose merges are every split `(l, r)` of every piece `l + r`, ranked by the
  piece's score, makes the same choices, so that is what we build (`sentencepiece_merges`), with `▁` for
  spaces, byte fallback to the `<0xNN>` pieces and the control/user-defined pieces matched whole in the text.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.errors import ModelLoadError
from lmcraft.gguf_layout import (
    ARCHITECTURES,
    HYPER_PARAMETERS,
    LLAMA3_REGEX,
    LOADER_FIXED,
    PRE_FAMILIES,
    QWEN2_REGEX,
    gemma_query_scalar,
    gemma_sliding_layers,
    hf_name,
    permute_qk,
    short_float,
    unpermute_qk,
)
from lmcraft.io import atomic_file, excerpt, write_json

__all__ = [
    "GGUFImportError",
    "SUPPORTED_TYPES",
    "build_tokenizer",
    "convert_gguf",
    "dequantize",
    "hf_config",
    "permute_qk",
    "read_gguf",
    "sentencepiece_merges",
    "unpermute_qk",
    "write_hf_model",
]


class GGUFImportError(ModelLoadError):
    """A GGUF file cannot be imported: not a GGUF, unsupported architecture, tensor type or tokenizer."""


# ----------------------------------------------------------------------------------------------
# Dequantisation
# ----------------------------------------------------------------------------------------------


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 bytes -> (n, 1) float32 (little-endian IEEE half)."""
    return raw.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32): low nibbles are values 0..15, high nibbles values 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8.0)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b[:, 2:4])


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 mask -> (n, 32) bits, bit j belongs to value j."""
    mask = qh.view("<u4")
    return ((mask >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << 4)
    return _f16(b[:, 0:2]) * (q.astype(np.float32) - 16.0)


def _q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << 4)
    return _f16(b[:, 0:2]) * q.astype(np.float32) + _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * b[:, 2:34].view(np.int8).astype(np.float32)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (llama.cpp `get_scale_min_k4`)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k4_values(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): chunk c's low nibbles are sub-block 2c, its high nibbles 2c+1."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    sc, mn = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _k4_values(b[:, 16:144]).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)


def _q5_k(b: np.ndarray) -> np.ndarray:
    sc, mn = _k_scales(b[:, 4:16])
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    qh = b[:, 16:48]  # bit j of qh[l] is the 5th bit of value l of sub-block j
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (_k4_values(b[:, 48:176]) | (high << 4)).astype(np.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 64)  # two halves of 128 values each
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    lo, hi = ql & 0x0F, ql >> 4
    q = np.concatenate(
        [
            lo[..., :32] | ((qh & 3) << 4),
            lo[..., 32:] | (((qh >> 2) & 3) << 4),
            hi[..., :32] | (((qh >> 4) & 3) << 4),
            hi[..., 32:] | (((qh >> 6) & 3) << 4),
        ],
        axis=2,
    ).reshape(-1, 256)
    return d * np.repeat(sc, 16, axis=1) * (q.astype(np.float32) - 32.0)


# GGML type id -> (name, values per block, bytes per block, block decoder). Ids are ggml's enum.
_BLOCK_TYPES: dict[int, tuple[str, int, int, Callable[[np.ndarray], np.ndarray]]] = {
    2: ("Q4_0", 32, 18, _q4_0),
    3: ("Q4_1", 32, 20, _q4_1),
    6: ("Q5_0", 32, 22, _q5_0),
    7: ("Q5_1", 32, 24, _q5_1),
    8: ("Q8_0", 32, 34, _q8_0),
    12: ("Q4_K", 256, 144, _q4_k),
    13: ("Q5_K", 256, 176, _q5_k),
    14: ("Q6_K", 256, 210, _q6_k),
}
_PLAIN_TYPES: dict[int, tuple[str, str]] = {0: ("F32", "<f4"), 1: ("F16", "<f2"), 30: ("BF16", "<u2")}
SUPPORTED_TYPES: tuple[str, ...] = tuple(n for n, _ in _PLAIN_TYPES.values()) + tuple(
    v[0] for v in _BLOCK_TYPES.values()
)


def _type_name(qtype: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def _check_type(qtype: int, what: str) -> None:
    if int(qtype) not in _PLAIN_TYPES and int(qtype) not in _BLOCK_TYPES:
        raise GGUFImportError(
            f"{what} has type {_type_name(qtype)}, which lmcraft cannot dequantise; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}."
        )


def dequantize(raw: np.ndarray, qtype: int, shape: Sequence[int]) -> np.ndarray:
    """Decode the bytes of one GGUF tensor into a float32 array of numpy `shape` (row-major).

    `raw` is the tensor's data as stored (any dtype; it is reinterpreted as bytes); blocks run
    along the last axis. Raises `GGUFImportError` for a type this module does not decode.
    """
    qtype = int(qtype)
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n = int(np.prod(shape, dtype=np.int64))
    if qtype in _PLAIN_TYPES:
        name, dtype = _PLAIN_TYPES[qtype]
        values = data.view(dtype)
        if name == "BF16":  # bf16 is the upper half of an fp32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(np.float32, copy=False).reshape(shape)
    _check_type(qtype, "GGUF tensor")
    name, per_block, nbytes, decode = _BLOCK_TYPES[qtype]
    if n % per_block or data.size != n // per_block * nbytes:
        raise GGUFImportError(f"{name} tensor of shape {tuple(shape)} does not hold whole {per_block}-value blocks.")
    return decode(data.reshape(-1, nbytes)).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


_MIN_TENSOR_INFO = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_MIN_KV = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value


def _check_header(path: Path) -> None:
    """Validate the fixed GGUF header (magic, version, counts) against the file size before any allocation:
    a header declaring 2^40 tensors must fail here, not in the reader's arrays."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise GGUFImportError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF').")
    if len(head) < 24:
        raise GGUFImportError(f"{path}: truncated GGUF header ({size} bytes; the header alone has 24).")
    version = int.from_bytes(head[4:8], "little")
    n_tensors, n_kv = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    if version not in (2, 3):
        raise GGUFImportError(f"{path}, byte 4: GGUF version {version} is not supported (2 or 3 expected).")
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > size - 24:
        raise GGUFImportError(
            f"{path}, byte 8: the header declares {n_tensors:,} tensors and {n_kv:,} metadata entries, more than "
            f"a {size:,}-byte file can hold: the file is corrupt or truncated.")


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads the GGUF header sections at a byte offset; every short read names the offset and what was expected."""

    def __init__(self, path: Path, data: bytes, offset: int) -> None:
        self.path, self.data, self.offset = path, data, offset

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.offset + n > len(self.data):
            raise GGUFImportError(f"{self.path}, byte {self.offset}: expected {what} ({n} bytes) but the file ends at "
                                  f"byte {len(self.data)}: the file is truncated or corrupt.")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def string(self, what: str) -> bytes:
        return self.take(self.uint(8, f"the length of {what}"), what)

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_SIZES:
            return self.take(_SCALAR_SIZES[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            item, count = self.uint(4, f"the item type of {what}"), self.uint(8, f"the length of {what}")
            if item in _SCALAR_SIZES:
                return self.take(_SCALAR_SIZES[item] * count, f"{count:,} items of {what}")
            for i in range(count):
                self.value(item, f"item {i} of {what}", depth + 1)
            return None
        raise GGUFImportError(f"{self.path}, byte {self.offset - 4}: {what} has value type {vtype}, which is not a "
                              "GGUF type: the file is corrupt.")


def _check_layout(path: Path) -> None:
    """Walk the GGUF header, metadata and tensor table and check every tensor's bytes lie inside the file, before
    any reader allocates: a truncated or corrupt file fails here with the byte offset and what was expected."""
    _check_header(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _check_tables(path, data)


def _check_tables(path: Path, data: Any) -> None:
    import gguf

    size = len(data)
    cur = _Cursor(path, data, 8)
    n_tensors, n_kv = cur.uint(8, "the tensor count"), cur.uint(8, "the metadata count")
    alignment = 32
    for i in range(n_kv):
        key = cur.string(f"the key of metadata entry {i}").decode("utf-8", "replace")
        vtype = cur.uint(4, f"the value type of {key}")
        value = cur.value(vtype, f"the value of {key}")
        if key == "general.alignment" and isinstance(value, bytes):
            alignment = int.from_bytes(value, "little") or 32
    infos = []
    for i in range(n_tensors):
        start = cur.offset
        name = cur.string(f"the name of tensor {i}").decode("utf-8", "replace")
        n_dims = cur.uint(4, f"the dimension count of tensor {name}")
        if n_dims > 8:
            raise GGUFImportError(f"{path}, byte {cur.offset - 4}: tensor {name} has {n_dims} dimensions (at most "
                                  "8 expected): the file is corrupt.")
        dims = [cur.uint(8, f"dimension {d} of tensor {name}") for d in range(n_dims)]
        qtype, offset = cur.uint(4, f"the type of tensor {name}"), cur.uint(8, f"the data offset of tensor {name}")
        infos.append((name, dims, qtype, offset, start))
    data_start = -(-cur.offset // alignment) * alignment
    for name, dims, qtype, offset, start in infos:
        try:
            per_block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise GGUFImportError(f"{path}, byte {start}: tensor {name} has type {qtype}, which is not a GGML "
                                  "type: the file is corrupt.") from None
        n = int(np.prod(dims, dtype=np.float64))
        end = data_start + offset + n // per_block * nbytes
        if end > size:
            raise GGUFImportError(f"{path}, byte {data_start + offset}: tensor {name} ({'x'.join(map(str, dims))}, "
                                  f"{gguf.GGMLQuantizationType(qtype).name}) needs bytes up to {end:,}, but the file "
                                  f"ends at byte {size:,}: the file is truncated.")


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[Any]]:
    """`(metadata, tensors)` of a GGUF file: metadata as plain Python values, tensors as gguf ReaderTensors."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    _check_layout(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as err:
        reason = f"{type(err).__name__}: {excerpt(str(err))}"
        raise GGUFImportError(f"{path}: not a readable GGUF file ({reason}).") from None
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return metadata, list(reader.tensors)


# ----------------------------------------------------------------------------------------------
# Architecture: tensor names and config
# ----------------------------------------------------------------------------------------------

def _hf_name(arch: str, name: str, path: Path) -> tuple[str, str]:
    found = hf_name(arch, name)
    if found is not None:
        return found
    if name == "rope_freqs.weight":
        raise GGUFImportError(
            f"{path}: tensor rope_freqs.weight (Llama-3.1-style rope frequency factors) is not supported; "
            "the HF rope_scaling it came from cannot be recovered from the file."
        )
    raise GGUFImportError(f"{path}: tensor {name!r} has no Hugging Face counterpart in a {arch} model.")


def hf_config(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path, dtype: str) -> dict[str, Any]:
    """The HF `config.json` dict for a GGUF of a supported architecture: `{arch}.*` metadata plus tensor
    names -> numpy shapes."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFImportError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}."
        )
    model_type, hf_class = ARCHITECTURES[arch].hf_model_type, ARCHITECTURES[arch].hf_class

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFImportError(f"{path}: metadata key {arch}.{name} is missing.")
        return value

    if "token_embd.weight" not in shapes:
        raise GGUFImportError(f"{path}: the file has no token_embd.weight tensor.")
    token_ids = {f"{name}_token_id": int(metadata[f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"])
                 for name in ("bos", "eos", "pad")
                 if metadata.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id") is not None}
    token_ids.setdefault("pad_token_id", None)  # no padding token: not a family default such as Phi-3's 32000
    if arch == "gpt2":
        return {
            "architectures": [hf_class], "model_type": model_type, "vocab_size": shapes["token_embd.weight"][0],
            "n_embd": int(key("embedding_length")), "n_layer": int(key("block_count")),
            "n_head": int(key("attention.head_count")), "n_positions": int(key("context_length")),
            "n_inner": int(key("feed_forward_length")), "activation_function": "gelu_new",
            "layer_norm_epsilon": short_float(key("attention.layer_norm_epsilon")),
            "tie_word_embeddings": "output.weight" not in shapes, "torch_dtype": dtype, **token_ids,
        }
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFImportError(f"{path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported.")
    names = set(shapes)
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],  # embedding rows; the token list may be shorter
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": short_float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": short_float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, arch),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch != "qwen2":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    if model_type == "llama":
        config["mlp_bias"] = False
    for hyper in HYPER_PARAMETERS.get(arch, ()):
        config[hyper.hf] = hyper.read(metadata, arch, config)
        if config[hyper.hf] is None:
            raise GGUFImportError(f"{path}: metadata key {arch}.{hyper.gguf} is missing.")
    if arch in _FAMILY_KEYS:
        config.update(_FAMILY_KEYS[arch](key, config))
    config.update(token_ids)
    return config


Key = Callable[..., Any]  # key(name, default=None): the `{arch}.{name}` metadata value, an error when missing


# llama.cpp's converter writes no layer pattern, query scale or local rope base for Gemma 2/3: its loader fixes them
# (`gguf_layout.LOADER_FIXED`).
def _gemma(arch: str) -> Callable[[Key, dict[str, Any]], dict[str, Any]]:
    def keys(key: Key, config: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
        if arch == "gemma":
            return out
        layers = config["num_hidden_layers"]
        pattern = key("attention.sliding_window_pattern", 0)
        sliding = ([bool(x) for x in pattern] if isinstance(pattern, list)
                   else [(i + 1) % int(pattern) != 0 for i in range(layers)] if pattern
                   else gemma_sliding_layers(arch, layers))
        if len(sliding) != layers:
            raise GGUFImportError(f"{arch}.attention.sliding_window_pattern has {len(sliding)} entries for "
                                  f"{layers} layers.")
        out.update({
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "query_pre_attn_scalar": gemma_query_scalar(arch, layers, config["hidden_size"],
                                                        config["num_attention_heads"], config["head_dim"]),
        })
        if arch == "gemma3":
            out.update({"rope_local_base_freq": LOADER_FIXED["gemma3_local_rope_base"], "attn_logit_softcapping": None,
                        "final_logit_softcapping": None, "use_bidirectional_attention": False})
        return out

    return keys


def _phi3(key: Key, config: dict[str, Any]) -> dict[str, Any]:
    return {"sliding_window": config["sliding_window"] or None}


def _qwen3moe(key: Key, config: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's qwen3moe has every layer sparse and renormalises the top-k router weights."""
    return {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


def _smollm3(key: Key, config: dict[str, Any]) -> dict[str, Any]:
    return {"no_rope_layer_interval": LOADER_FIXED["smollm3_nope_interval"], "use_sliding_window": False}


# GGUF architecture -> its HF config keys that need logic, after the `gguf_layout.HYPER_PARAMETERS` ones
_FAMILY_KEYS: dict[str, Callable[[Key, dict[str, Any]], dict[str, Any]]] = {
    "phi3": _phi3, "qwen3moe": _qwen3moe, "smollm3": _smollm3, **{a: _gemma(a) for a in ("gemma", "gemma2", "gemma3")},
}


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if kind == "none" or not factor or float(factor) == 1.0:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": short_float(factor)}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


def _pre_tokenizer(pre: str, path: Path) -> tuple[Any, Any, bool]:
    """(normalizer, pre_tokenizer, ignore_merges) for a byte-level BPE vocabulary named `pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    family = PRE_FAMILIES.get(pre)
    if family is None:
        warnings.warn(
            f"{path}: pre-tokenizer {pre!r} is not known to lmcraft; using GPT-2's split rules, so text may "
            "tokenize differently from the original model.",
            stacklevel=3,
        )
        family = "gpt2"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=family != "llama3")
    if family == "gpt2":
        return None, byte_level, False
    if family == "digits":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    split_regex = LLAMA3_REGEX if family == "llama3" else QWEN2_REGEX
    split = pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False)
    no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    normalizer = normalizers.NFC() if family == "qwen2" else None
    return normalizer, pre_tokenizers.Sequence([split, no_regex]), family == "llama3"


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equal to llama.cpp's SentencePiece tokenizer on this vocabulary.

    llama.cpp joins, again and again, the adjacent pair `(l, r)` whose concatenation is the piece with the highest
    score (leftmost first among equals). Every split of every piece into two pieces is a merge here, ranked by the
    joined piece's score (then by its id), so the BPE picks the same pair at every step, as long as the pieces that
    can be joined have distinct scores (SentencePiece gives every normal piece its own; `build_tokenizer` warns
    otherwise: among equals the BPE takes the lower id, not the leftmost pair).
    """
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = []
    for index in sorted(range(len(tokens)), key=lambda i: (-float(scores[i]), i)):
        piece = tokens[index]
        if vocab[piece] != index:
            continue
        merges.extend((piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab)
    return merges


def _adds(metadata: dict[str, Any], which: str) -> bool:
    """Whether the tokenizer adds BOS/EOS; llama.cpp adds BOS to a SentencePiece vocabulary that does not say."""
    default = which == "bos" and metadata.get("tokenizer.ggml.model") == "llama"
    return bool(metadata.get(f"tokenizer.ggml.add_{which}_token", default))


def _byte_level_pipeline(metadata: dict[str, Any], vocab: dict[str, int], path: Path) -> tuple[Any, list[Any]]:
    """(tokenizer, post-processors before BOS/EOS) of a byte-level BPE vocabulary."""
    from tokenizers import Tokenizer, decoders, models, processors

    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    normalizer, pre_tokenizer, ignore_merges = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt-2")), path)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok, [processors.ByteLevel(trim_offsets=False)]


def _sentencepiece_pipeline(
    metadata: dict[str, Any], vocab: dict[str, int], tokens: list[str]
) -> tuple[Any, list[Any]]:
    """(tokenizer, []) of a SentencePiece vocabulary as llama.cpp reads it: spaces become `▁`, a `▁` goes in front
    of the text and of every stretch after a control/user-defined token when `add_space_prefix` (default true),
    characters outside the vocabulary fall back to their `<0xNN>` byte pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = list(metadata.get("tokenizer.ggml.scores", [])) or [0.0] * len(tokens)
    types = list(metadata.get("tokenizer.ggml.token_type", [])) or [1] * len(tokens)
    normal = [s for s, k in zip(scores, types, strict=True) if k == _TOKEN_NORMAL]
    if len(set(normal)) < len(normal):
        warnings.warn(f"{len(normal) - len(set(normal))} normal pieces share their score with another; llama.cpp "
                      "joins the leftmost of equally scored pairs, lmcraft's BPE the lower id, so some texts may "
                      "tokenize differently.", stacklevel=3)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    model = models.BPE(vocab, sentencepiece_merges(tokens, scores), unk_token=unk, fuse_unk=False, byte_fallback=True)
    tok = Tokenizer(model)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, []


def build_tokenizer(metadata: dict[str, Any], path: Path) -> Any:
    """A `tokenizers.Tokenizer` equal to the one the GGUF's `tokenizer.ggml.*` metadata describes.

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and SentencePiece (`"llama"`, see
    `sentencepiece_merges`) vocabularies. Control tokens (type 3) become special added tokens,
    user-defined ones (type 4) plain added tokens, so both are matched whole in text, as in llama.cpp.
    """
    from tokenizers import AddedToken, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFImportError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
                              "SentencePiece 'llama' expected in tokenizer.ggml.model).")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        dupes = len(tokens) - len(vocab)
        warnings.warn(f"{path}: {dupes} duplicate token strings; keeping the first id of each.", stacklevel=2)
    if kind == "gpt2":
        tok, post = _byte_level_pipeline(metadata, vocab, path)
    else:
        tok, post = _sentencepiece_pipeline(metadata, vocab, tokens)

    types = list(metadata.get("tokenizer.ggml.token_type", [])) or [1] * len(tokens)
    typed = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, k in typed if k == _TOKEN_CONTROL]
    plain = [AddedToken(t, special=False, normalized=False) for t, k in typed if k == _TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)

    def flagged(which: str, key: str) -> tuple[str, int] | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if not _adds(metadata, which) or token_id is None:
            return None
        return tokens[int(token_id)], int(token_id)

    bos, eos = flagged("bos", "bos_token_id"), flagged("eos", "eos_token_id")
    if bos or eos:
        single = " ".join([*(bos[:1] if bos else ()), "$A", *(eos[:1] if eos else ())])
        pair = f"{single} {single.replace('$A', '$B:1')}"
        specials = dict(x for x in (bos, eos) if x)
        post.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items())))
    tok.post_processor = processors.Sequence(post) if post else None
    return tok


def _tokenizer_config(metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": _adds(metadata, "bos"),
        "add_eos_token": _adds(metadata, "eos"),
        "model_max_length": config.get("max_position_embeddings", config.get("n_positions")),
        "clean_up_tokenization_spaces": False,
    }
    if metadata.get("tokenizer.chat_template"):
        out["chat_template"] = metadata["tokenizer.chat_template"]
    return {k: v for k, v in out.items() if v is not None}


def _generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    eos = [int(metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in metadata]
    out: dict[str, Any] = {}
    if "tokenizer.ggml.bos_token_id" in metadata:
        out["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    if eos:
        unique = list(dict.fromkeys(eos))
        out["eos_token_id"] = unique[0] if len(unique) == 1 else unique
    if "tokenizer.ggml.padding_token_id" in metadata:
        out["pad_token_id"] = int(metadata["tokenizer.ggml.padding_token_id"])
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

_OUT_DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> stored dtype. bf16 keeps the upper 16 bits after round-to-nearest-even."""
    if dtype == "float32":
        return x.astype("<f4", copy=False)
    if dtype == "float16":
        return x.astype("<f2")
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")


def _write_safetensors(
    path: Path, specs: list[tuple[str, tuple[int, ...]]], tensors: Iterable[np.ndarray], dtype: str
) -> None:
    """Stream tensors into a safetensors file, one at a time (peak memory: one tensor).

    Format: 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape,
    [begin, end) byte offsets into the data section; space-padded to a multiple of 8), then the
    raw little-endian tensor bytes in header order.
    """
    code, itemsize = _OUT_DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape), tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape):
                raise GGUFImportError(f"internal: tensor {name} has shape {tensor.shape}, expected {shape}")
            f.write(np.ascontiguousarray(_cast(tensor, dtype)).tobytes())


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, name)


def write_hf_model(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str = "float32", progress: bool = True
) -> Path:
    """Write the HF files of a GGUF model into the existing directory `out_dir` (not atomic: see `convert_gguf`)."""
    from tqdm.auto import tqdm

    if dtype not in _OUT_DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not supported; choose one of {', '.join(_OUT_DTYPES)}.")
    path, out = Path(gguf_path), Path(out_dir)
    metadata, tensors = read_gguf(path)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in tensors}
    config = hf_config(metadata, shapes, path, dtype)
    tokenizer = build_tokenizer(metadata, path)  # fail on the tokenizer before the long tensor pass
    arch = metadata["general.architecture"]
    heads = {"rope_q": config.get("num_attention_heads"), "rope_k": config.get("num_key_value_heads")}
    shift = ARCHITECTURES[arch].norm_shift

    by_name: dict[str, tuple[Any, str, int | None]] = {}  # HF name -> (GGUF tensor, layout, expert index)
    for t in tensors:
        name, layout = _hf_name(arch, t.name, path)
        if layout == "experts":  # one stacked GGUF tensor -> one HF tensor per expert
            by_name.update({name.format(e=e): (t, layout, e) for e in range(shapes[t.name][0])})
        else:
            by_name[name] = (t, layout, None)
    order = sorted(by_name, key=_layer_key)

    def hf_shape(name: str) -> tuple[int, ...]:
        t, layout, _ = by_name[name]
        if layout == "experts":
            return shapes[t.name][1:]
        return shapes[t.name][::-1] if layout == "transpose" else shapes[t.name]

    specs = [(name, hf_shape(name)) for name in order]
    for t in tensors:  # fail before writing anything
        _check_type(t.tensor_type, f"{path}: tensor {t.name}")
    stacks: dict[str, np.ndarray] = {}  # the expert stacks of the layer being written, dequantised once

    def arrays() -> Iterable[np.ndarray]:
        for name, _ in tqdm(specs, desc=f"converting {path.name}", unit="tensor", disable=not progress):
            t, layout, expert = by_name[name]
            if expert is not None:
                if t.name not in stacks:
                    if len(stacks) == 3:  # gate, up and down of one layer
                        stacks.clear()
                    stacks[t.name] = dequantize(t.data, t.tensor_type, shapes[t.name])
                yield stacks[t.name][expert]
                continue
            x = dequantize(t.data, t.tensor_type, shapes[t.name])
            if layout == "transpose":
                x = np.ascontiguousarray(x.T)
            elif layout and ARCHITECTURES[arch].rope_permuted:
                x = unpermute_qk(x, heads[layout])
            elif t.name.endswith("norm.weight") and shift:
                x = x - np.float32(shift)
            yield x

    _write_safetensors(out / "model.safetensors", specs, arrays(), dtype)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", _generation_config(metadata))
    write_json(out / "tokenizer_config.json", _tokenizer_config(metadata, config))
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a llama-family GGUF file into a Hugging Face-layout folder at `out_dir`; return it.

    The files are written into a staging folder next to `out_dir` and moved in when complete
    (`hub.files.staged_folder`), so an interrupted conversion never leaves a half-written model behind.
    Into an existing non-empty `out_dir` only with `overwrite=True`, which replaces the model's files and
    keeps any other file there.
    """
    from lmcraft.hub.files import staged_folder

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise GGUFImportError(f"{out} already exists and is not empty; choose another folder (or pass --overwrite "
                              "to lmcraft convert).")
    with staged_folder(out) as tmp:
        write_hf_model(gguf_path, tmp, dtype=dtype, progress=progress)
    return out
