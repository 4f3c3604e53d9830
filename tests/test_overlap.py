"""Running the two legs concurrently (Boundary(overlap=True)): same bits, really concurrent, and
one request in flight at a time."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

import legrace.trusted.split_conv as split_conv
from legrace import LegRace
from legrace.accelerator.compute import Accelerator
from legrace.boundary.messages import BoundaryError, ConvForward, ConvForwardReply
from legrace.boundary.gateway import Boundary, InProcessTransport
from legrace.trusted.mechanism import GaussianMechanism
from legrace.models import SmallCNN


def grads_after_steps(overlap: bool, steps: int = 2):
    torch.manual_seed(0)
    module = SmallCNN(3, 4)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    engine = LegRace(rank=2, clip=1.0, noise_multiplier=0.5, noise_seed=3, overlap=overlap)
    model = engine.convert(copy.deepcopy(module))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        optimizer.step()
    engine.close()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:a fixed noise seed")
def test_overlapped_training_gives_the_same_bits_as_one_request_at_a_time():
    out_seq, grads_seq = grads_after_steps(overlap=False)
    out_ovl, grads_ovl = grads_after_steps(overlap=True)
    assert torch.equal(out_seq, out_ovl)
    for a, b in zip(grads_seq, grads_ovl):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:a fixed noise seed")
def test_overlap_keeps_the_bits_when_the_trusted_side_runs_fewer_threads_than_openmp_starts_with():
    # the accelerator's thread takes the trusted side's thread count: a new thread starts with
    # OpenMP's default team, whose CPU weight gradients summed in another order (seen with
    # OMP_NUM_THREADS above the cores, as on a 2-core host running 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out_seq, grads_seq = grads_after_steps(overlap=False)
        out_ovl, grads_ovl = grads_after_steps(overlap=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out_seq, out_ovl)
    assert all(torch.equal(a, b) for a, b in zip(grads_seq, grads_ovl))


def test_the_accelerator_thread_follows_the_trusted_sides_thread_count_at_each_request():
    seen = []

    class Recorder:
        def handle(self, message):
            seen.append(torch.get_num_threads())
            return message

    transport, threads = InProcessTransport(Recorder()), torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            transport.start("request").wait()
    finally:
        torch.set_num_threads(threads)
        transport.close()
    assert seen == [1, 2, 1]


class _Gate:
    """Lets an accelerator answer its k-th conv request only once the trusted side has started its
    k-th low-rank conv (or after a timeout), and notes which happened."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.lowrank_started = 0
        self.changed = threading.Condition()
        self.saw_trusted_work: list[bool] = []

    def trusted_side_starts(self) -> None:
        with self.changed:
            self.lowrank_started += 1
            self.changed.notify_all()

    def handle(self, message):
        if isinstance(message, ConvForward):
            k = len(self.saw_trusted_work)
            with self.changed:
                self.saw_trusted_work.append(self.changed.wait_for(lambda: self.lowrank_started > k, timeout=1.0))
        return self.accelerator.handle(message)


@pytest.mark.parametrize("overlap", [True, False])
def test_the_accelerator_works_while_the_trusted_side_does(monkeypatch, overlap):
    engine = LegRace(rank=2, clip=1.0, noise_multiplier=0.0, overlap=overlap)
    model = engine.convert(SmallCNN(3, 4))
    gate = _Gate(engine.boundary.transport.accelerator)
    engine.boundary.transport.accelerator = gate
    real = split_conv.lowrank_conv

    def lowrank_conv(*args, **kwargs):
        gate.trusted_side_starts()
        return real(*args, **kwargs)

    monkeypatch.setattr(split_conv, "lowrank_conv", lowrank_conv)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    engine.close()
    # overlapped: each conv request was being served while the trusted side began its low-rank
    # conv of the same layer; one at a time: the trusted side begins only after the answer
    assert len(gate.saw_trusted_work) >= 2
    assert gate.saw_trusted_work == [overlap] * len(gate.saw_trusted_work)


def _boundary_with_one_conv():
    boundary = Boundary(InProcessTransport(Accelerator()), overlap=True)
    boundary.register_conv(0, (1, 1), (1, 1), (1, 1))
    boundary.set_weight(0, torch.randn(4, 3, 3, 3))
    mechanism = GaussianMechanism(clip=None, noise_multiplier=0.0)
    return boundary, mechanism.release(torch.randn(2, 3, 5, 5))


def test_another_request_first_collects_the_one_in_flight():
    boundary, released = _boundary_with_one_conv()
    pending = boundary.conv_forward(0, released, False, (2, 4, 5, 5), wait=False)
    boundary.set_weight(0, torch.zeros(4, 3, 3, 3))  # sent only after the conv above was answered
    y, stored = pending.result()
    assert stored is None and y.abs().sum() > 0  # computed with the first weight
    assert pending.result()[0] is y  # collected once
    y0, _ = boundary.conv_forward(0, released, False, (2, 4, 5, 5))
    assert y0.abs().sum() == 0
    assert boundary.crossings == 5  # register, 2 weights, 2 convs: every reply counted once


def test_a_bad_answer_to_an_overlapped_request_is_caught_when_collected():
    boundary, released = _boundary_with_one_conv()

    class Lying(Accelerator):
        def handle(self, message):
            reply = super().handle(message)
            if isinstance(reply, ConvForwardReply):
                reply = ConvForwardReply(reply.y_res[:, :1], reply.stored)
            return reply

    boundary.transport.accelerator = Lying()
    boundary.register_conv(0, (1, 1), (1, 1), (1, 1))
    boundary.set_weight(0, torch.randn(4, 3, 3, 3))
    pending = boundary.conv_forward(0, released, False, (2, 4, 5, 5), wait=False)
    with pytest.raises(BoundaryError, match="Y_res of layer 0 with shape"):
        pending.result()
    boundary.flush()  # nothing left in flight: the boundary goes on
