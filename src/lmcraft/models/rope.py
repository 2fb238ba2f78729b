"""Rotary position embeddings (RoPE) with the scaling variants used by Llama-family checkpoints.

A pair of channels (x_i, x_{i+d/2}) at position p is rotated by the angle p * f_i, with frequencies
f_i = theta^(-2i/d):  rope(x) = x * cos(p f) + rotate_half(x) * sin(p f),  rotate_half(x) = [-x2, x1].

Scaling (`rope_scaling["rope_type"]`) changes the frequencies to reach longer contexts:
- `linear`: f_i / factor (positions interpolated);
- `dynamic` (NTK): when a sequence of length L exceeds the trained length L0, the base becomes
  theta * (factor * L / L0 - (factor - 1)) ^ (d / (d - 2));
- `llama3`: low frequencies (wavelength > L0 / low_freq_factor) divided by factor, high ones kept,
  the band between interpolated smoothly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmcraft.models.config import ModelConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

RoPE = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of one forward pass, each (B or 1, 1, T, D)


def rope_frequencies(
    dim: int, theta: float, scaling: dict[str, Any] | None, seq_len: int, max_pos: int
) -> torch.Tensor:
    """Inverse frequencies f_i (dim // 2 values, fp32) for the given scaling at sequence length `seq_len`."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    factor = float((scaling or {}).get("factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope_type == "dynamic" and seq_len > max_pos:
        theta = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope_type == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, scaling or {}, factor)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any], factor: float) -> torch.Tensor:
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(x) = x * cos + rotate_half(x) * sin, for x (B, heads, T, D) and cos/sin (B or 1, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys (B, heads, T, D) by per-position cos/sin (B, 1, T, D)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given position ids.

    The table is cached for the first `INITIAL_TABLE` positions (not the whole, possibly 128k-long,
    context) and doubled when a longer sequence arrives; dynamic NTK scaling past the trained length
    recomputes it per call, since its frequencies depend on the sequence length.
    """

    INITIAL_TABLE = 4096

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = cfg.head_dim
        self.theta = cfg.rope_theta
        self.scaling = cfg.rope_scaling
        scaling = cfg.rope_scaling or {}
        self.max_pos = int(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings))
        self.dynamic = scaling.get("rope_type", scaling.get("type")) == "dynamic"
        length = min(cfg.max_position_embeddings, self.INITIAL_TABLE)
        cos, sin = self._table(length, seq_len=length)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _table(self, length: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_frequencies(self.dim, self.theta, self.scaling, seq_len, self.max_pos)
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def reserve(self, length: int) -> None:
        """Grow the cached table to `length` positions now; call it before torch.compile with the longest
        position the run can use (max_position_embeddings): a compiled forward then never sizes the table from
        the data (`int(position_ids.max())` would break the graph)."""
        if length > self.cos_cached.shape[0]:
            cos, sin = self._table(length, seq_len=length)
            self.cos_cached, self.sin_cached = cos.to(self.cos_cached.device), sin.to(self.sin_cached.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> RoPE:
        """cos, sin of shape (B, 1, T, D) for position ids (B, T)."""
        if torch.compiler.is_compiling() and not self.dynamic:  # table sized by reserve() before compiling
            return (self.cos_cached[position_ids].unsqueeze(1).to(dtype),
                    self.sin_cached[position_ids].unsqueeze(1).to(dtype))
        needed = int(position_ids.max()) + 1
        if self.dynamic and needed > self.max_pos:
            cos_t, sin_t = (t.to(position_ids.device) for t in self._table(needed, seq_len=needed))
        else:
            if needed > self.cos_cached.shape[0]:
                length = max(needed, 2 * self.cos_cached.shape[0])
                cos, sin = self._table(length, seq_len=length)
                self.cos_cached, self.sin_cached = cos.to(self.cos_cached.device), sin.to(self.sin_cached.device)
            cos_t, sin_t = self.cos_cached, self.sin_cached
        return cos_t[position_ids].unsqueeze(1).to(dtype), sin_t[position_ids].unsqueeze(1).to(dtype)
