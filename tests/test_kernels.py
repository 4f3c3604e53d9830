"""legrace.trusted.kernels: the fused max-pool passes give the torch path's bytes, and load anywhere."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import legrace.trusted.compact as compact
import legrace.trusted.kernels as kernels
from legrace.trusted.compact import CompactMaxPool2d

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed: no fused kernels")


def _torch_path(fn, *args):
    before = kernels.enabled
    kernels.enabled = False
    try:
        return fn(*args)
    finally:
        kernels.enabled = before


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 9, 11), (3, 5, 14, 14), (1, 2, 7, 7), (2, 1, 3, 2), (2, 2, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_max_pool_keeps_the_torch_paths_bytes(monkeypatch, shape, dtype, threads):
    # Ranges cut at any multiple of 8 (BLOCK = 16: many, and not on row or plane edges) must
    # give the same values and the same packed masks as the torch/numpy passes.
    monkeypatch.setattr(compact, "BLOCK", 16)
    monkeypatch.setattr(kernels, "enabled", True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        for x in (torch.randn(shape, dtype=dtype), torch.randint(-1, 2, shape).to(dtype)):  # ties and zeros
            ctx, ctx_ref = _Ctx(), _Ctx()
            y = compact.CompactMaxPool2x2Function.forward(ctx, x)
            y_ref = _torch_path(compact.CompactMaxPool2x2Function.forward, ctx_ref, x)
            assert torch.equal(y, y_ref)
            assert all(torch.equal(a, b) for a, b in zip(ctx.saved, ctx_ref.saved))
            grad = torch.randn(y.shape, dtype=dtype)
            assert torch.equal(compact.CompactMaxPool2x2Function.backward(ctx, grad),
                               _torch_path(compact.CompactMaxPool2x2Function.backward, ctx_ref, grad))
    finally:
        torch.set_num_threads(before)


WINDOWS = [dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False),  # ResNet's stem
           dict(kernel=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), ceil_mode=False),
           dict(kernel=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=False),
           dict(kernel=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 1), ceil_mode=False),
           dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 2), ceil_mode=True),
           dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), ceil_mode=True)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "-".join(f"{v}" for v in w.values()))
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_max_pool_of_any_window_keeps_the_torch_paths_bytes(monkeypatch, window, threads):
    monkeypatch.setattr(compact, "BLOCK", 16)
    monkeypatch.setattr(kernels, "enabled", True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    args = tuple(window.values())
    try:
        torch.manual_seed(0)
        nan = torch.randn(2, 3, 8, 9)
        nan[0, 0, 1, 1] = nan[1, 2, 4, 5] = nan[1, 2, 4, 6] = float("nan")
        for x in (torch.randn(2, 3, 11, 12, dtype=torch.float64), torch.randint(-1, 2, (2, 3, 9, 10)).float(),
                  torch.full((1, 2, 5, 7), float("-inf")), nan, torch.randn(1, 1, 3, 3)):
            ctx, ctx_ref = _Ctx(), _Ctx()
            y = compact.CompactMaxPoolFunction.forward(ctx, x, *args)
            y_ref = _torch_path(compact.CompactMaxPoolFunction.forward, ctx_ref, x, *args)
            assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.nan_to_num(), y_ref.nan_to_num())
            assert torch.equal(ctx.saved[0], ctx_ref.saved[0])
            ctx.args, ctx.x_shape = ctx_ref.args, ctx_ref.x_shape
            grad = torch.randn(y.shape, dtype=x.dtype)
            assert torch.equal(compact.CompactMaxPoolFunction.backward(ctx, grad)[0],
                               _torch_path(compact.CompactMaxPoolFunction.backward, ctx_ref, grad)[0])
    finally:
        torch.set_num_threads(before)


class _Ctx:
    """Stands in for autograd's context object when calling a Function's forward and backward directly."""

    def save_for_backward(self, *tensors):
        self.saved = tensors

    @property
    def saved_tensors(self):
        return self.saved


def test_fused_max_pool_passes_nan_on_like_maxpool(monkeypatch):
    monkeypatch.setattr(kernels, "enabled", True)
    x = torch.randn(1, 2, 4, 4)
    x[0, 0, 0, 1] = x[0, 1, 3, 2] = float("nan")  # not first in their windows
    assert torch.equal(CompactMaxPool2d()(x.requires_grad_()).isnan(), nn.MaxPool2d(2)(x).isnan())


def _special(shape, dtype, seed=0):
    """Values that only exact selects keep: NaN (with distinct payloads), ±inf, ±0 and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    pick = torch.randint(0, 8, shape, generator=g)
    x[pick == 0] = float("nan")
    x[pick == 1] = float("inf")
    x[pick == 2] = float("-inf")
    x[pick == 3] = 0.0
    x[pick == 4] = -0.0
    x[pick == 5] = 1.0
    flat = x.view(-1).view(torch.int32 if dtype == torch.float32 else torch.int64)
    flat[pick.view(-1) == 0] += torch.arange(int((pick == 0).sum()))  # NaNs that differ in payload
    return x


