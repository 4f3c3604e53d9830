"""Trusted-side layers that keep far less for backward than their torch.nn counterparts.

Enclave memory is scarce (DESIGN section 5: "masks/indices (bit-packed), A, V"). A ReLU only
needs the sign of its input for backward: one bit per element instead of a float; a 2x2 max-pool
only needs which of the 4 window positions won: two bits per output instead of an int64 index.
Results and gradients are exactly those of nn.ReLU and nn.MaxPool2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def pack_bits(codes: Tensor, width: int = 1) -> Tensor:
    """Small non-negative integers (or bools) of `width` bits each, packed 8 // width per byte."""
    per_byte = 8 // width
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=codes.device)
    return (flat.view(-1, per_byte) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size, width: int = 1) -> Tensor:
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & ((1 << width) - 1)
    return codes.reshape(-1)[: shape.numel()].view(shape)


class _PackedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        mask = x > 0
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape = x.shape
        return x * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.shape).bool()


class PackedReLU(nn.Module):
    """nn.ReLU that keeps a 1-bit mask for backward."""

    def forward(self, x: Tensor) -> Tensor:
        return _PackedReLU.apply(x)


class _CompactMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        w = x.shape[-1]
        code = (idx // w) % 2 * 2 + idx % w % 2  # which of the 4 window positions won
        ctx.save_for_backward(pack_bits(code, width=2))
        ctx.x_shape, ctx.y_shape = x.shape, y.shape
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        code = unpack_bits(ctx.saved_tensors[0], ctx.y_shape, width=2)
        h, w = ctx.x_shape[-2:]
        oh, ow = code.shape[-2:]
        rows = torch.arange(oh, device=code.device).view(-1, 1) * 2 + (code // 2).long()
        cols = torch.arange(ow, device=code.device).view(1, -1) * 2 + (code % 2).long()
        return F.max_unpool2d(grad, rows * w + cols, 2, 2, output_size=(h, w))


class CompactMaxPool2d(nn.Module):
    """nn.MaxPool2d(2, 2) that keeps two bits per output for backward."""

    def forward(self, x: Tensor) -> Tensor:
        return _CompactMaxPool2x2.apply(x)


def compact_equivalent(module: nn.Module) -> nn.Module | None:
    """The compact stand-in for a module, or None when there is none."""
    if isinstance(module, nn.ReLU):
        return PackedReLU()
    if isinstance(module, nn.MaxPool2d):
        k, s, p, d = (module.kernel_size, module.stride, module.padding, module.dilation)
        if k in (2, (2, 2)) and s in (2, (2, 2)) and p in (0, (0, 0)) and d in (1, (1, 1)) and not module.ceil_mode \
                and not module.return_indices:
            return CompactMaxPool2d()
    return None
