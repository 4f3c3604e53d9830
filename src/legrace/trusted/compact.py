"""Trusted-side layers that keep far less for backward than their torch.nn counterparts.

Enclave memory is scarce (DESIGN section 5: "masks/indices (bit-packed), A, V"). A ReLU only
needs the sign of its input for backward: one bit per element instead of a float; a 2x2 max-pool
only needs which of the 4 window positions won: two bits per output instead of an int64 index.
Results and gradients are exactly those of nn.ReLU and nn.MaxPool2d for finite inputs and
gradients. (A ReLU's gradient is multiplied by its mask, which is much cheaper than a select such
as np.copyto with where=; so an inf or NaN gradient arriving at a negative input, possible only
after an overflow, gives NaN where torch gives 0.)

Speed matters as much as memory here: these passes run over the largest activations on the
trusted side. Bits are packed with numpy's packbits on CPU, in cache-sized blocks shared between
torch's threads (numpy itself uses one). On CPU with numba installed, each max-pool's forward and
backward are one fused pass (legrace.trusted.kernels); otherwise the 2x2 pool's winner is found by
comparing the four window positions rather than by decoding int64 indices (integer division over
every output was slower than the pooling itself). Both paths keep the same bytes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from legrace.trusted import kernels


# numpy's passes run on one thread; large ones are cut into blocks (a multiple of 8 elements, so a
# block's bits are whole bytes) and the blocks shared between torch's threads. A block's mask is
# still in cache when the next pass over it runs.
BLOCK = 1 << 18
_helpers: Optional[ThreadPoolExecutor] = None
_helper_count = 0


def _in_blocks(n: int, work: Callable[[int, int], None], block: Optional[int] = None) -> None:
    """work(a, b) for consecutive blocks [a, b) of `block` (default BLOCK) covering [0, n), on up
    to torch.get_num_threads() threads."""
    global _helpers, _helper_count
    block = block or BLOCK
    parts = max(1, min(torch.get_num_threads(), -(-n // block)))
    span = -(-n // parts)
    span += -span % block

    def run(start: int) -> None:
        for a in range(start, min(start + span, n), block):
            work(a, min(a + block, start + span, n))

    if parts - 1 > _helper_count:
        _helpers, _helper_count = ThreadPoolExecutor(parts - 1, thread_name_prefix="legrace-bits"), parts - 1
    futures = [_helpers.submit(run, start) for start in range(span, n, span)] if parts > 1 else []
    try:
        run(0)
    finally:
        for f in futures:
            f.result()


def _numpy_ok(t: Tensor, *dtypes: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype in dtypes and not t.requires_grad


def _fused(t: Tensor) -> bool:
    """Whether legrace.trusted.kernels can take this tensor (CPU float32/float64, numba working)."""
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not t.requires_grad
            and kernels.usable(np.float32 if t.dtype == torch.float32 else np.float64))


def layout_of(y: Tensor, x: Tensor) -> Tensor:
    """y in x's memory format: the kernels write NCHW, and a channels_last input's output must stay
    channels_last, as nn.MaxPool2d's and nn.Conv2d's do (a later .contiguous() would otherwise
    alias, not copy)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _flat(t: Tensor) -> np.ndarray:
    return t.contiguous().numpy().reshape(-1)


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor packed 8 elements per byte (uint8, flat)."""
    if _numpy_ok(mask, torch.bool):
        flat, out = mask.contiguous().numpy().reshape(-1), np.empty(-(-mask.numel() // 8), np.uint8)

        def work(a: int, b: int) -> None:
            out[a // 8:-(-b // 8)] = np.packbits(flat[a:b])

        _in_blocks(flat.size, work)
        return torch.from_numpy(out)
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of `shape` that pack_bits packed."""
    n = shape.numel()
    if packed.device.type == "cpu":
        bits, out = packed.numpy(), np.empty(n, np.bool_)

        def work(a: int, b: int) -> None:
            out[a:b] = np.unpackbits(bits[a // 8:-(-b // 8)], count=b - a).view(np.bool_)

        _in_blocks(n, work)
        return torch.from_numpy(out).view(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


def pack_positive(y: Tensor) -> Tensor:
    """pack_bits(y > 0) without the full bool tensor (numpy's comparison is the faster here)."""
    if not _numpy_ok(y, torch.float32, torch.float64):
        return pack_bits(y > 0)
    flat, out = y.contiguous().numpy().reshape(-1), np.empty(-(-y.numel() // 8), np.uint8)

    def work(a: int, b: int) -> None:
        out[a // 8:-(-b // 8)] = np.packbits(np.greater(flat[a:b], 0))

    _in_blocks(flat.size, work)
    return torch.from_numpy(out)


def masked_by_bits(grad: Tensor, packed: Tensor) -> Tensor:
    """grad * unpack_bits(packed), without the full bool tensor (and faster than torch's multiply
    by a bool tensor, which first converts it)."""
    if not (_numpy_ok(grad, torch.float32, torch.float64) and packed.device.type == "cpu"):
        return grad * unpack_bits(packed, grad.shape)
    g = grad.contiguous().numpy().reshape(-1)
    bits, out = packed.numpy(), np.empty_like(g)

    def work(a: int, b: int) -> None:
        np.multiply(g[a:b], np.unpackbits(bits[a // 8:-(-b // 8)], count=b - a).view(np.bool_), out=out[a:b])

    _in_blocks(g.size, work)
    return torch.from_numpy(out).view(grad.shape)


class PackedReLUFunction(torch.autograd.Function):
    """PackedReLU's autograd function: keeps the sign of its input as one bit per value."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.relu(x)
        ctx.save_for_backward(pack_positive(y))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (packed,) = ctx.saved_tensors
        return masked_by_bits(grad, packed)


def _needs_backward(x: Tensor) -> bool:
    """Whether autograd will call this layer's backward (not under no_grad / inference)."""
    return torch.is_grad_enabled() and x.requires_grad


class PackedReLU(nn.Module):
    """nn.ReLU that keeps a 1-bit mask for backward (and nothing when no backward will come)."""

    def forward(self, x: Tensor) -> Tensor:
        return PackedReLUFunction.apply(x) if _needs_backward(x) else torch.relu(x)


def _windows(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four positions of every 2x2 window (top-left, top-right, bottom-left, bottom-right)."""
    B, C, H, W = x.shape
    oh, ow = H // 2, W // 2
    x6 = x[:, :, : 2 * oh, : 2 * ow].unflatten(3, (ow, 2)).unflatten(2, (oh, 2))
    return x6[:, :, :, 0, :, 0], x6[:, :, :, 0, :, 1], x6[:, :, :, 1, :, 0], x6[:, :, :, 1, :, 1]


def _max_pool_2x2_fused(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, C, h, w = x.shape
    oh, ow = h // 2, w // 2
    n = B * C * oh * ow
    flat = _flat(x)
    y = np.empty(n, flat.dtype)
    row, col = np.empty(-(-n // 8), np.uint8), np.empty(-(-n // 8), np.uint8)
    flat_bits, y_bits = kernels.bits(flat), kernels.bits(y)
    _in_blocks(n, lambda a, b: kernels.max_pool_2x2(flat, flat_bits, y_bits, row, col, a, b, oh, ow, h, w))
    return torch.from_numpy(y).view(B, C, oh, ow), torch.from_numpy(row), torch.from_numpy(col)


def _max_unpool_2x2_fused(grad: Tensor, row: Tensor, col: Tensor, x_shape: torch.Size) -> Tensor:
    oh, ow = grad.shape[-2:]
    h, w = x_shape[-2:]
    g, rows, cols = _flat(grad), row.numpy(), col.numpy()
    out = np.empty(x_shape.numel(), g.dtype)
    g_bits, out_bits = kernels.bits(g), kernels.bits(out)
    _in_blocks(g.size, lambda a, b: kernels.max_unpool_2x2(g_bits, rows, cols, out_bits, a, b, oh, ow, h, w))
    return torch.from_numpy(out).view(x_shape)


class CompactMaxPool2x2Function(torch.autograd.Function):
    """CompactMaxPool2d's autograd function for 2x2 windows of stride 2: keeps each winner's row
    and column in its window, a bit each, instead of an int64 index."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.x_shape = x.shape
        data = x.detach()  # the kernels read the data only
        if _fused(data):
            y, row, col = _max_pool_2x2_fused(data)
            ctx.save_for_backward(row, col)
            return layout_of(y, data)
        # PyTorch's max-pool scans a window in row order and keeps the first maximum; so do we.
        a, b, c, d = _windows(x)
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        row = pack_bits(bottom > top)  # winner in the bottom row
        # winner in the right column: d > c in the bottom row, b > a in the top; chosen on the
        # packed bytes (an eighth of the elements) rather than by a where() over every output
        col = (row & pack_bits(d > c)) | (~row & pack_bits(b > a))
        y = torch.maximum(top, bottom)  # = where(row, bottom, top), cheaper
        ctx.save_for_backward(row, col)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if _fused(grad):
            return _max_unpool_2x2_fused(grad, *ctx.saved_tensors, ctx.x_shape)
        row, col = (unpack_bits(p, grad.shape) for p in ctx.saved_tensors)
        h, w = ctx.x_shape[-2:]
        oh, ow = grad.shape[-2:]
        idx = row.long() * w
        idx += col
        idx += (torch.arange(oh).view(-1, 1) * (2 * w) + torch.arange(ow).view(1, -1) * 2).to(idx.device)
        return F.max_unpool2d(grad, idx, 2, 2, output_size=(h, w))


class CompactMaxPoolFunction(torch.autograd.Function):
    """Any max-pool window of up to 256 positions: the winner's position in its window, one byte
    per output, instead of an int64 index and the whole input (which max-pool's backward keeps)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode) -> Tensor:
        ctx.args, ctx.x_shape = (kernel, stride, padding, dilation, ceil_mode), x.shape
        fused = _max_pool_window_fused(x.detach(), kernel, stride, padding, dilation, ceil_mode)
        if fused is not None:
            y, code = fused
            ctx.save_for_backward(code)
            return layout_of(y, x)
        y, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        w = x.shape[-1]
        rows = idx.div(w, rounding_mode="floor")
        top, left = _window_origins(y.shape[-2:], stride, padding, idx.device)
        if dilation == (1, 1):  # (rows - top)·k + (idx - rows·w - left), in place: a third of the passes
            code = rows.mul_(kernel[1] - w).add_(idx).sub_(top * kernel[1] + left)
        else:
            code = (rows - top).div(dilation[0], rounding_mode="floor") * kernel[1] \
                + (idx - rows * w - left).div(dilation[1], rounding_mode="floor")
        ctx.save_for_backward(code.to(torch.uint8))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (code,) = ctx.saved_tensors
        kernel, stride, padding, dilation, ceil_mode = ctx.args
        if grad.dim() == 4 and _fused(grad):
            return (_max_unpool_window_fused(grad, code, ctx.x_shape, kernel, stride, padding, dilation),
                    None, None, None, None, None)
        top, left = _window_origins(grad.shape[-2:], stride, padding, grad.device)
        w = ctx.x_shape[-1]
        # the input index of each window code, looked up in a 256-entry table (no integer division
        # over every output), plus where the output's window starts
        codes = torch.arange(256, device=grad.device)
        offset = codes.div(kernel[1], rounding_mode="floor") * (dilation[0] * w) + codes.remainder(kernel[1]) * dilation[1]
        idx = offset[code.long()].add_(top * w + left)
        shape_only = grad.new_empty(ctx.x_shape)  # the kernel reads only its shape
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), shape_only, kernel, stride, padding, dilation, ceil_mode, idx)
        return grad_x, None, None, None, None, None


def _pool_output_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of a max-pool along one dimension, as PyTorch computes it."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left padding
        out -= 1
    return out


def _max_pool_window_fused(x: Tensor, kernel, stride, padding, dilation, ceil_mode) -> Optional[tuple[Tensor, Tensor]]:
    """y and the one-byte window codes of the torch path, in one pass (legrace.trusted.kernels), or None
    where the kernel does not apply; invalid arguments are left to torch's own errors."""
    if (x.dim() != 4 or not _fused(x) or any(2 * p > k for p, k in zip(padding, kernel))
            or min(*stride, *dilation) < 1):
        return None
    B, C, h, w = x.shape
    oh, ow = (_pool_output_size(n, k, s, p, d, ceil_mode)
              for n, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))
    if oh < 1 or ow < 1:
        return None
    n = B * C * oh * ow
    flat = _flat(x)
    y, code = np.empty(n, flat.dtype), np.empty(n, np.uint8)
    flat_bits, y_bits = kernels.bits(flat), kernels.bits(y)
    neg_inf = kernels.bits(np.array([-np.inf], flat.dtype))[0]
    _in_blocks(n, lambda a, b: kernels.max_pool_window(flat, flat_bits, y_bits, code, neg_inf, a, b, oh, ow, h, w,
                                                       *kernel, *stride, *padding, *dilation))
    return torch.from_numpy(y).view(B, C, oh, ow), torch.from_numpy(code).view(B, C, oh, ow)


def _max_unpool_window_fused(grad: Tensor, code: Tensor, x_shape: torch.Size, kernel, stride, padding,
                             dilation) -> Tensor:
    """dL/dx from the window codes in one pass (legrace.trusted.kernels), whole planes per thread."""
    B, C, oh, ow = grad.shape
    h, w = x_shape[-2:]
    g, codes = _flat(grad), code.contiguous().numpy().reshape(-1)
    out = np.empty(x_shape.numel(), g.dtype)
    planes = B * C
    _in_blocks(planes, lambda a, b: kernels.max_unpool_window(g, codes, out, a, b, oh, ow, h, w, *kernel, *stride,
                                                              *padding, *dilation),
               block=-(-planes // torch.get_num_threads()))
    return torch.from_numpy(out).view(x_shape)


def _window_origins(out_hw, stride, padding, device) -> tuple[Tensor, Tensor]:
    """Input row of each output row's window top, input column of each output column's left edge."""
    top = torch.arange(out_hw[0], device=device).view(-1, 1) * stride[0] - padding[0]
    left = torch.arange(out_hw[1], device=device).view(1, -1) * stride[1] - padding[1]
    return top, left


class CompactMaxPool2d(nn.Module):
    """nn.MaxPool2d that keeps the winner's position in its window for backward: two bits per
    output for the common 2x2 stride-2 pool, one byte for any other window (nothing when no
    backward will come)."""

    def __init__(self, kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.padding, self.dilation = _pair(kernel_size), _pair(padding), _pair(dilation)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.ceil_mode = ceil_mode
        self._two_by_two = (self.kernel_size == self.stride == (2, 2) and self.padding == (0, 0)
                            and self.dilation == (1, 1) and not ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        two_by_two = self._two_by_two and x.dim() == 4 and x.shape[-2] >= 2 and x.shape[-1] >= 2
        if not _needs_backward(x):  # inference: no winners to keep
            if two_by_two:
                a, b, c, d = _windows(x)
                return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        if two_by_two:  # anything else (too small for one window: torch's own error) takes the general path
            return CompactMaxPool2x2Function.apply(x)
        return CompactMaxPoolFunction.apply(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def compact_equivalent(module: nn.Module) -> nn.Module | None:
    """The compact stand-in for a module, or None when there is none."""
    if isinstance(module, nn.ReLU):
        return PackedReLU()
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        pool = CompactMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
        if pool.kernel_size[0] * pool.kernel_size[1] <= 256:
            return pool
    return None