POOLS = [dict(kernel_size=2)] + [dict(kernel_size=w["kernel"], stride=w["stride"], padding=w["padding"],
                                      dilation=w["dilation"], ceil_mode=w["ceil_mode"]) for w in WINDOWS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", POOLS, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_fused_max_pools_copy_the_winners_bits_like_maxpool(monkeypatch, dtype, options):
    # The kernels select by masking integer bits: the winner must come out bit for bit as
    # nn.MaxPool2d copies it (NaN payloads, the sign of a zero, the first of equal values, -inf),
    # and the gradient must reach the same input, with blocks cut mid-row and mid-plane.
    monkeypatch.setattr(compact, "BLOCK", 16)
    monkeypatch.setattr(kernels, "enabled", True)
    ints = torch.int32 if dtype == torch.float32 else torch.int64
    for shape in [(2, 3, 10, 13), (1, 2, 7, 6), (1, 1, 9, 40)]:
        x = _special(shape, dtype)
        x_c, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = CompactMaxPool2d(**options)(x_c), nn.MaxPool2d(**options)(x_ref)
        assert torch.equal(y.detach().view(ints), y_ref.detach().view(ints))
        grad = _special(y.shape, dtype, seed=1)
        y.backward(grad)
        y_ref.backward(grad)
        assert torch.equal(x_c.grad.isnan(), x_ref.grad.isnan())
        assert torch.equal(x_c.grad.nan_to_num(), x_ref.grad.nan_to_num())


def test_fused_kernels_work_where_numba_cannot_cache_them():
    # A read-only install with no writable cache directory: numba refuses cache=True at import.
    code = ("import numba.core.caching as c\n"
            "getattr(c, 'CacheImpl', getattr(c, '_CacheImpl', None))._locator_classes = []\n"
            "import torch, legrace.trusted.kernels as k, legrace.trusted.compact as m\n"
            "assert k.enabled and type(k.max_pool_2x2._cache).__name__ == 'NullCache'\n"
            "x = torch.randn(2, 3, 6, 6)\n"
            "assert torch.equal(m.CompactMaxPool2d()(x.requires_grad_()), torch.nn.functional.max_pool2d(x, 2))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_the_environment_turns_the_kernels_off():
    code = "import legrace.trusted.kernels as k; print(k.enabled)"
    env = {**os.environ, "LEGRACE_FUSED_KERNELS": "0"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert run.stdout.strip() == "False", run.stderr


def test_kernels_that_numba_cannot_build_fall_back_to_the_torch_path_with_a_warning(monkeypatch):
    def broken(*args):
        raise TypeError("a numba that cannot type this")

    monkeypatch.setattr(kernels, "enabled", True)
    monkeypatch.setattr(kernels, "_works", {})
    monkeypatch.setattr(kernels, "max_pool_2x2", broken)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match="using the torch path"):
        y = CompactMaxPool2d()(x.requires_grad_())
    assert torch.equal(y, nn.MaxPool2d(2)(x)) and kernels._works == {np.dtype(np.float32): False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torch path's backward too, with no second warning
        y.sum().backward()
    assert torch.equal(x.grad, torch.autograd.grad(nn.MaxPool2d(2)(x).sum(), x)[0])


def test_the_kernels_check_themselves_once_per_dtype(monkeypatch):
    monkeypatch.setattr(kernels, "enabled", True)
    monkeypatch.setattr(kernels, "_works", {})
    assert kernels.usable(np.float32) and kernels.usable(np.float64)
    assert kernels._works == {np.dtype(np.float32): True, np.dtype(np.float64): True}
    monkeypatch.setattr(kernels, "enabled", False)
    assert not kernels.usable(np.float32)
