"""verify=True: the trusted side checks the accelerator's answers (legrace.trusted.freivalds)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from legrace import LegRace
from legrace.accelerator.compute import Accelerator
from legrace.boundary.messages import BoundaryError, ConvBackwardReply, ConvForward, ConvForwardReply, ResendOutput
from legrace.trusted.freivalds import FreivaldsVerifier
from legrace.models import SmallCNN

CONVS = [((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 0), (1, 1)), ((1, 1), (2, 2), (2, 2))]


def honest(conv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 9, 9, generator=g, dtype=dtype)
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=dtype)
    y = F.conv2d(x, w, None, *conv)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    gx = conv2d_input(x.shape, w, gy, *conv)
    gw = conv2d_weight(x, w.shape, gy, *conv)
    return x, w, y, gy, gx, gw


def test_honest_answers_of_another_summation_order_and_long_sums_pass():
    # float64 answers rounded to float32 (another algorithm's rounding), and a weight gradient
    # that sums 32 x 32 x 32 products per value
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 16, 32, 32, generator=g), torch.randn(24, 16, 3, 3, generator=g)
    gy = torch.randn(32, 24, 32, 32, generator=g)
    v = FreivaldsVerifier()
    for _ in range(3):
        v.conv_forward(0, x, w, F.conv2d(x.double(), w.double(), None, 1, 1).float(), (1, 1), (1, 1), (1, 1))
        v.grad_input(0, gy, w, conv2d_input(x.shape, w.double(), gy.double(), 1, 1).float(), (1, 1), (1, 1), (1, 1))
        v.grad_weight(0, x, gy, conv2d_weight(x.double(), w.shape, gy.double(), 1, 1).float(), (1, 1), (1, 1), (1, 1))
        v.grad_weight(0, x, gy, conv2d_weight(x, w.shape, gy, 1, 1), (1, 1), (1, 1), (1, 1))


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_honest_answers_pass(conv, dtype):
    v = FreivaldsVerifier()
    for seed in range(5):
        x, w, y, gy, gx, gw = honest(conv, dtype, seed)
        v.conv_forward(0, x, w, y, *conv)
        v.grad_input(0, gy, w, gx, *conv)
        v.grad_weight(0, x, gy, gw, *conv)
    assert v.checks == 15


def scaled(t):
    return t * 1.01


def one_value(t):
    t = t.clone()
    t.view(-1)[t.numel() // 2] += 0.05 * float(t.abs().max())
    return t


def channels_swapped(t):
    return t[:, [1, 0, *range(2, t.shape[1])]]


def channel_zeroed(t):
    t = t.clone()
    t[:, 2] = 0
    return t


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("tamper", [scaled, one_value, channels_swapped, channel_zeroed])
def test_tampered_answers_are_caught(conv, tamper):
    x, w, y, gy, gx, gw = honest(conv)
    v = FreivaldsVerifier()
    with pytest.raises(BoundaryError, match=r"Y_res of layer 4 \(ConvForwardReply\)"):
        v.conv_forward(4, x, w, tamper(y), *conv)
    with pytest.raises(BoundaryError, match=r"dL/dX of layer 4 \(ConvBackwardReply\)"):
        v.grad_input(4, gy, w, tamper(gx), *conv)
    with pytest.raises(BoundaryError, match=r"dW_res of layer 4 \(ConvBackwardReply\)"):
        v.grad_weight(4, x, gy, tamper(gw), *conv)


class Tampering(Accelerator):
    """An accelerator that adds a small error to one kind of answer."""

    def __init__(self, what):
        super().__init__()
        self.what = what

    def handle(self, message):
        reply = super().handle(message)
        if self.what == "resend" and isinstance(message, ResendOutput):  # honest forward, lying resend
            return ConvForwardReply(reply.y_res * 1.001, reply.stored)
        if self.what == "forward" and isinstance(message, ConvForward):
            return ConvForwardReply(reply.y_res * 1.001, reply.stored)
        if isinstance(reply, ConvBackwardReply):
            gx, gw = reply.grad_x, reply.grad_w
            if self.what == "grad_x" and gx is not None:
                gx = one_value(gx)
            if self.what == "grad_w" and gw is not None:
                gw = one_value(gw)
            return ConvBackwardReply(gx, gw)
        return reply


def step(verify, what, monkeypatch, wire_dtype=None):
    monkeypatch.setattr("legrace.wiring.Accelerator", lambda device, **options: Tampering(what))
    torch.manual_seed(0)
    engine = LegRace(rank=2, noise_multiplier=1.0, clip=1.0, verify=verify, wire_dtype=wire_dtype)
    model = engine.convert(SmallCNN(1, 3))
    F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 3, (4,))).backward()


@pytest.mark.parametrize("what,message", [("forward", "Y_res of layer 1"), ("grad_x", "dL/dX of layer 2"),
                                          ("grad_w", "dW_res of layer 2"), ("resend", "Y_res of layer 2")])
def test_verify_catches_a_tampering_accelerator_that_otherwise_goes_unnoticed(what, message, monkeypatch):
    step(False, what, monkeypatch)  # shapes, dtypes and values are plausible: nothing else notices
    with pytest.raises(BoundaryError, match=f"integrity check failed: the accelerator's {message}"):
        step(True, what, monkeypatch)


@pytest.mark.parametrize("what,message", [("forward", "Y_res of layer 1"), ("resend", "Y_res of layer 2")])
def test_verify_with_a_bfloat16_wire_gets_answers_it_can_check_closely(what, message, monkeypatch):
    # answered in bfloat16, Y_res could only be checked to bfloat16's rounding (a channel scaled by
    # 3% went through); under verification the accelerator answers in the weight's float32
    with pytest.raises(BoundaryError, match=f"integrity check failed: the accelerator's {message}"):
        step(True, what, monkeypatch, wire_dtype="bfloat16")
    monkeypatch.undo()
    engine = LegRace(rank=2, noise_multiplier=1.0, clip=1.0, verify=True, wire_dtype="bfloat16")
    model = engine.convert(SmallCNN(1, 3))
    F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 3, (4,))).backward()  # honest: passes
    assert engine.boundary.verifier.checks == 8


def test_verify_passes_an_honest_training_step():
    engine = LegRace(rank=2, noise_multiplier=1.0, clip=1.0, verify=True)
    model = engine.convert(SmallCNN(1, 3))
    for _ in range(2):
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 3, (4,))).backward()
    # forward, dW_res, dL/dX and the Y_res resent for BatchNorm's backward, of layers 1 and 2
    # (layer 0's single channel is split exactly by R = 2: it sends nothing)
    assert engine.boundary.verifier.checks == 2 * (2 + 2 + 2 + 2)


def test_an_answer_whose_check_overflows_is_caught():
    # +-FLT_MAX at one pixel of two channels: finite, so it passes the finiteness checks, but the
    # check's combination over channels can be inf - inf = NaN, and NaN > allowed is False
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 4, 4), torch.randn(512, 2, 3, 3)
    bad = F.conv2d(x, w, None, 1, 1)
    big = torch.finfo(torch.float32).max
    bad[0, 0, 1, 1], bad[0, 300, 1, 1] = big, -big
    for _ in range(100):  # each check draws its own random vector: every one must catch it
        with pytest.raises(BoundaryError, match="integrity check failed"):
            FreivaldsVerifier().conv_forward(1, x, w, bad, (1, 1), (1, 1), (1, 1))


def test_a_forward_the_accelerator_cannot_compute_keeps_nothing():
    from legrace.boundary.messages import NoisedResidual, RegisterConv, SetWeight

    acc = Accelerator()
    acc.handle(RegisterConv(0, (1, 1), (1, 1), (1, 1)))
    acc.handle(SetWeight(0, torch.randn(5, 6, 3, 3)))
    with pytest.raises(RuntimeError):  # 4 channels for a 6-channel weight (a worker answers Refused)
        acc.handle(ConvForward(0, NoisedResidual(torch.randn(2, 4, 8, 8), 1.0, 1.0), True))
    assert acc._stored == {}
