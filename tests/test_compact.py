import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import legrace.trusted.compact as compact
import legrace.trusted.kernels as kernels
from legrace.trusted.compact import CompactMaxPool2d, PackedReLU, masked_by_bits, pack_bits, pack_positive, unpack_bits


@pytest.fixture(autouse=True, params=["fused", "torch"])
def path(request, monkeypatch):
    """Every test here runs on both paths: legrace.trusted.kernels' fused passes and the torch/numpy ones."""
    if request.param == "fused" and kernels.numba is None:
        pytest.skip("numba is not installed: no fused kernels")
    monkeypatch.setattr(kernels, "enabled", request.param == "fused")
    return request.param


@pytest.mark.parametrize("shape", [(3,), (2, 5, 7), (4, 3, 8, 8)])
def test_bits_round_trip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 16, 23, 40, 1001])
@pytest.mark.parametrize("threads", [1, 3])
def test_bit_passes_cut_into_blocks_and_threads_give_the_same_bytes(monkeypatch, n, threads):
    monkeypatch.setattr(compact, "BLOCK", 16)  # many blocks, split between threads, odd ends
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = torch.randn(n)
        y[::5] = 0.0
        mask = y > 0
        bits = (mask.reshape(-1, 1) if n % 8 == 0 else torch.cat([mask, mask.new_zeros(-n % 8)])).reshape(-1, 8)
        expected = (bits.to(torch.uint8) << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
        assert torch.equal(pack_bits(mask), expected)
        assert torch.equal(pack_positive(y), expected)
        assert torch.equal(unpack_bits(expected, mask.shape), mask)
        grad = torch.randn(n, dtype=torch.float64)
        assert torch.equal(masked_by_bits(grad, expected), grad * mask)
    finally:
        torch.set_num_threads(before)


def test_bit_passes_on_strided_or_differentiable_input_take_torch_paths():
    y = torch.randn(6, 10)[:, ::2]  # not contiguous
    assert torch.equal(unpack_bits(pack_positive(y), y.shape), y > 0)
    assert torch.equal(unpack_bits(pack_bits(y > 0), y.shape), y > 0)
    grad = torch.randn(6, 5, requires_grad=True)  # double backward: stays in autograd
    out = masked_by_bits(grad, pack_bits(y > 0))
    assert out.requires_grad and torch.equal(out, grad * (y > 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for the non-CPU packing path")
def test_bits_round_trip_on_gpu_matches_cpu():
    mask = torch.rand(5, 7, 9) > 0.5
    assert torch.equal(pack_bits(mask.cuda()).cpu(), pack_bits(mask))
    assert torch.equal(unpack_bits(pack_bits(mask).cuda(), mask.shape).cpu(), mask)


def _same(compact, ref, x):
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compact(a), ref(b)
    g = torch.randn_like(yb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_packed_relu_is_relu():
    x = torch.randn(3, 4, 5, 6)
    x[0, 0, 0, :3] = 0.0  # ties at zero
    _same(PackedReLU(), nn.ReLU(), x)


def test_compact_maxpool_is_maxpool():
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    x[0, 0, :2, :2] = 1.0  # ties in a window
    _same(CompactMaxPool2d(), nn.MaxPool2d(2, 2), x)
    _same(CompactMaxPool2d(), nn.MaxPool2d(2, 2), torch.randn(1, 2, 7, 9))  # odd sizes drop the edge


@pytest.mark.parametrize("shape", [(1, 1, 1, 5), (2, 3, 4, 1), (2, 3, 0, 4)])
def test_compact_maxpool_on_an_input_too_small_for_a_window_fails_like_maxpool(shape):
    for x in (torch.randn(shape), torch.randn(shape, requires_grad=True)):
        with pytest.raises(RuntimeError) as expected:
            nn.MaxPool2d(2)(x)
        with pytest.raises(RuntimeError) as got:
            CompactMaxPool2d()(x)
        assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("args", [dict(kernel_size=3, stride=0), dict(kernel_size=3, dilation=0),
                                  dict(kernel_size=2, padding=2)])
def test_compact_maxpool_with_invalid_arguments_fails_like_maxpool(args):
    for x in (torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8, requires_grad=True)):
        with pytest.raises(RuntimeError) as expected:
            nn.MaxPool2d(**args)(x)
        with pytest.raises(RuntimeError) as got:
            CompactMaxPool2d(**args)(x)
        assert str(got.value) == str(expected.value)


def test_saved_memory_is_small():
    sizes = []
    for layer in (nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), nn.Sequential(PackedReLU(), CompactMaxPool2d())):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(4, 16, 32, 32, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        sizes.append(total)
    assert sizes[1] * 16 < sizes[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_maxpool_breaks_ties_like_maxpool(dtype):
    # Values from {-1, 0, 1}: most windows hold ties, in every arrangement; PyTorch keeps the
    # first maximum in row order, and the gradient must go to that same position.
    torch.manual_seed(0)
    x = torch.randint(-1, 2, (3, 4, 10, 12)).to(dtype)
    _same(CompactMaxPool2d(), nn.MaxPool2d(2, 2), x)
    _same(CompactMaxPool2d(), nn.MaxPool2d(2, 2), torch.relu(x))  # all-zero windows after a ReLU
    _same(CompactMaxPool2d(), nn.MaxPool2d(2, 2), torch.randint(-1, 2, (2, 3, 9, 11)).to(dtype))


@pytest.mark.parametrize("args", [dict(kernel_size=3, stride=2, padding=1),  # ResNet's stem
                                  dict(kernel_size=3, stride=1),
                                  dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
                                  dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1)),
                                  dict(kernel_size=2, stride=2, ceil_mode=True)])
def test_compact_maxpool_any_window_is_maxpool(args):
    torch.manual_seed(0)
    for x in (torch.randn(2, 3, 11, 12, dtype=torch.float64), torch.randint(-1, 2, (2, 3, 9, 10)).float()):
        _same(CompactMaxPool2d(**args), nn.MaxPool2d(**args), x)


def test_compact_maxpool_keeps_one_byte_per_output_not_its_input():
    saved = []
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = CompactMaxPool2d(3, 2, 1)(x)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, y.numel())]


