"""GGUF dequantisation: every block type against gguf's own reference decoder and hand-built blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from lmcraft.gguf_import import SUPPORTED_TYPES, GGUFImportError, dequantize, permute_qk, unpermute_qk

Q = gguf.GGMLQuantizationType
BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def _random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for `n_blocks` blocks, with every fp16 scale field set to a finite value."""
    per_block, nbytes = gguf.GGML_QUANT_SIZES[Q[name]]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    scale_fields = {"Q6_K": [208], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q4_1": [0, 2], "Q5_1": [0, 2]}.get(name, [0])
    for offset in scale_fields:
        raw[:, offset : offset + 2] = rng.uniform(-0.1, 0.1, size=(n_blocks, 1)).astype("<f2").view(np.uint8)
    return raw


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_block_types_match_gguf_reference(name: str) -> None:
    rng = np.random.default_rng(0)
    per_block, _ = gguf.GGML_QUANT_SIZES[Q[name]]
    rows, blocks_per_row = 3, 2
    raw = _random_blocks(name, rows * blocks_per_row, rng).reshape(rows, -1)
    ours = dequantize(raw, Q[name], (rows, blocks_per_row * per_block))
    ref = gguf.quants.dequantize(raw, Q[name])
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantise_dequantise_round_trip_error_is_small(name: str) -> None:
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    y = dequantize(gguf.quants.quantize(x, Q[name]), Q[name], x.shape)
    bound = {"Q8_0": 0.02, "Q5_0": 0.15, "Q5_1": 0.15}.get(name, 0.35)  # half a quantisation step
    assert np.abs(x - y).max() < bound


def test_hand_built_q4_0_and_q8_0_blocks() -> None:
    # Q4_0: d = 0.5, nibble j holds (j % 16): low nibbles are values 0..15, high nibbles 16..31.
    qs = np.array([(j % 16) | ((15 - j % 16) << 4) for j in range(16)], dtype=np.uint8)
    block = np.concatenate([np.array([0.5], "<f2").view(np.uint8), qs])[None]
    expected = 0.5 * (np.concatenate([np.arange(16), 15 - np.arange(16)]) - 8)
    np.testing.assert_array_equal(dequantize(block, Q.Q4_0, (32,)), expected.astype(np.float32))
    # Q8_0: d = 0.25, q = -16..15
    q8 = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    block = np.concatenate([np.array([0.25], "<f2").view(np.uint8), q8])[None]
    np.testing.assert_array_equal(dequantize(block, Q.Q8_0, (1, 32)), 0.25 * np.arange(-16, 16, dtype=np.float32)[None])


def test_plain_types() -> None:
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(x, Q.F32, x.shape), x)
    np.testing.assert_array_equal(dequantize(x.astype(np.float16), Q.F16, x.shape), x.astype(np.float16))
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exactly representable values
    expected = (bf16.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(dequantize(bf16.view(np.uint8), Q.BF16, x.shape), expected)
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"} <= set(SUPPORTED_TYPES)


def test_unsupported_type_and_partial_blocks_are_clear_errors() -> None:
    with pytest.raises(GGUFImportError, match="IQ2_XXS.*supported types"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, (256,))
    with pytest.raises(GGUFImportError, match="whole 32-value blocks"):
        dequantize(np.zeros(18, np.uint8), Q.Q4_0, (16,))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape", [(24, 8), (24,)])
def test_qk_permutation_round_trip(shape: tuple[int, ...]) -> None:
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    n_head = 3  # head_dim 8: rows (h, half, i) -> (h, i, half)
    np.testing.assert_array_equal(permute_qk(w, n_head), _llama_cpp_permute(w, n_head))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    # row 1 of head 0 (first half, i=1) moves to row 2 (pair i=1, first element)
    assert permute_qk(w, n_head)[2].tolist() == w[1].tolist()
