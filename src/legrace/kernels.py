"""Fused CPU passes for the compact max-pools, compiled by numba when it is installed.

The trusted side's element-wise work is bound by memory traffic, and torch runs each operation
as its own pass over memory: the compact 2x2 max-pool's forward takes seven (two maxima, three
comparisons, their packing, a third maximum) and its backward four; the compact pool of any other
window (ResNet's 3x3 stem) takes torch's pool with int64 indices and four passes turning them into
window codes, and its backward decodes them again. Each kernel here does the layer's work in one
pass and writes exactly the bytes legrace.compact's torch path writes (the same values, the same
packed row and column bits or window codes), so either path can consume what the other produced.
(The ReLU has no kernel: torch's ReLU and numpy's SIMD packbits over cache-sized blocks were
faster than a numba loop, whose bit packing does not vectorise.)

Kernels work on a flat range [k0, k1) of pool outputs (for the 2x2 pool starting at a multiple of
8, so every packed byte belongs to one range; the window pool's backward on whole planes, since
overlapping windows add into shared inputs); legrace.compact cuts the work into such ranges and
shares them between torch's threads. They release the GIL and start no threads of their own.
Without numba, or with LEGRACE_FUSED_KERNELS=0 in the environment, `enabled` is False and
legrace.compact uses its torch passes; so it does, with a warning, where numba is present but
cannot build them.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

try:  # optional: the torch/numpy path gives the same results, only slower
    import numba
except Exception:  # pragma: no cover - not installed, or broken against this numpy
    numba = None

enabled: bool = numba is not None and os.environ.get("LEGRACE_FUSED_KERNELS", "1") != "0"
_works: dict[np.dtype, bool] = {}


def _jit(fn):
    if numba is None:
        return fn
    try:  # compiled once, then loaded from numba's on-disk cache
        return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError:  # no writable cache directory (a read-only install): compiled in each process
        return numba.njit(nogil=True, boundscheck=False)(fn)


@_jit
def max_pool_2x2(x, y, row_bits, col_bits, k0, k1, oh, ow, h, w):  # pragma: no cover - compiled
    """2x2 stride-2 max-pool of planes h x w (x flat) over outputs [k0, k1) of the oh x ow grid.

    The first maximum in row order wins, as in PyTorch: row bit = the bottom row's maximum is
    strictly larger than the top row's, column bit = the right element of the winning row is
    strictly larger than its left one; a NaN counts as larger than anything, so it propagates as
    in nn.MaxPool2d. Odd trailing rows and columns are dropped, as in floor mode.
    """
    plane = k0 // (oh * ow)
    rest = k0 - plane * oh * ow
    i = rest // ow
    j = rest - i * ow
    rows = cols = s = 0
    for k in range(k0, k1):
        o = plane * h * w + 2 * i * w + 2 * j
        a, b, c, d = x[o], x[o + 1], x[o + w], x[o + w + 1]
        top_right, bottom_right = b > a or b != b, d > c or d != d
        top = b if top_right else a
        bottom = d if bottom_right else c
        lower = bottom > top or bottom != bottom
        y[k] = bottom if lower else top
        right = bottom_right if lower else top_right
        rows = (rows << 1) | lower
        cols = (cols << 1) | right
        s += 1
        if s == 8:
            row_bits[k >> 3], col_bits[k >> 3] = rows, cols
            rows = cols = s = 0
        j += 1
        if j == ow:
            j, i = 0, i + 1
            if i == oh:
                i, plane = 0, plane + 1
    if s:
        row_bits[(k1 - 1) >> 3], col_bits[(k1 - 1) >> 3] = rows << (8 - s), cols << (8 - s)
    return 0


@_jit
def max_unpool_2x2(grad, row_bits, col_bits, out, k0, k1, oh, ow, h, w):  # pragma: no cover - compiled
    """The 2x2 max-pool's backward over outputs [k0, k1): each output's gradient to its winner, 0
    to the other three, and 0 to the odd row and column floor mode dropped (written with the
    output row or plane they end), so every element of out is written exactly once overall."""
    plane = k0 // (oh * ow)
    rest = k0 - plane * oh * ow
    i = rest // ow
    j = rest - i * ow
    for k in range(k0, k1):
        bit = 7 - (k & 7)
        lower = (row_bits[k >> 3] >> bit) & 1
        right = (col_bits[k >> 3] >> bit) & 1
        g = grad[k]
        top = plane * h * w + 2 * i * w
        o = top + 2 * j
        out[o] = g if (lower == 0 and right == 0) else 0.0
        out[o + 1] = g if (lower == 0 and right == 1) else 0.0
        out[o + w] = g if (lower == 1 and right == 0) else 0.0
        out[o + w + 1] = g if (lower == 1 and right == 1) else 0.0
        j += 1
        if j == ow:
            if w > 2 * ow:  # odd width: the last column of both rows
                out[top + w - 1] = 0.0
                out[top + 2 * w - 1] = 0.0
            j, i = 0, i + 1
            if i == oh:
                for e in range(plane * h * w + 2 * oh * w, (plane + 1) * h * w):  # odd height: the last row
                    out[e] = 0.0
                i, plane = 0, plane + 1
    return 0


@_jit
def max_pool_window(x, y, code, k0, k1, oh, ow, h, w, kh, kw, sh, sw, ph, pw, dh, dw):  # pragma: no cover - compiled
    """Any max-pool window (kh x kw, stride, padding, dilation) over outputs [k0, k1): y and the
    winner's position in its window, a·kw + b for window row a and column b, counted from the
    window's unclamped origin, as legrace.compact's torch path codes it.

    As in PyTorch's CPU kernel: positions outside the input are skipped, a later value wins only
    if strictly larger or NaN, and the first position inside the input is the winner when none is
    larger than -inf.
    """
    plane = k0 // (oh * ow)
    rest = k0 - plane * oh * ow
    i = rest // ow
    j = rest - i * ow
    for k in range(k0, k1):
        base = plane * h * w
        top = i * sh - ph
        left = j * sw - pw
        if top >= 0 and left >= 0 and top + (kh - 1) * dh < h and left + (kw - 1) * dw < w:
            # inside the input (all but the border outputs): no bounds to check
            origin = base + top * w + left
            best = x[origin]
            win = 0
            for a in range(kh):
                row = origin + a * dh * w
                for b in range(kw):
                    v = x[row + b * dw]
                    if v > best or v != v:
                        best = v
                        win = a * kw + b
        else:
            a0 = 0
            while top + a0 * dh < 0:
                a0 += 1
            b0 = 0
            while left + b0 * dw < 0:
                b0 += 1
            best = -np.inf
            win = a0 * kw + b0
            for a in range(a0, kh):
                r = top + a * dh
                if r >= h:
                    break
                row = base + r * w
                for b in range(b0, kw):
                    c = left + b * dw
                    if c >= w:
                        break
                    v = x[row + c]
                    if v > best or v != v:
                        best = v
                        win = a * kw + b
        y[k] = best
        code[k] = win
        j += 1
        if j == ow:
            j, i = 0, i + 1
            if i == oh:
                i, plane = 0, plane + 1
    return 0


@_jit
def max_unpool_window(grad, code, out, p0, p1, oh, ow, h, w, kh, kw, sh, sw, ph, pw, dh, dw):  # pragma: no cover - compiled
    """max_pool_window's backward for planes [p0, p1): out is zeroed there, then each output's
    gradient is added to its winner, in output order as PyTorch's CPU kernel adds them (windows
    that overlap can share a winner). Whole planes per call, so no two calls touch one element."""
    out[p0 * h * w:p1 * h * w] = 0.0
    for plane in range(p0, p1):
        base = plane * h * w
        k = plane * oh * ow
        for i in range(oh):
            for j in range(ow):
                win = code[k]
                a = win // kw
                b = win - a * kw
                out[base + (i * sh - ph + a * dh) * w + j * sw - pw + b * dw] += grad[k]
                k += 1
    return 0


def usable(dtype: np.dtype) -> bool:
    """Whether the kernels run here for this dtype: built (or loaded from the cache) and checked
    on a 4x4 plane once per process. A numba that cannot build them turns them off with a
    warning, rather than failing inside a training step."""
    if not enabled:
        return False
    dtype = np.dtype(dtype)
    if dtype not in _works:
        try:
            x = np.array([3, 1, 0, 0, 2, 5, 0, 9, 0, 0, 0, 0, 7, 0, 0, 8], dtype)
            y, rows, cols, grad = np.empty(4, dtype), np.empty(1, np.uint8), np.empty(1, np.uint8), np.empty(16, dtype)
            max_pool_2x2(x, y, rows, cols, 0, 4, 2, 2, 4, 4)
            max_unpool_2x2(y, rows, cols, grad, 0, 4, 2, 2, 4, 4)
            ok = y.tolist() == [5, 9, 7, 8] and np.array_equal(grad != 0, x >= 5)
            # ResNet's stem window (3x3, stride 2, padding 1) on the same plane
            code = np.empty(4, np.uint8)
            max_pool_window(x, y, code, 0, 4, 2, 2, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1)
            max_unpool_window(np.ones(4, dtype), code, grad, 0, 1, 2, 2, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1)
            ok = (ok and y.tolist() == [5, 9, 7, 9] and code.tolist() == [8, 8, 7, 2]
                  and grad[7] == 2 and grad.sum() == 4)
            _works[dtype] = bool(ok)  # not numpy.bool_: it goes into JSON reports
        except Exception as e:  # pragma: no cover - depends on the environment
            warnings.warn(f"legrace.kernels: numba could not run the fused max-pool ({type(e).__name__}: {e}); "
                          "using the torch path", RuntimeWarning, stacklevel=2)
            _works[dtype] = False
    return _works[dtype]