def test_relu_then_maxpool_runs_as_maxpool_then_relu_with_the_same_gradients():
    from legrace.trusted.convert import convert

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    gm = convert(copy.deepcopy(model))
    order = [type(m).__name__ for n, m in gm.named_modules() if n.count(".") == 1 or (n and "." not in n)]
    assert order.count("Sequential") == 1  # the pool, now pool -> ReLU; the second ReLU is kept as is
    for x in (torch.randn(2, 3, 16, 16), torch.randint(-1, 2, (2, 3, 16, 16)).float()):  # ties too
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = gm(a), model(b)
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(gm.parameters(), model.parameters()))
        gm.zero_grad()
        model.zero_grad()
    assert gm.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("layers", [
    (PackedReLU(), nn.ReLU()),
    (CompactMaxPool2d(2), nn.MaxPool2d(2)),
    (CompactMaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)),
])
def test_without_backward_nothing_is_packed_and_the_values_are_the_same(monkeypatch, layers):
    mine, ref = layers
    packed = []  # calls of the autograd functions that keep masks or window codes
    for name in ("PackedReLUFunction", "CompactMaxPool2x2Function", "CompactMaxPoolFunction"):
        function = getattr(compact, name)
        monkeypatch.setattr(function, "apply", lambda *a, _f=function.apply: packed.append(1) or _f(*a))
    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        assert torch.equal(mine(x), ref(x))
    assert torch.equal(mine(x), ref(x))  # grad enabled, but nothing to differentiate
    assert not packed
    y = mine(x.requires_grad_())
    assert packed and torch.equal(y, ref(x))  # backward will come: the packing path


class InPlace(nn.Module):
    """conv -> BN -> an in-place ReLU, called as `body` says."""

    def __init__(self, body):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 2)
        self.body = body

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(self, x), 1), 1))


def _seen_after(self, x):
    h = self.bn(self.conv(x))
    self.relu(h)  # in place: h is now relu(h)
    return h


def _seen_through_a_view(self, x):
    h = self.bn(self.conv(x))
    view = h.view(h.shape)
    self.relu(h)
    return view


def _model_input(self, x):
    self.relu(x)  # the caller's tensor changes too
    return self.bn(self.conv(x))


def _result_only(self, x):
    h = self.bn(self.conv(x))
    h += 1.0  # an in-place add first, as in ResNet's blocks
    return self.relu(h)


@pytest.mark.parametrize("body,packed", [(_seen_after, False), (_seen_through_a_view, False), (_model_input, False),
                                         (_result_only, True)])
def test_inplace_relu_becomes_packed_only_where_nothing_sees_its_input_change(body, packed):
    from legrace.trusted.convert import convert

    torch.manual_seed(0)
    model = InPlace(body)
    gm = convert(copy.deepcopy(model))
    assert isinstance(gm.relu, PackedReLU) is packed
    x = torch.randn(2, 3, 8, 8)
    a, b = x.clone(), x.clone()
    assert torch.equal(gm(a), model(b)) and torch.equal(a, b)


def test_layers_with_hooks_keep_their_hooks():
    from legrace.trusted.convert import convert

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2))
    calls = []
    for i in (1, 2):
        model[i].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    gm = convert(model)
    assert gm.get_submodule("1") is model[1] and gm.get_submodule("2") is model[2]
    assert isinstance(gm.get_submodule("4"), nn.Sequential)  # the hook-free ReLU -> pool still moves
    gm(torch.randn(1, 3, 8, 8))
    assert calls == ["ReLU", "MaxPool2d"]


def test_a_channels_last_pool_stays_channels_last():
    # the fused kernels write NCHW; nn.MaxPool2d keeps channels_last, and so must the compact pool
    # (a later .contiguous() in the user's model would alias its output instead of copying it)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    for args in ((2,), (3, 2, 1)):
        pool = nn.MaxPool2d(*args)
        y = CompactMaxPool2d(*args)(x)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert torch.equal(y, pool(x))
