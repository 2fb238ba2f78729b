"""GGUF quantisers against gguf-py (an implementation lmcraft did not write) and llama.cpp's type-choice rules."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from lmcraft.gguf_import import dequantize
from lmcraft.gguf_quant import quantize, tensor_type

Q = gguf.GGMLQuantizationType


def _matrix(cols: int) -> np.ndarray:
    """Gaussian rows plus the awkward ones: all zeros, a constant, a single spike, ties of opposite sign."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, cols)).astype(np.float32)
    x[1] = 0.0
    x[2] = 1.5
    x[3] = 0.0
    x[3, 5] = -7.0
    x[4, :2] = [3.0, -3.0]
    x[5] *= 1e-3
    return x


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_legacy_types_are_byte_identical_to_gguf_py(name: str) -> None:
    x = _matrix(256)
    ours = quantize(x, name)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, Q[name]))


@pytest.mark.parametrize(("name", "limit", "worse"), [("Q4_K", 0.075, "Q4_1"), ("Q6_K", 0.02, "Q5_0")])
def test_k_types_decode_in_gguf_py_within_their_error(name: str, limit: float, worse: str) -> None:
    """gguf-py decodes our K-quant bytes to what our dequantiser reads; the error is that of a good fit (below
    the legacy type of the same or more bits) and exact on zero rows."""
    x = _matrix(512)
    raw = quantize(x, name)
    assert raw.shape == (16, 512 // 256 * gguf.GGML_QUANT_SIZES[Q[name]][1])
    decoded = gguf.quants.dequantize(raw, Q[name])
    np.testing.assert_array_equal(decoded, dequantize(raw, Q[name], x.shape))
    gauss = np.r_[x[:1], x[6:]]
    err = np.sqrt(((np.r_[decoded[:1], decoded[6:]] - gauss) ** 2).mean() / (gauss**2).mean())
    legacy = gguf.quants.dequantize(gguf.quants.quantize(gauss, Q[worse]), Q[worse])
    assert err < limit and err < np.sqrt(((legacy - gauss) ** 2).mean() / (gauss**2).mean())
    np.testing.assert_array_equal(decoded[1], 0.0)
    np.testing.assert_allclose(decoded[2], 1.5, rtol=1e-2)
    assert abs(decoded[3, 5] + 7.0) < 0.05 and np.abs(np.delete(decoded[3], 5)).max() < 0.05


def test_unsupported_or_partial_blocks_are_refused() -> None:
    from lmcraft.errors import LmcraftError

    with pytest.raises(LmcraftError, match="whole 256-value blocks"):
        quantize(np.zeros((2, 96), np.float32), "Q4_K")
    with pytest.raises(LmcraftError, match="no quantiser"):
        quantize(np.zeros((2, 256), np.float32), "Q3_K")


def test_q4_k_m_mix_follows_llama_quant() -> None:
    """llama-quant.cpp: output (or the tied embedding) Q6_K; attn_v/attn_qkv/ffn_down Q6_K in the layers
    use_more_bits picks (8 layers: 0, 3, 6, 7), Q4_K elsewhere; 1-D tensors F32; short rows fall back."""
    def kind(name: str, shape: tuple[int, ...] = (512, 256), quant: str = "q4_k_m", tied: bool = False) -> str:
        return tensor_type(name, shape, quant, 8, tied)

    assert [kind(f"blk.{i}.attn_v.weight") for i in range(8)] == [
        "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [kind(f"blk.{i}.ffn_down.weight") for i in range(8)].count("Q6_K") == 4
    assert kind("blk.1.attn_qkv.weight") == "Q4_K" and kind("blk.0.attn_qkv.weight") == "Q6_K"
    assert kind("blk.1.attn_q.weight") == "Q4_K" and kind("blk.0.ffn_up.weight") == "Q4_K"
    assert kind("output.weight") == "Q6_K" and kind("token_embd.weight") == "Q4_K"
    assert kind("token_embd.weight", tied=True) == "Q6_K"
    assert kind("blk.0.attn_norm.weight", (256,)) == "F32"
    assert kind("position_embd.weight") == "F32"
    assert kind("blk.1.attn_q.weight", (64, 96)) == "Q5_0"  # Q4_K -> Q5_0 for rows of whole 32-blocks
    assert kind("output.weight", (64, 96)) == "Q8_0"  # Q6_K -> Q8_0
    assert kind("blk.1.attn_q.weight", (64, 40)) == "F16"  # no block fits
    assert kind("output.weight", quant="q4_0") == "Q6_K" and kind("output.weight", quant="q8_0") == "Q8_0"
    assert kind("blk.0.attn_v.weight", quant="q4_1") == "Q4_1"
    assert kind("position_embd.weight", quant="f16") == "F16"
