"""Fused CPU passes for the compact max-pools, compiled by numba when it is installed.

The trusted side's element-wise work is bound by memory traffic, and torch runs each operation
as its own pass over memory: the compact 2x2 max-pool's forward takes seven (two maxima, three
comparisons, their packing, a third maximum) and its backward four; the compact pool of any other
window (ResNet's 3x3 stem) takes torch's pool with int64 indices and four passes turning them into
window codes, and its backward decodes them again. Each kernel here does the layer's work in one
pass and writes exactly the bytes legrace.trusted.compact's torch path writes (the same values, the same
packed row and column bits or window codes), so either path can consume what the other produced.
(The ReLU has no kernel: torch's ReLU and numpy's SIMD packbits over cache-sized blocks were
faster than a numba loop, whose bit packing does not vectorise.)

The forward kernels do not branch on the data (but for the window pool's border windows, a
small share): a winner's bits are picked by an integer mask
(xi, yi: the floats' memory viewed as unsigned integers of their width, so NaN payloads and the
sign of zero pass exactly), while the comparisons read the floats. On activations like the
benchmark's, random in sign and size, each comparison goes either way at random, which no branch
predictor learns, and the branching kernels ran slower than the torch path
(benchmarks/pool_kernels.py, docs/performance.md).

Kernels work on a flat range [k0, k1) of pool outputs (for the 2x2 pool starting at a multiple of
8, so every packed byte belongs to one range; the window pool's backward on whole planes, since
overlapping windows add into shared inputs); legrace.trusted.compact cuts the work into such ranges and
shares them between torch's threads. They release the GIL and start no threads of their own.
Without numba, or with LEGRACE_FUSED_KERNELS=0 in the environment, `enabled` is False and
legrace.trusted.compact uses its torch passes; so it does, with a warning, where numba is present but
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
def max_pool_2x2(x, xi, yi, row_bits, col_bits, k0, k1, oh, ow, h, w):  # pragma: no cover - compiled
    """2x2 stride-2 max-pool of planes h x w (x flat, xi the same memory as unsigned integers of
    its width) over outputs [k0, k1) of the oh x ow grid, written to yi (y's memory likewise).

    The first maximum in row order wins, as in PyTorch: row bit = the bottom row's maximum is
    strictly larger than the top row's, column bit = the right element of the winning row is
    strictly larger than its left one; a NaN counts as larger than anything, so it propagates as
    in nn.MaxPool2d. Odd trailing rows and columns are dropped, as in floor mode.

    Branch-free, so it vectorises: each winner is chosen by masking the integer bits (exact for
    NaN payloads and signed zeros), while the comparisons read the floats; the decisions go to a
    byte per output first and are packed eight to a byte after. With data-dependent branches
    instead it ran much slower on random data.
    """
    n = k1 - k0
    lower = np.empty(n + 8, np.uint8)
    right = np.empty(n + 8, np.uint8)
    plane = k0 // (oh * ow)
    rest = k0 - plane * oh * ow
    i = rest // ow
    j0 = rest - i * ow
    k = k0
    while k < k1:  # one output row (or its part in [k0, k1)) at a time: a plain inner loop
        count = min(ow - j0, k1 - k)
        base = plane * h * w + 2 * i * w + 2 * j0
        for t in range(count):
            o = base + 2 * t
            a, b, c, d = x[o], x[o + 1], x[o + w], x[o + w + 1]
            ai, bi, ci, di = xi[o], xi[o + 1], xi[o + w], xi[o + w + 1]
            zero = ai ^ ai  # 0 in the integer width of xi
            top_right = (b > a) | (b != b)
            bottom_right = (d > c) | (d != d)
            # bottom row wins if its maximum is larger or NaN; np.maximum propagates NaN, so a
            # NaN in the top row makes the comparison false, as in the branching form
            low = (np.maximum(c, d) > np.maximum(a, b)) | (c != c) | (d != d)
            m_top, m_bottom, m_low = zero - (zero | top_right), zero - (zero | bottom_right), zero - (zero | low)
            top = (bi & m_top) | (ai & ~m_top)
            bottom = (di & m_bottom) | (ci & ~m_bottom)
            yi[k + t] = (bottom & m_low) | (top & ~m_low)
            lower[k - k0 + t] = low
            right[k - k0 + t] = (low & bottom_right) | ((not low) & top_right)
        k += count
        j0 = 0
        i += 1
        if i == oh:
            i, plane = 0, plane + 1
    lower[n:] = 0  # a last partial byte is padded with zero bits
    right[n:] = 0
    q0 = k0 >> 3
    for q in range((n + 7) >> 3):
        s = 8 * q
        row_bits[q0 + q] = ((lower[s] << 7) | (lower[s + 1] << 6) | (lower[s + 2] << 5) | (lower[s + 3] << 4)
                            | (lower[s + 4] << 3) | (lower[s + 5] << 2) | (lower[s + 6] << 1) | lower[s + 7])
        col_bits[q0 + q] = ((right[s] << 7) | (right[s + 1] << 6) | (right[s + 2] << 5) | (right[s + 3] << 4)
                            | (right[s + 4] << 3) | (right[s + 5] << 2) | (right[s + 6] << 1) | right[s + 7])
    return 0


@_jit
def max_unpool_2x2(gi, row_bits, col_bits, outi, k0, k1, oh, ow, h, w):  # pragma: no cover - compiled
    """The 2x2 max-pool's backward over outputs [k0, k1): each output's gradient to its winner, 0
    to the other three, and 0 to the odd row and column floor mode dropped (written with the
    output row or plane they end), so every element of out is written exactly once overall.
    gi and outi are the gradients' memory as unsigned integers: the gradient goes through a bit
    mask, branch-free and exact (faster than branching on the bits)."""
    plane = k0 // (oh * ow)
    rest = k0 - plane * oh * ow
    i = rest // ow
    j0 = rest - i * ow
    k = k0
    while k < k1:
        count = min(ow - j0, k1 - k)
        top = plane * h * w + 2 * i * w
        base = top + 2 * j0
        for t in range(count):
            kt = k + t
            bit = 7 - (kt & 7)
            low = (row_bits[kt >> 3] >> bit) & 1
            rgt = (col_bits[kt >> 3] >> bit) & 1
            g = gi[kt]
            zero = g ^ g
            m_low, m_right = zero - (zero | low), zero - (zero | rgt)
            o = base + 2 * t
            outi[o] = g & ~m_low & ~m_right
            outi[o + 1] = g & ~m_low & m_right
            outi[o + w] = g & m_low & ~m_right
            outi[o + w + 1] = g & m_low & m_right
        k += count
        if j0 + count < ow:  # [k0, k1) ends inside this row
            j0 += count
            continue
        if w > 2 * ow:  # odd width: the last column of both rows
            outi[top + w - 1] = 0
            outi[top + 2 * w - 1] = 0
        j0 = 0
        i += 1
        if i == oh:
            for e in range(plane * h * w + 2 * oh * w, (plane + 1) * h * w):  # odd height: the last row
                outi[e] = 0
            i, plane = 0, plane + 1
    return 0


def _inline(fn):
    return numba.njit(inline="always")(fn) if numba is not None else fn


@_inline
def _window_step(x, xi, best, bits, win, at, count, sw, position, zero):  # pragma: no cover - compiled
    """One window position (code `position`) for `count` windows side by side, their inputs
    at + t·sw: a later value wins if strictly larger or NaN. Branch-free: the winner's bits are
    chosen by a mask; best keeps the running maximum, NaN once any is NaN."""
    xs = x[at:at + sw * count]  # slices starting at 0: simpler indexing, which LLVM vectorises
    xis = xi[at:at + sw * count]
    for t in range(count):
        v = xs[t * sw]
        b = best[t]
        take = (v > b) | (v != v)
        mask = zero - (zero | np.uint8(take))
        bits[t] = (xis[t * sw] & mask) | (bits[t] & ~mask)
        w = win[t]
        win[t] = w ^ ((w ^ position) & (np.uint8(0) - np.uint8(take)))
        best[t] = np.maximum(b, v)


@_jit
def _window_max_at(x, xi, base, top, left, h, w, kh, kw, dh, dw, neg_inf):  # pragma: no cover - compiled
    """One window whose origin (top, left) may lie outside the input (a border output): its
    maximum's bits and code, as max_pool_window defines them, skipping positions outside."""
    a0 = 0
    while top + a0 * dh < 0:
        a0 += 1
    b0 = 0
    while left + b0 * dw < 0:
        b0 += 1
    best = -np.inf
    bits = neg_inf
    win = a0 * kw + b0
    for a in range(a0, kh):
        r = top + a * dh
        if r >= h:
            break
        for b in range(b0, kw):
            c = left + b * dw
            if c >= w:
                break
            v = x[base + r * w + c]
            if v > best or v != v:
                best, bits, win = v, xi[base + r * w + c], a * kw + b
    return bits, win


@_jit
def max_pool_window(x, xi, yi, code, neg_inf, k0, k1, oh, ow, h, w, kh, kw, sh, sw, ph, pw, dh, dw):  # pragma: no cover - compiled
    """Any max-pool window (kh x kw, stride, padding, dilation) over outputs [k0, k1): y's bits
    (yi; xi is x's memory as unsigned integers of its width) and the winner's position in its
    window, a·kw + b for window row a and column b, counted from the window's unclamped origin,
    as legrace.trusted.compact's torch path codes it.

    As in PyTorch's CPU kernel: positions outside the input are skipped, a later value wins only
    if strictly larger or NaN, and the first position inside the input is the winner when none is
    larger than -inf (neg_inf: its bits).

    The windows of an output row that lie wholly inside the input are done together, one window
    position at a time across the row, branch-free (the winner's bits chosen by a mask), so the
    loop vectorises and no chain of comparisons waits on the one before; a window at a time, its
    comparisons a chain of data-dependent branches, ran slower than torch's own passes.
    """
    best = np.empty(ow, x.dtype)
    bits = np.empty(ow, xi.dtype)
    win = np.empty(ow, np.uint8)
    zero = xi[0] ^ xi[0]  # 0 in the integer width of xi
    # output columns whose windows lie inside the input: left = j*sw - pw >= 0, left + (kw-1)*dw < w
    j_in0 = min(ow, (pw + sw - 1) // sw)
    last = w - 1 - (kw - 1) * dw + pw
    j_in1 = max(j_in0, min(ow, last // sw + 1)) if last >= 0 else j_in0
    plane = k0 // (oh * ow)
    rest = k0 - plane * oh * ow
    i = rest // ow
    j0 = rest - i * ow
    k = k0
    while k < k1:  # one output row (or its part in [k0, k1)) at a time
        j1 = j0 + min(ow - j0, k1 - k)
        base = plane * h * w
        top = i * sh - ph
        v0, v1 = j1, j1  # the columns done together
        if top >= 0 and top + (kh - 1) * dh < h and max(j0, j_in0) < min(j1, j_in1):
            v0, v1 = max(j0, j_in0), min(j1, j_in1)
        for j in range(j0, j1):  # border windows, one at a time
            if j < v0 or j >= v1:
                yi[k + j - j0], code[k + j - j0] = _window_max_at(x, xi, base, top, j * sw - pw, h, w, kh, kw,
                                                                  dh, dw, neg_inf)
        if v0 < v1:  # the inside windows [v0, v1), one window position at a time across them
            count = v1 - v0
            origin = base + top * w + v0 * sw - pw
            for t in range(count):
                best[t] = x[origin + t * sw]
                bits[t] = xi[origin + t * sw]
                win[t] = 0
            for a in range(kh):
                for b in range(kw):
                    at = origin + a * dh * w + b * dw
                    if sw == 1:  # a constant stride lets the loop vectorise
                        _window_step(x, xi, best, bits, win, at, count, 1, a * kw + b, zero)
                    elif sw == 2:
                        _window_step(x, xi, best, bits, win, at, count, 2, a * kw + b, zero)
                    else:
                        _window_step(x, xi, best, bits, win, at, count, sw, a * kw + b, zero)
            out = k + v0 - j0
            for t in range(count):
                yi[out + t] = bits[t]
                code[out + t] = win[t]
        k += j1 - j0
        j0 = 0
        i += 1
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


def bits(a: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the element's width, for the bit-mask selects."""
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


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
            max_pool_2x2(x, bits(x), bits(y), rows, cols, 0, 4, 2, 2, 4, 4)
            max_unpool_2x2(bits(y), rows, cols, bits(grad), 0, 4, 2, 2, 4, 4)
            ok = y.tolist() == [5, 9, 7, 8] and np.array_equal(grad != 0, x >= 5)
            # ResNet's stem window (3x3, stride 2, padding 1) on the same plane
            code = np.empty(4, np.uint8)
            max_pool_window(x, bits(x), bits(y), code, bits(np.array([-np.inf], dtype))[0], 0, 4, 2, 2, 4, 4,
                            3, 3, 2, 2, 1, 1, 1, 1)
            max_unpool_window(np.ones(4, dtype), code, grad, 0, 1, 2, 2, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1)
            ok = (ok and y.tolist() == [5, 9, 7, 9] and code.tolist() == [8, 8, 7, 2]
                  and grad[7] == 2 and grad.sum() == 4)
            _works[dtype] = bool(ok)  # not numpy.bool_: it goes into JSON reports
        except Exception as e:  # pragma: no cover - depends on the environment
            warnings.warn(f"legrace.trusted.kernels: numba could not run the fused max-pool ({type(e).__name__}: {e}); "
                          "using the torch path", RuntimeWarning, stacklevel=2)
            _works[dtype] = False
    return _works[dtype]
