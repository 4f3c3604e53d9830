"""Checking the accelerator's answers on the trusted side (Freivalds-style), beyond the paper.

A conv is linear in its weight's output channels, so for secret random vectors r (over output
channels) and s (over input channels):

    forward   sum_m r_m Y_res[:, m]  = conv(X_res~, sum_m r_m W[m])              1/M of the conv's MACs
    dL/dX     sum_n s_n dX[:, n]     = conv_transpose(dL/dY, sum_n s_n W[:, n])  1/N of them
    dW_res    sum_m r_m dW[m]        = X_res~ (*) sum_m r_m dL/dY[:, m]          1/M of them

r and s are fresh for each answer (4 of each at once), from a generator seeded by the OS's CSPRNG
that never leaves the trusted side. Their entries have random signs and magnitudes uniform in
[1, 2): a single wrong value is always weighted by at least 1, so it is caught whenever it exceeds
the tolerance, and errors spread over several channels escape only if the secret weights happen
to balance them in all 4 combinations.

Tolerance. A checked value is a sum of n products (x * w * r); rounding errors of such a sum
grow like sqrt(n) times the root-sum-square of its terms. So each value is compared against
    scale = sqrt(the same combination computed on squares: conv(X^2, sum_m r_m^2 W[m]^2))
(one more conv of the same size), and flagged when
    |answer - check| > TOLERANCE * sqrt(n) * (scale + rms(scale) / 10);
the second term allows for conv algorithms (FFT) whose rounding spreads over a whole output. The
scale is about the size of the checked value itself, so errors larger than about
TOLERANCE * sqrt(n) of a value (1e-3 for n = 10^4) are caught. Honest float32 answers on a CPU stay
far below TOLERANCE (docs/boundary.md); check the margin on a GPU (benchmarks/verify.py --device
cuda) before relying on it there.
"""

from __future__ import annotations

import math
import secrets

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from legrace.boundary.messages import BoundaryError, Shape

TOLERANCE = 1e-5
COMBINATIONS = 4


