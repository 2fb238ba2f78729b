"""NormalFloat-4 (NF4) weight quantisation with blockwise absmax and double quantisation (QLoRA, Dettmers et al. 2023).

Code book. The 16 NF4 values are quantiles of N(0, 1), rescaled to [-1, 1], with an exact zero:

    q_i = Phi^-1(linspace(delta, 1/2, 9)[i])   i = 0..7   (8 positive values)
    q_j = -Phi^-1(linspace(delta, 1/2, 8)[j])  j = 0..6   (7 negative values),  plus 0
    code = sort(q) / max(q),      delta = ((1 - 1/30) + (1 - 1/32)) / 2 = 0.9677083

(the same table bitsandbytes hard-codes). A weight matrix W is flattened and cut into blocks of `blocksize`
values; each block is divided by its absmax a_b and every value is replaced by the index of the nearest code:

    W_hat[i] = code[idx_i] * a_b            |W[i] - W_hat[i]| <= a_b * max_gap / 2  (max_gap = 0.3038, between -1 and
                                             the next code)
Two 4-bit indices are packed per byte.

Double quantisation. The fp32 constants a_b (32 bits per block = 0.5 bit/weight at blocksize 64) are themselves
quantised: c = a - mean(a) is cut into blocks of `absmax_blocksize` (256) values, each stored as symmetric int8
with one fp32 scale s_k = max|c_k| / 127 per block, so a_hat = round(c / s) * s + mean(a), |a - a_hat| <= s / 2.
Storage per weight: 4 + 8/64 + 32/(64*256) ~= 4.127 bits (paper: FP8 for c; linear int8 here, same size).

Why our own code rather than bitsandbytes: bitsandbytes 0.50 ships a CPU library and its `Linear4bit` runs on CPU,
but its fast CPU 4-bit GEMM is fetched at run time from the Hugging Face Hub ("kernels-community"), which this
project cannot reach; without it, it dequantises and multiplies, as this module does. For that it adds a 43 MB wheel
of CUDA/ROCm/XPU binaries, and its blockwise tensors are opaque. Here the whole algorithm is ~100 lines of torch that
run on any device, are tested against the published code values, and save with safetensors as plain buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NF4_OFFSET = 0.9677083  # ((1 - 1/(2*15)) + (1 - 1/(2*16))) / 2


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, ascending, in [-1, 1] with code[7] == 0 (float32)."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    return (values / values.max()).sort().values.float()


NF4_CODE = nf4_code()
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # decision boundaries between neighbouring codes


@dataclass
class NF4Tensor:
    """A quantised matrix: packed 4-bit codes plus (double-quantised) per-block absmax constants."""

    codes: torch.Tensor  # uint8 (ceil(n / 2),): two indices per byte, first in the high nibble
    shape: tuple[int, ...]
    blocksize: int
    absmax: torch.Tensor | None  # float32 (n_blocks,) when not double-quantised
    absmax_q: torch.Tensor | None  # int8 (n_blocks,) when double-quantised
    absmax_scale: torch.Tensor | None  # float32 (ceil(n_blocks / absmax_blocksize),)
    absmax_offset: torch.Tensor | None  # float32 scalar: mean of the absmax constants
    absmax_blocksize: int = 256

    def block_absmax(self) -> torch.Tensor:
        """The per-block scale a_b (float32), undoing the double quantisation when used."""
        if self.absmax is not None:
            return self.absmax
        n = self.absmax_q.numel()
        scale = self.absmax_scale.repeat_interleave(self.absmax_blocksize)[:n]
        return self.absmax_q.float() * scale + self.absmax_offset


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 absmax_blocksize: int = 256) -> NF4Tensor:
    """Quantise `weight` (any shape) blockwise to NF4; see the module docstring for the math."""
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    idx = torch.bucketize(blocks / safe[:, None], _MIDPOINTS.to(flat.device)).to(torch.uint8).view(-1)[:n]
    if n % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    codes = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        return NF4Tensor(codes, tuple(weight.shape), blocksize, absmax, None, None, None, absmax_blocksize)
    offset = absmax.mean()
    centred = absmax - offset
    m = centred.numel()
    cblocks = F.pad(centred, (0, (-m) % absmax_blocksize)).view(-1, absmax_blocksize)
    scale = cblocks.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(cblocks / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[:m]
    return NF4Tensor(codes, tuple(weight.shape), blocksize, None, q, scale, offset, absmax_blocksize)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = code[idx] * a_b, reshaped to the original shape."""
    n = 1
    for d in q.shape:
        n *= d
    idx = torch.stack([q.codes >> 4, q.codes & 0x0F], dim=1).view(-1)[:n].long()
    values = NF4_CODE.to(q.codes.device)[idx]
    values = F.pad(values, (0, (-n) % q.blocksize)).view(-1, q.blocksize) * q.block_absmax()[:, None]
    return values.view(-1)[:n].view(q.shape).to(dtype)


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W_hat^T, with W_hat dequantised again in backward (dx = dy W_hat) instead of being kept for it.

    A plain `F.linear(x, dequantize())` makes autograd save the dense weight of every layer until the backward
    pass, which costs as much memory as the unquantised model during training.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4; the weight is dequantised on the fly in every forward pass.

        y = x W_hat^T + b,   W_hat = dequantize_nf4(W)  (computed in `compute_dtype`, never stored; dequantised
                                                          again in the backward pass)

    The quantised state is kept as buffers (so `.to(device)` and `state_dict()` carry it); the bias, if any, stays
    a frozen floating-point parameter.
    """

    def __init__(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype or linear.weight.dtype
        q = quantize_nf4(linear.weight, blocksize, double_quant)
        self.blocksize, self.absmax_blocksize, self.double_quant = blocksize, q.absmax_blocksize, double_quant
        self.register_buffer("codes", q.codes)
        if double_quant:
            self.register_buffer("absmax_q", q.absmax_q)
            self.register_buffer("absmax_scale", q.absmax_scale)
            self.register_buffer("absmax_offset", q.absmax_offset)
        else:
            self.register_buffer("absmax", q.absmax)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(self.compute_dtype), requires_grad=False)

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def quantized(self) -> NF4Tensor:
        dq = self.double_quant
        return NF4Tensor(
            self.codes, (self.out_features, self.in_features), self.blocksize,
            None if dq else self.absmax, self.absmax_q if dq else None, self.absmax_scale if dq else None,
            self.absmax_offset if dq else None, self.absmax_blocksize,
        )

    def dequantize(self) -> torch.Tensor:
        """The dense weight (out, in) in `compute_dtype`."""
        return dequantize_nf4(self.quantized(), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear layer, dequantised when the layer is stored in NF4."""
    return layer.dequantize() if isinstance(layer, NF4Linear) else layer.weight
