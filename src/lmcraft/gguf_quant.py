"""GGUF quantisers (the inverse of `gguf_import.dequantize`) and the per-tensor type choice of an export.

Every quantiser takes a float32 matrix `(rows, cols)` and returns its GGUF bytes `(rows, cols / per_block *
block_bytes)` as uint8, working on all blocks of a chunk of rows at once (numpy, no Python loop over blocks).
Block formats (ggml's): fp16 `d`, `m` scales, then packed integers.

* Q8_0 (32 values): `d = max|x| / 127`, `q = round(x / d)` (int8), `x ~ d q`.
* Q4_0 / Q5_0 (32): `M` = the value of largest magnitude (with its sign), `d = M / -8` (`/ -16`),
  `q = min(15 (31), trunc(x / d + 8.5 (16.5)))`, `x ~ d (q - 8 (16))`. Q5_0 keeps the 5th bits in a 32-bit mask.
* Q4_1 (32): `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min) / d + 0.5))`, `x ~ d q + m`.
* Q4_K (256 = 8 sub-blocks of 32): each sub-block gets a scale `s_j` and an offset `m_j >= 0`, `x ~ s_j q - m_j`
  with `q` in 0..15. They are fitted as llama.cpp's reference quantiser does (`make_qkx2_quants`): 21 candidate
  inverse scales `(15 + t) / (max - min)`, `t` in -1..1 step 0.1, each followed by the weighted least-squares
  `(s, m)` for its integers (weights `sqrt(mean x^2) + |x|`), keeping the smallest weighted error. Scales and
  offsets are then stored as 6-bit multiples of two fp16 super-block scales `d = max s / 63`, `dmin = max m / 63`,
  and `q` is recomputed against the stored scales.
* Q6_K (256 = 16 sub-blocks of 16): symmetric, `x ~ d sc_j (q - 32)`, `q` in 0..63, `sc_j` int8. Each sub-block's
  scale is the best of 19 candidates `-(32 + 0.1 t) / M`, `t` in -9..9, by the least-squares score
  `(sum w x l)^2 / sum w l^2` with weights `x^2` (llama.cpp's `make_qx_quants`, rmse type 1); the sub-block scales
  are stored as int8 multiples of `d = max|s| / 128` (fp16).

The choice of type per tensor (`tensor_type`) follows llama.cpp's `llama-quant.cpp` (documented there).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lmcraft.errors import LmcraftError

__all__ = ["BLOCK_SIZES", "QUANTS", "file_type", "quantize", "tensor_type", "to_bf16"]

# type name -> (values per block, bytes per block)
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
    "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210),
}
# --quant choice -> the default type of its 2-D tensors
QUANTS: dict[str, str] = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
                          "q4_1": "Q4_1", "q4_k_m": "Q4_K"}
_ROWS_PER_CHUNK_VALUES = 1 << 18  # values quantised at once (K-types hold ~21 candidates per value)


def _round(x: np.ndarray) -> np.ndarray:
    """C's roundf / llama.cpp's nearest_int: halves away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0.0, 1.0 / np.where(d == 0, 1.0, d)).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n, k) float -> (n, 2k) uint8 of little-endian halves."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: value j in the low nibble of byte j, value j+16 in the high one."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _signed_max(b: np.ndarray) -> np.ndarray:
    """Per row, the value of largest magnitude with its sign (the first one on ties)."""
    return np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1, keepdims=True) / 127
    q = _round(b * _inv(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _q4_0(b: np.ndarray) -> np.ndarray:
    d = _signed_max(b) / -8
    q = np.minimum(15, np.trunc(b * _inv(d) + 8.5)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _q5_0(b: np.ndarray) -> np.ndarray:
    d = _signed_max(b) / -16
    q = np.minimum(31, np.trunc(b * _inv(d) + 16.5)).astype(np.uint32)
    qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    low = _pack_nibbles((q & 0x0F).astype(np.uint8))
    return np.concatenate([_f16_bytes(d), qh.astype("<u4")[:, None].view(np.uint8), low], axis=1)


def _q4_1(b: np.ndarray) -> np.ndarray:
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    q = np.minimum(15, np.trunc((b - lo) * _inv(d) + 0.5)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)


def _fit_affine(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-blocks `x (n, k)` -> (scale, offset) per row with `x ~ scale * q - offset`, q in 0..nmax, offset >= 0."""
    w = np.sqrt((x * x).mean(axis=1, keepdims=True)) + np.abs(x)
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    span = x.max(axis=1, keepdims=True) - lo
    steps = np.arange(-10, 11, dtype=np.float32)[:, None, None] * 0.1  # (21, 1, 1)
    iscale = (nmax + steps) * _inv(span)[None]  # (21, n, 1)
    q = np.clip(_round(iscale * (x - lo)[None]), 0, nmax)
    sw, sx = w.sum(axis=1), (w * x).sum(axis=1)  # (n,)
    sl, sl2, sxl = (w * q).sum(axis=2), (w * q * q).sum(axis=2), (w * q * x).sum(axis=2)  # (21, n)
    det = sw * sl2 - sl * sl
    ok = det > 0
    safe = np.where(ok, det, 1.0)
    scale = np.where(ok, (sw * sxl - sx * sl) / safe, 0.0)
    mn = np.where(ok, (sl2 * sx - sl * sxl) / safe, 0.0)
    alone = (mn > 0) | ~ok  # a positive offset, or equal integers: refit the scale alone with offset 0
    scale = np.where(alone, sxl / np.where(sl2 > 0, sl2, 1.0), scale)
    mn = np.where(alone, 0.0, mn)
    err = (w * (scale[..., None] * q + mn[..., None] - x) ** 2).sum(axis=2)
    err = np.where(ok | (sl2 > 0), err, np.inf)
    best = err.argmin(axis=0)
    rows = np.arange(x.shape[0])
    flat = span[:, 0] == 0  # constant sub-block: x = lo exactly
    return (np.where(flat, 0.0, scale[best, rows]).astype(np.float32),
            np.where(flat, -lo[:, 0], -mn[best, rows]).astype(np.float32))


def _q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sub = b.reshape(n * 8, 32)
    scale, offset = _fit_affine(sub, 15)
    scale, offset = scale.reshape(n, 8), np.maximum(offset.reshape(n, 8), 0.0)
    d = (scale.max(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (offset.max(axis=1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    ls = np.clip(_round(scale * _inv(d)), 0, 63).astype(np.uint8)
    lm = np.clip(_round(offset * _inv(dmin)), 0, 63).astype(np.uint8)
    eff, effm = (d * ls)[:, :, None], (dmin * lm)[:, :, None]
    q = np.clip(_round((b.reshape(n, 8, 32) + effm) * _inv(eff)), 0, 15).astype(np.uint8)
    scales = np.concatenate([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
    ], axis=1)
    pairs = q.reshape(n, 4, 2, 32)  # chunk c: sub-block 2c in the low nibbles, 2c+1 in the high ones
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """Sub-blocks `x (n, k)` -> scale per row with `x ~ scale * l`, l in -nmax..nmax-1."""
    m = _signed_max(x)
    steps = np.arange(-9, 10, dtype=np.float32)[:, None, None] * 0.1
    iscale = -(nmax + steps) * _inv(m)[None]  # (19, n, 1)
    q = np.clip(_round(iscale * x[None]), -nmax, nmax - 1)
    w = x * x
    sxl, sl2 = (w * x * q).sum(axis=2), (w * q * q).sum(axis=2)
    score = np.where(sl2 > 0, sxl * sxl / np.where(sl2 > 0, sl2, 1.0), -np.inf)
    best = score.argmax(axis=0)
    rows = np.arange(x.shape[0])
    return np.where(sl2[best, rows] > 0, sxl[best, rows] / np.where(sl2[best, rows] > 0, sl2[best, rows], 1.0),
                    0.0).astype(np.float32)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scale = _fit_symmetric(b.reshape(n * 16, 16), 32).reshape(n, 16)
    top = _signed_max(scale)
    iscale = -128 * _inv(top)
    d = (1 / np.where(iscale == 0, np.inf, iscale)).astype(np.float16).astype(np.float32)
    sc = np.minimum(127, _round(iscale * scale)).astype(np.int8)
    eff = (d * sc)[:, :, None]
    q = (np.clip(_round(b.reshape(n, 16, 16) * _inv(eff)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    low = q & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)  # (n, 2, 64)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16): the upper half after round-to-nearest-even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")


_BLOCK_QUANTISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k,
}


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Encode a float32 matrix `(rows, cols)` (or a stack `(E, rows, cols)`) as GGUF type `qtype`: F32/F16/BF16 as
    arrays of that width, block types as uint8 `(..., rows, cols // per_block * block_bytes)`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == "F32":
        return x
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype == "BF16":
        return to_bf16(x)
    if qtype not in _BLOCK_QUANTISERS:
        raise LmcraftError(f"GGUF type {qtype} has no quantiser here; supported: {', '.join(BLOCK_SIZES)}.")
    per_block, nbytes = BLOCK_SIZES[qtype]
    cols = x.shape[-1] if x.ndim >= 2 else x.size
    if cols % per_block:
        raise LmcraftError(f"{qtype} needs rows of whole {per_block}-value blocks; this tensor's rows have {cols}.")
    blocks = x.reshape(-1, per_block)
    step = max(1, _ROWS_PER_CHUNK_VALUES // per_block)
    out = np.concatenate([_BLOCK_QUANTISERS[qtype](blocks[i:i + step]) for i in range(0, len(blocks), step)])
    return out.reshape(*x.shape[:-1], cols // per_block * nbytes)


# ----------------------------------------------------------------------------------------------
# Which type each tensor gets
# ----------------------------------------------------------------------------------------------

_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's fallback for rows that are not whole 256-blocks
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q4_k_m": "MOSTLY_Q4_K_M"}


def file_type(quant: str) -> int:
    """`general.file_type` (llama.cpp's `llama_ftype`) of an export with `--quant quant`."""
    import gguf

    return int(gguf.LlamaFileType[_FILE_TYPES[quant]])


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int, tied: bool, n_experts: int = 0) -> str:
    """The GGUF type of tensor `name` (numpy `shape`) in an export with `--quant quant`.

    Following llama.cpp (`convert_hf_to_gguf.py` for f32/f16/bf16, `llama-quant.cpp` for the quantised ones):
    1-D tensors (norms, biases) and a mixture of experts' router `ffn_gate_inp` stay F32; so does GPT-2's
    `position_embd` in quantised files (llama.cpp never quantises it). With q4_0/q4_1/q4_k_m the output matrix
    (the token embedding when tied) is Q6_K; with q4_k_m `attn_v`/`attn_qkv` and `ffn_down` (a mixture of
    experts' `ffn_down_exps` too) are Q6_K in the layers `use_more_bits` picks (first and last eighth, every
    third between), the rest Q4_K. A model of exactly 8 experts gets Q8_0 `attn_k`/`attn_v` in every quantised
    file (and Q5_K `attn_output` with q4_k_m, a type lmcraft does not write: refused). Rows that are not whole
    blocks fall back as in llama.cpp: Q4_K -> Q5_0, Q6_K -> Q8_0, then F16. Stacked expert tensors
    (E, rows, cols) are blocked along their rows like matrices.
    """
    base = QUANTS[quant]
    if len(shape) < 2 or name.endswith(".ffn_gate_inp.weight"):
        return "F32"
    if base in ("F32", "F16", "BF16"):
        return base
    if name == "position_embd.weight":
        return "F32"
    qtype = base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q8_0" if base == "Q8_0" else "Q6_K"
    elif n_experts == 8 and name.endswith((".attn_k.weight", ".attn_v.weight")):
        qtype = "Q8_0"
    elif quant == "q4_k_m" and name.endswith((".attn_v.weight", ".attn_qkv.weight", ".ffn_down.weight",
                                              ".ffn_down_exps.weight")):
        qtype = "Q6_K" if _more_bits(layer, n_layers) else base
    elif quant == "q4_k_m" and n_experts == 8 and name.endswith(".attn_output.weight"):
        raise LmcraftError("llama-quant gives a model of 8 experts Q5_K attn_output matrices in q4_k_m files, a type "
                           "lmcraft does not write; export it as q8_0, q4_0 or q4_1.")
    cols = shape[-1]
    while cols % BLOCK_SIZES[qtype][0]:
        qtype = _FALLBACK.get(qtype, "F16")
    return qtype