class FreivaldsVerifier:
    """Checks conv forward, dL/dX and dW_res answers; raises BoundaryError naming what failed.

    Each answer is checked with COMBINATIONS independent random combinations at once: on a CPU a
    conv with 4 output channels costs what one with 1 does, and a wrong answer must then escape
    all of them.
    """

    def __init__(self, tolerance: float = TOLERANCE, combinations: int = COMBINATIONS, seed: int | None = None) -> None:
        self.tolerance, self.combinations = tolerance, combinations
        self._generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self.checks = 0

    def _random(self, n: int, dtype: torch.dtype) -> Tensor:
        """combinations x n weights: random signs, magnitudes uniform in [1, 2)."""
        shape = (self.combinations, n)
        sign = torch.randint(0, 2, shape, generator=self._generator).mul(2).sub(1)
        return (sign * (1 + torch.rand(shape, generator=self._generator, dtype=torch.float64))).to(dtype)

    def conv_forward(self, layer: int, x: Tensor, w: Tensor, y: Tensor, stride: Shape, padding: Shape,
                     dilation: Shape) -> None:
        sent_dtype, dtype = y.dtype, _work_dtype(y)
        x, w, y = x.to(dtype), w.to(dtype), y.to(dtype)
        r = self._random(w.shape[0], dtype)
        got = _combine(y, r)
        want = F.conv2d(x, _out_combination(w, r), None, stride, padding, dilation)
        squares = F.conv2d(x * x, _out_combination(w * w, r * r), None, stride, padding, dilation)
        terms = w[0].numel() + w.shape[0]  # products in one output, then the combination over M
        self.compare(got, want, squares, terms, sent_dtype, f"Y_res of layer {layer} (ConvForwardReply)")

    def grad_input(self, layer: int, grad_y: Tensor, w: Tensor, grad_x: Tensor, stride: Shape, padding: Shape,
                   dilation: Shape) -> None:
        sent_dtype, dtype = grad_x.dtype, _work_dtype(grad_x)
        grad_y, w, grad_x = grad_y.to(dtype), w.to(dtype), grad_x.to(dtype)
        s = self._random(w.shape[1], dtype)
        shape = (grad_x.shape[0], self.combinations, *grad_x.shape[2:])
        got = _combine(grad_x, s)
        want = conv2d_input(shape, _in_combination(w, s), grad_y, stride, padding, dilation)
        squares = conv2d_input(shape, _in_combination(w * w, s * s), grad_y * grad_y, stride, padding, dilation)
        terms = w.shape[0] * w[0, 0].numel() + w.shape[1]
        self.compare(got, want, squares, terms, sent_dtype, f"dL/dX of layer {layer} (ConvBackwardReply)")

    def grad_weight(self, layer: int, x: Tensor, grad_y: Tensor, grad_w: Tensor, stride: Shape, padding: Shape,
                    dilation: Shape) -> None:
        sent_dtype, dtype = grad_w.dtype, _work_dtype(grad_w)
        x, grad_y, grad_w = x.to(dtype), grad_y.to(dtype), grad_w.to(dtype)
        r = self._random(grad_w.shape[0], dtype)
        shape = (self.combinations, *grad_w.shape[1:])
        got = _out_combination(grad_w, r)
        want = conv2d_weight(x, shape, _combine(grad_y, r), stride, padding, dilation)
        squares = conv2d_weight(x * x, shape, _combine(grad_y * grad_y, r * r), stride, padding, dilation)
        terms = grad_y[:, 0].numel() + grad_w.shape[0]  # a sum over samples and positions, then over M
        self.compare(got, want, squares, terms, sent_dtype, f"dW_res of layer {layer} (ConvBackwardReply)")

    def compare(self, got: Tensor, want: Tensor, squares: Tensor, terms: int, sent_dtype: torch.dtype,
                what: str) -> None:
        """Raise BoundaryError where the accelerator's answer `got` differs from the check `want`
        by more than rounding (`squares`: the check of the squared terms, `terms`: how many are
        summed). Every check ends here: a subclass may override it to observe them."""
        self.checks += 1
        # Half-precision answers are rounded once more, by about their eps, whatever n is.
        tolerance = max(self.tolerance * math.sqrt(terms), 4 * torch.finfo(sent_dtype).eps)
        squares = squares.clamp_min(0)
        allowed = tolerance * (squares.sqrt() + squares.mean().sqrt() / 10)
        off = ~((got - want).abs() <= allowed)  # NaN (inf - inf from +-FLT_MAX answers) is off too
        if bool(off.any()):
            worst = float(((got - want).abs() / allowed.clamp_min(torch.finfo(allowed.dtype).tiny)).max())
            raise BoundaryError(
                f"integrity check failed: the accelerator's {what} is not the requested computation "
                f"({int(off.sum())} of {got.numel()} checked values off, worst by {worst:.3g} x the allowed "
                f"rounding error of {tolerance:.2g} x their scale)"
            )


def _combine(t: Tensor, weights: Tensor) -> Tensor:
    """B x K x ... : the K combinations sum_c weights[k, c] * t[:, c] of a B x C x ... tensor."""
    return torch.matmul(weights, t.reshape(t.shape[0], t.shape[1], -1)).reshape(t.shape[0], -1, *t.shape[2:])


def _out_combination(w: Tensor, r: Tensor) -> Tensor:
    """K x N x k x k: the kernels sum_m r[k, m] W[m] of an M x N x k x k weight."""
    return torch.matmul(r, w.reshape(w.shape[0], -1)).reshape(-1, *w.shape[1:])


def _in_combination(w: Tensor, s: Tensor) -> Tensor:
    """M x K x k x k: the kernels sum_n s[k, n] W[:, n] of an M x N x k x k weight."""
    return torch.matmul(s, w.reshape(*w.shape[:2], -1)).reshape(w.shape[0], -1, *w.shape[2:])


def _work_dtype(t: Tensor) -> torch.dtype:
    """At least float32: half-precision answers are checked in float32."""
    return torch.promote_types(t.dtype, torch.float32)
