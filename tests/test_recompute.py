"""Conv outputs are rebuilt in backward, not kept (legrace.trusted.recompute): same gradients, far less memory."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legrace import LegRace
from legrace.models import build_model
from legrace.trusted.recompute import ConvOutputs


def activation_bytes(tensors, model) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def run(model, x, y, **kw):
    """Gradients of one step and the bytes of activations kept for backward."""
    engine = LegRace(rank=4, clip=None, noise_multiplier=0, **kw)
    net = engine.convert(copy.deepcopy(model)).train()
    kept = []
    if engine._config.outputs is not None:
        engine._config.outputs.observer = kept.append
        F.cross_entropy(net(x), y).backward()
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            F.cross_entropy(net(x), y).backward()
    return [p.grad for p in net.parameters()], activation_bytes(kept, net), engine


@pytest.mark.parametrize("mode", ["legrace", "dp_only", "lowrank_only"])
def test_rebuilt_outputs_give_the_same_gradients_and_keep_far_less(mode):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, image_size=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    rebuilt, kept, _ = run(model, x, y, mode=mode)
    plain, kept_plain, engine = run(model, x, y, mode=mode, rebuild_outputs=False)
    assert engine._config.outputs is None
    for a, b in zip(rebuilt, plain):  # the same bits: Y is rebuilt in the order it was built
        assert torch.equal(a, b)
    assert 0 < kept * 4 < kept_plain


def test_an_output_changed_in_place_is_kept_not_rebuilt():
    outputs = ConvOutputs()
    bn = nn.BatchNorm2d(3)
    outputs.install(bn)
    calls = []
    y = torch.randn(2, 3, 4, 4, requires_grad=True) * 1.0
    y_ref = y.detach().clone()

    def rebuild():
        calls.append(1)
        return y_ref

    # offered and unchanged: BatchNorm saves a token, and backward rebuilds
    outputs._enter(bn, ())
    outputs.offer(y, rebuild)
    out = bn(y)
    outputs._exit(bn, (), out)
    out.sum().backward()
    assert calls == [1]
    # offered, then changed in place: it is kept as usual, never rebuilt
    y2 = torch.randn(2, 3, 4, 4, requires_grad=True) * 1.0
    outputs._enter(bn, ())
    outputs.offer(y2, rebuild)
    y2.mul_(2.0)
    out = bn(y2)
    outputs._exit(bn, (), out)
    out.sum().backward()
    assert calls == [1] and not outputs._offers


def test_a_weight_changed_before_backward_is_a_clear_error():
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, in_channels=1, image_size=8)
    engine = LegRace(rank=2, clip=None, noise_multiplier=0)
    net = engine.convert(model)
    loss = F.cross_entropy(net(torch.randn(2, 1, 8, 8)), torch.randint(0, 3, (2,)))
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        loss.backward()


def test_a_memory_budget_keeps_the_outputs_costliest_to_rebuild():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, image_size=32)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    rebuilt_grads, rebuilt_bytes, _ = run(model, x, y, mode="legrace")

    offers = {}  # point -> (bytes, rebuild cost per element) of what the first step offered
    probe = LegRace(rank=4, clip=None, noise_multiplier=0, keep_outputs_mb=1e-9)
    net = probe.convert(copy.deepcopy(model)).train()
    outputs = probe._config.outputs
    offer = outputs.offer

    def noting_offer(y, rebuild, point, cost):
        offers[point] = (y.numel() * y.element_size(), cost)
        offer(y, rebuild, point, cost)

    outputs.offer = noting_offer
    F.cross_entropy(net(x), y).backward()
    # every conv output feeds a BatchNorm, so every offer is saved
    costliest = sorted(offers, key=lambda p: -offers[p][1])[:3]
    assert all(offers[p][1] > 1000 for p in costliest)  # layer4's 3x3 convs: forming W' dominates
    budget = sum(offers[p][0] for p in costliest)

    engine = LegRace(rank=4, clip=None, noise_multiplier=0, keep_outputs_mb=budget / 2**20)
    net = engine.convert(copy.deepcopy(model)).train()
    outputs = engine._config.outputs
    for step in range(2):  # the first step has no plan yet and rebuilds all; the second keeps
        kept = []
        outputs.observer = kept.append
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        assert activation_bytes(kept, net) == rebuilt_bytes + (budget if step else 0)
        assert outputs.planned == frozenset(costliest)
    for a, b in zip(rebuilt_grads, [p.grad for p in net.parameters()]):
        assert torch.equal(a, b)
    with torch.no_grad():  # a forward that saves nothing leaves the plan alone
        net.eval()(x)
    assert outputs.planned == frozenset(costliest)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "8", True])
def test_a_bad_output_budget_is_refused(bad):
    with pytest.raises(ValueError, match="keep_outputs_mb must be a finite number"):
        LegRace(rank=4, clip=None, noise_multiplier=0, keep_outputs_mb=bad)


def test_a_bias_changed_before_backward_is_a_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 64, 3))
    net = LegRace(rank=2, clip=None, noise_multiplier=0).convert(model)
    loss = F.cross_entropy(net(torch.randn(2, 3, 8, 8)), torch.randint(0, 3, (2,)))
    with torch.no_grad():
        model[0].bias.add_(1.0)  # BatchNorm's backward would read a Y made with the new bias
    with pytest.raises(RuntimeError, match="weight or bias of conv layer 0 changed"):
        loss.backward()
