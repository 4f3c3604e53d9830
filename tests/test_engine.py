import copy
import json
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from legrace import LegRace
from legrace.privacy.accountant import epsilon
from legrace.boundary.messages import ConvForward, SetWeight
from legrace.boundary.gateway import InProcessTransport
from legrace.trusted.convert import UnsupportedModelError
from legrace.trusted.engine import AUTO_NOISE_STD
from legrace.models import SmallCNN, build_model


def tiny_loader(n=32, batch=8, size=8, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def train_epochs(model, optimizer, loader, epochs):
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def test_opacus_shaped_api_trains_and_accounts():
    torch.manual_seed(0)
    module = SmallCNN(1, 3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    engine = LegRace(mode="legrace", rank=2, target_epsilon=4.0, target_delta=1e-5)
    model, opt, loader = engine.make_private(module=module, optimizer=optimizer, data_loader=tiny_loader(), epochs=3)
    assert opt is optimizer
    assert {id(p) for p in model.parameters()} == {id(p) for p in module.parameters()}
    # the first conv's one input channel is covered by R = 2: split exactly, it releases nothing
    assert engine.releases_per_sample == 2 and engine.batch_coupled_releases_per_sample == 2
    assert engine.get_epsilon() == 0.0  # nothing released yet
    before = [p.detach().clone() for p in module.parameters()]
    train_epochs(model, opt, loader, 1)
    eps1 = engine.get_epsilon(1e-5)
    train_epochs(model, opt, loader, 2)
    eps3 = engine.get_epsilon(1e-5)
    assert 0 < eps1 < eps3 <= 4.0 and eps3 > 3.9
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert engine.sigma == pytest.approx(AUTO_NOISE_STD)
    assert engine.clip == pytest.approx(AUTO_NOISE_STD / engine.noise_multiplier)
    # both releases follow a BatchNorm: a batch's residuals move together, sensitivity 2C*sqrt(B)
    assert engine.sensitivity == pytest.approx(2 * engine.clip * math.sqrt(engine.batch_size))
    one = epsilon(engine.noise_multiplier, [(2 * math.sqrt(engine.batch_size), 1)], 1e-5)
    assert engine.epsilon_per_release() == pytest.approx(one)
    assert one > epsilon(engine.noise_multiplier, [(2, 1)], 1e-5) and one < eps1
    # every stored residual was consumed or freed
    assert engine.boundary.transport.accelerator._stored == {}


def test_given_noise_multiplier_and_clip():
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(), epochs=1)
    assert engine.sigma == 1.5 and engine.noise_multiplier == 3.0
    assert engine.sensitivity == pytest.approx(1.0 * math.sqrt(8))  # 2C*sqrt(B): after a BatchNorm, batches of 8


def test_noise_off_means_infinite_epsilon_after_a_pass():
    engine = LegRace(rank=1, clip=None, noise_multiplier=0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    assert engine.get_epsilon() == 0.0
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    assert engine.get_epsilon() == math.inf


@pytest.mark.parametrize("mode,expected", [("lowrank_only", 0.0), ("tee_only", 0.0), ("gpu_only", math.inf)])
def test_modes_that_release_nothing(mode, expected):
    engine = LegRace(mode=mode, rank=2)
    model, opt, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    assert engine.boundary is None and engine.releases_per_sample == 0
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    assert engine.get_epsilon() == expected


def test_lowrank_only_drops_the_residual():
    torch.manual_seed(0)
    module = SmallCNN(1, 3).eval()
    x = torch.randn(4, 1, 8, 8)
    full = module(x)
    low = LegRace(mode="lowrank_only", rank=1).convert(SmallCNN(1, 3).eval())
    low.load_state_dict(module.state_dict())
    assert not torch.allclose(low(x), full, atol=1e-4)


def test_validation_passes_are_accounted_in_parallel():
    engine = LegRace(rank=1, noise_multiplier=5.0, clip=1.0)
    model, _, train = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    val = engine.private_loader(tiny_loader(seed=1), "validation")
    with torch.no_grad():
        for loader in (train, val, val):
            for x, _ in loader:
                model(x)
    assert engine.ledger.uses == {"train": 1, "validation": 2}
    # disjoint data sets: the most-used one sets epsilon
    twice = [(s, 2 * n) for s, n in engine.releases_per_use()]
    assert engine.get_epsilon() == pytest.approx(epsilon(5.0, twice, 1e-5))


def test_a_validation_loader_of_larger_batches_run_in_eval_mode_costs_no_more():
    # one global batch size once priced every use at the largest loader's batch, eval passes included
    engine = LegRace(rank=1, clip=0.5, target_epsilon=4.0)
    model, _, train = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=4),
                                          epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "epsilon will pass target_epsilon" warning either
        val = engine.private_loader(tiny_loader(batch=16, seed=1), "validation")
    with torch.no_grad():
        for x, _ in train:
            model.train()(x)
        for x, _ in val:
            model.eval()(x)  # BatchNorm with running statistics: no sample moves another
    assert engine.batch_size == 4 and engine.ledger.uses == {"train": 1, "validation": 1}
    assert engine.releases_per_use()[1][0] == 2.0 * math.sqrt(4)
    assert 3.9 < engine.get_epsilon() <= 4.0
    x, _ = next(iter(val))
    with torch.no_grad(), pytest.raises(ValueError, match="calibrated for batches of at most 4"):
        model.train()(x)  # the same batch in training mode is refused: one sample would move 16 residuals


def test_a_batchnorm_without_running_statistics_couples_the_batch_in_eval_mode_too():
    module = SmallCNN(1, 3)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, train = engine.make_private(module=module, optimizer=None, data_loader=tiny_loader(batch=4))
    with torch.no_grad(), pytest.warns(UserWarning, match="outside a pass"):
        model.eval()(torch.randn(16, 1, 8, 8))  # normalised by the batch's own statistics: one sample moves all 16
    assert engine.batch_size == 16 and engine.releases_per_use()[1][0] == 2.0 * math.sqrt(16)
    engine = LegRace(rank=1, clip=0.5, target_epsilon=4.0)
    model, _, train = engine.make_private(module=module, optimizer=None, data_loader=tiny_loader(batch=4), epochs=1)
    with torch.no_grad(), pytest.raises(ValueError, match="with BatchNorms that keep running statistics"):
        model.eval()(torch.randn(16, 1, 8, 8))


def test_batchnorm_coupling_costs_privacy():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(torch.relu(self.a(x))), 1), 1))

    class WithBN(NoBN):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(self.bn(self.a(x))), 1), 1))

    eps = {}
    for cls in (NoBN, WithBN):
        engine = LegRace(rank=1, noise_multiplier=10.0, clip=1.0)
        model, _, loader = engine.make_private(module=cls(), optimizer=None,
                                               data_loader=tiny_loader(batch=16, channels=2))
        for x, _ in loader:
            model(x)
        eps[cls] = engine.get_epsilon()
        assert engine.releases_per_sample == 2
        assert engine.batch_coupled_releases_per_sample == (1 if cls is WithBN else 0)
    assert eps[WithBN] > eps[NoBN]
    assert eps[NoBN] == pytest.approx(epsilon(10.0, [(2.0, 2)], 1e-5))
    assert eps[WithBN] == pytest.approx(epsilon(10.0, [(2.0, 1), (8.0, 1)], 1e-5))  # sqrt(16) = 4


def test_bad_arguments_have_clear_messages():
    with pytest.raises(ValueError, match="unknown mode"):
        LegRace(mode="fast")
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        LegRace(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValueError, match="exactly one of"):
        LegRace()
    with pytest.raises(ValueError, match="clip=None"):
        LegRace(clip=None, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_epsilon needs epochs"):
        LegRace(target_epsilon=1.0).make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            LegRace(noise_multiplier=1.0, accelerator="cuda")
    with pytest.raises(ValueError, match="accelerator must be"):
        LegRace(noise_multiplier=1.0, accelerator="quantum")
    with pytest.raises(ValueError, match="decomposition"):
        LegRace(noise_multiplier=1.0, decomposition="qr")
    with pytest.raises(ValueError, match="basis_dtype must be one of"):
        LegRace(noise_multiplier=1.0, basis_dtype="float16")
    for setting, value in (("power_iters", 0), ("power_iters", 1.5), ("max_rank", 0), ("noise_ahead", -1),
                           ("power_iters", True)):
        with pytest.raises(ValueError, match=f"{setting} must be an int >= "):
            LegRace(noise_multiplier=1.0, **{setting: value})


def spy_on_releases(engine):
    """Capture every residual that crosses to the accelerator."""
    seen = []
    transport = engine.boundary.transport

    class Spy(InProcessTransport):
        def request(self, message, reply_bytes=None):
            if isinstance(message, ConvForward):
                seen.append((message.layer, message.residual.tensor.clone()))
            return transport.request(message, reply_bytes)

    engine.boundary.transport = Spy(transport.accelerator)
    return seen


def test_first_release_of_a_sample_depends_only_on_that_sample():
    # DESIGN section 7 at the model level (layer 0: no BatchNorm before it)
    engine = LegRace(rank=1, clip=None, noise_multiplier=0)
    model = engine.convert(SmallCNN(3, 3))
    seen = spy_on_releases(engine)
    x = torch.randn(4, 3, 8, 8)
    y = x.clone()
    y[1:] = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model(x)
        model(y)
    first = [t for layer, t in seen if layer == 0]
    assert torch.equal(first[0][0], first[1][0]) and not torch.equal(first[0][1], first[1][1])


def test_a_weight_changed_through_data_reaches_a_remote_accelerator():
    # .data.mul_() moves no version counter; an accelerator elsewhere holds a copy of W
    torch.manual_seed(0)
    module = SmallCNN(3, 3).eval()
    engine = LegRace(rank=1, clip=None, noise_multiplier=0)
    twin = copy.deepcopy(module)
    model = engine.convert(twin)  # shares twin's Parameters
    transport = engine.boundary.transport

    class Remote(InProcessTransport):
        def request(self, message, reply_bytes=None):
            if isinstance(message, SetWeight):
                message = SetWeight(message.layer, message.weight.clone())
            return transport.request(message, reply_bytes)

    engine.boundary.transport = Remote(transport.accelerator)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), module(x))
        for m in (module, twin):
            m.features[4].weight.data.mul_(-2.0)
        torch.testing.assert_close(model(x), module(x))


def test_every_crossing_is_audited_and_residuals_are_noised(tmp_path):
    audit = tmp_path / "audit.jsonl"
    engine = LegRace(rank=2, noise_multiplier=2.0, clip=0.1, audit=audit)
    model, opt, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=torch.optim.SGD(
        SmallCNN(1, 3).parameters(), lr=0.1), data_loader=tiny_loader())
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
    engine.audit.close()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = {(line["direction"], line["kind"]) for line in lines}
    assert kinds <= {("to_accelerator", k) for k in ("RegisterConv", "SetWeight", "ConvForward", "ConvBackward",
                                                     "ResendOutput", "Free")} | {
        ("to_trusted", k) for k in ("Ack", "ConvForwardReply", "ConvBackwardReply")}
    # The conv outputs that BatchNorm needs in backward are rebuilt, with Y_res asked for again;
    # that request carries no tensor at all.
    resends = [line for line in lines if line["kind"] == "ResendOutput"]
    assert resends and all("field" not in line for line in resends)
    released = [line for line in lines if line["kind"] == "ConvForward"]
    assert len(released) == 2 * len(loader)
    # the first conv (1 channel, R = 2) is split exactly and runs wholly on the trusted side:
    # neither its residual, nor its dL/dY, nor its weight crosses
    assert {line["layer"] for line in lines} == {None, 1, 2}
    assert all(line["clip"] == 0.1 and line["sigma"] == pytest.approx(0.2) for line in released)


def test_bfloat16_wire_rounds_only_after_the_noise():
    torch.manual_seed(0)
    module, x, y = SmallCNN(1, 3), torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    crossed = []
    for wire in ("bfloat16", None):
        engine = LegRace(rank=2, noise_multiplier=1.0, clip=0.5, wire_dtype=wire, noise_seed=3)
        model = engine.convert(copy.deepcopy(module))
        seen = spy_on_releases(engine)
        F.cross_entropy(model(x), y).backward()  # the whole step works, rebuilt outputs included
        crossed.append(seen)
    assert all(t.dtype == torch.bfloat16 for _, t in crossed[0]) and len(crossed[0]) == 2
    # the same noised residual as in float32, then rounded: rounding is post-processing
    assert torch.equal(crossed[0][0][1], crossed[1][0][1].to(torch.bfloat16))
    with pytest.raises(ValueError, match="wire_dtype must be"):
        LegRace(noise_multiplier=1.0, wire_dtype="int8")


def test_a_conv_whose_channels_R_covers_runs_wholly_on_the_trusted_side(tmp_path):
    # conv a sees 3 channels (R = 2 < 3: it releases); conv b sees 2 (R covers them: X_res = 0, so a
    # release would be noise alone). b runs inside, dL/dX included, and is not accounted.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(torch.relu(self.a(x))), 1), 1))

    torch.manual_seed(0)
    plain = Net().double()
    x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    audit = tmp_path / "audit.jsonl"
    engine = LegRace(rank=2, clip=None, noise_multiplier=0.0, audit=audit)
    split = engine.convert(copy.deepcopy(plain))
    assert [m.silent for m in (split.a, split.b)] == [False, True] and "silent" in repr(split.b)
    assert engine.releases_per_sample == 1
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(split(x), y).backward()
    engine.audit.close()
    for (name, p), q in zip(plain.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)
    layers = {json.loads(line)["layer"] for line in audit.read_text().splitlines()}
    assert layers - {None} == {0}  # only conv a ever talks to the accelerator (None: replies)


def test_engine_draws_noise_inline_unless_asked_to_draw_ahead():
    inline = LegRace(noise_multiplier=1.0, accelerator="process")
    inline.convert(SmallCNN(3, 4))
    ahead = LegRace(noise_multiplier=1.0, noise_ahead=2)
    ahead.convert(SmallCNN(3, 4))
    try:
        assert inline.mechanism._pool is None and ahead.mechanism._pool is not None
        # no in-process CUDA accelerator: nothing is drawn into page-locked memory
        assert not inline.mechanism.pinned_output and not ahead.mechanism.pinned_output
        assert LegRace(noise_multiplier=1.0, pinned_memory=True).pinned_memory is False  # CPU: no effect
    finally:
        inline.close()
        ahead.close()


class SameInput(nn.Module):
    """Two convs read one activation, as a ResNet block's first conv and its downsample do."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.down = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.a(h)) + self.down(h), 1), 1))


def test_convs_that_read_one_input_release_it_once():
    torch.manual_seed(0)
    module, x, y = SameInput(), torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    engine = LegRace(rank=2, noise_multiplier=1.0, clip=0.5)
    model = engine.convert(copy.deepcopy(module))
    assert (model.a.same_as, model.down.same_as, model.a.reusers) == (None, 1, 1)
    assert engine.releases_per_sample == 2  # stem and a; down sends a's noised residual again
    seen = spy_on_releases(engine)
    F.cross_entropy(model(x), y).backward()
    residuals = dict(seen)
    assert [layer for layer, _ in seen] == [0, 1, 2] and torch.equal(residuals[1], residuals[2])
    assert not engine._config.shared  # taken by the conv that reused it
    # the same step without noise is the plain model's, gradients included
    plain, split = copy.deepcopy(module).double(), LegRace(rank=2, clip=None, noise_multiplier=0.0).convert(
        copy.deepcopy(module).double())
    F.cross_entropy(plain(x.double()), y).backward()
    F.cross_entropy(split(x.double()), y).backward()
    for (name, p), q in zip(plain.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-9, msg=name)


def test_convs_that_read_one_input_at_different_ranks_release_it_twice():
    engine = LegRace(rank=[2, 2, 3], noise_multiplier=1.0, clip=0.5)
    model = engine.convert(SameInput())
    assert model.down.same_as is None and model.a.reusers == 0 and engine.releases_per_sample == 3


def test_a_conv_that_reuses_a_release_refuses_any_other_input():
    engine = LegRace(rank=2, noise_multiplier=1.0, clip=0.5)
    model = engine.convert(SameInput())
    with pytest.raises(RuntimeError, match="a second release of it would not be accounted"):
        model.down(torch.randn(2, 6, 6, 6))
    h = torch.randn(2, 6, 6, 6)
    model.a(h)
    h.add_(1.0)  # changed in place after conv a released it
    with pytest.raises(RuntimeError, match="reads the same input as conv layer 1"):
        model.down(h)


def test_three_convs_that_read_one_input_release_it_once():
    class Three(SameInput):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(6, 4, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.a(h) + self.down(h) + self.c(h), 1), 1))

    engine = LegRace(rank=2, noise_multiplier=1.0, clip=0.5)
    model = engine.convert(Three())
    assert (model.a.reusers, model.down.same_as, model.c.same_as, engine.releases_per_sample) == (2, 1, 1, 2)
    seen = spy_on_releases(engine)
    for _ in range(2):  # the entry is kept for both reusers, then dropped, each step
        F.cross_entropy(model(torch.randn(4, 3, 6, 6)), torch.randint(0, 3, (4,))).backward()
        assert not engine._config.shared
    residuals = dict(seen[-4:])
    assert torch.equal(residuals[1], residuals[2]) and torch.equal(residuals[1], residuals[3])


def test_inference_mode_and_no_grad_keep_nothing_on_the_accelerator():
    torch.manual_seed(0)
    module = build_model("resnet18", num_classes=3, in_channels=3, image_size=16).eval()
    engine = LegRace(rank=2, clip=None, noise_multiplier=0)
    model = engine.convert(module)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():  # its tensors keep no version counter (Lightning validates so)
        torch.testing.assert_close(model(x), expected)
    # no backward will come: the accelerator was never asked to keep a residual
    assert engine.boundary.transport.accelerator._stored == {}


def test_a_map_no_larger_than_the_rank_is_split_exactly_and_releases_nothing():
    # a deep layer of a small image: A = X, V = I, X_res = 0, so a release would be noise alone
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8 * 4, 3))
    plain = copy.deepcopy(model)
    engine = LegRace(rank=4, clip=0.1, noise_multiplier=1.0)
    split = engine.convert(model)
    seen = spy_on_releases(engine)
    x, y = torch.randn(3, 16, 2, 2), torch.randint(0, 3, (3,))
    F.cross_entropy(split(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    assert seen == []  # 4 pixels, R = 4: nothing crossed
    for a, b in zip(split.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():
        split.get_submodule("0")(torch.randn(3, 16, 2, 3))  # 6 pixels > R: released
    assert len(seen) == 1


def test_autocast_runs_the_trusted_side_in_float32():
    torch.manual_seed(0)
    module, x, y = SmallCNN(3, 3), torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    plain = copy.deepcopy(module)
    model = LegRace(rank=2, clip=None, noise_multiplier=0).convert(module)
    for net in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, atol=0.1, rtol=0.1)  # the plain model's convs round to bf16


def test_releases_outside_a_private_loader_are_accounted_as_the_worst_case():
    import warnings

    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside a pass: accounted, no warning
        with torch.no_grad():
            for x, _ in loader:
                model(x)
    assert engine.ledger.uses == {"train": 1}
    one_pass = engine.get_epsilon()
    x = next(iter(loader.loader))[0]
    with torch.no_grad(), pytest.warns(UserWarning, match="outside a pass over a private loader"):
        for _ in range(3):  # the same data fed to the model directly: each forward one more use
            model(x)
    assert engine.ledger.uses["outside a private loader"] == 3
    # they may have been the training samples: 1 pass + 3 forwards = 4 uses of them
    assert engine.ledger.max_uses == 4 and engine.get_epsilon() == pytest.approx(engine.epsilon_of_uses(4))
    assert engine.get_epsilon() > one_pass
    with torch.no_grad(), engine.unaccounted():  # declared not private (synthetic, an attack's own data)
        model(torch.zeros_like(x))
    assert engine.ledger.uses["outside a private loader"] == 3


def test_unaccounted_covers_only_the_thread_that_opened_it():
    # a benchmark's synthetic forward on one thread once left another thread's private forward,
    # at the same time, unaccounted
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    x = next(iter(loader.loader))[0]
    inside, leave = threading.Event(), threading.Event()

    def synthetic():
        with engine.unaccounted():
            inside.set()
            leave.wait(30)

    other = threading.Thread(target=synthetic)
    other.start()
    try:
        assert inside.wait(30)
        with torch.no_grad(), pytest.warns(UserWarning, match="outside a pass over a private loader"):
            model(x)  # private data, on this thread, while the other's block is open
    finally:
        leave.set()
        other.join()
    assert engine.ledger.uses.get("outside a private loader") == 1


def test_threads_forwarding_through_one_engine_at_once_each_get_their_own_split():
    # a serving pool: two threads between a conv that keeps its split for a later conv (a ResNet
    # block's downsample) and that conv; the second thread's split once replaced the first's
    torch.manual_seed(0)
    module = SameInput().double()
    engine = LegRace(rank=2, clip=None, noise_multiplier=0.0, overlap=True)  # noise off: exact outputs
    model = engine.convert(copy.deepcopy(module))
    assert model.down.same_as == 1
    xs = [torch.randn(2, 3, 6, 6, dtype=torch.float64) for _ in range(4)]
    both_split = threading.Barrier(2, timeout=30)

    def wait_for_the_other(module, args, output):  # returns None: the output stands
        both_split.wait()

    model.a.register_forward_hook(wait_for_the_other)
    outs, errors = {}, []

    def serve(i):
        try:
            with torch.no_grad():
                outs[i] = model(xs[i])
        except BaseException as err:  # reported below, not lost in the thread
            errors.append(err)
            both_split.abort()

    for pair in ((0, 1), (2, 3)):
        threads = [threading.Thread(target=serve, args=(i,)) for i in pair]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forwards outside a loader: accounted, and warned of
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert not errors, errors
    for i, x in enumerate(xs):
        torch.testing.assert_close(outs[i], module(x), rtol=1e-9, atol=1e-9)
    assert not engine._config.shared
    assert engine.ledger.uses["outside a private loader"] == 4  # each forward one use


def test_make_private_plans_map_sizes_and_refuses_an_input_that_would_release_unaccounted():
    # SmallCNN on 8x8: its convs see 8x8, 4x4 and 2x2 maps; R = 4 covers the last (and layer 0's channel)
    engine = LegRace(rank=4, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    assert engine.releases_per_sample == 1 and engine.batch_coupled_releases_per_sample == 1
    seen = spy_on_releases(engine)
    with torch.no_grad():
        for x, _ in loader:
            model(x)
        assert {layer for layer, _ in seen} == {1}
        with pytest.raises(RuntimeError, match="planned to release nothing"):
            model(torch.randn(2, 1, 16, 16))  # layer 2 would see 4x4 = 16 > R pixels


def test_a_copy_of_the_split_model_shares_its_engine_and_never_replays_noise():
    # EMA and torch.optim.swa_utils.AveragedModel deep-copy the model
    torch.manual_seed(0)
    module, x, y = SmallCNN(3, 3), torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    engine = LegRace(rank=2, clip=1.0, noise_multiplier=1.0)
    model = engine.convert(module)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    copy_conv, conv = averaged.module.get_submodule("features.4"), model.get_submodule("features.4")
    assert copy_conv.config is conv.config and copy_conv.weight is not conv.weight
    seen = spy_on_releases(engine)
    with engine.unaccounted():
        F.cross_entropy(averaged(x), y).backward()
        F.cross_entropy(model(x), y).backward()
    first = [t for layer, t in seen if layer == 1]
    assert len(first) == 2 and not torch.equal(first[0], first[1])  # the same input, fresh noise each time


@pytest.mark.parametrize("verify", [False, True])
def test_a_teacher_copy_running_between_forward_and_backward_leaves_the_gradients_exact(verify):
    # the mean-teacher pattern: student forward, teacher (a deep copy with other weights) forward, student backward
    torch.manual_seed(0)
    net, x, y = SmallCNN(3, 3), torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    F.cross_entropy(net(x), y).backward()
    engine = LegRace(rank=1, clip=None, noise_multiplier=0, verify=verify)
    student = engine.convert(copy.deepcopy(net))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    with engine.unaccounted():
        loss = F.cross_entropy(student(x), y)
        with torch.no_grad():
            teacher(x)  # the accelerator now holds the teacher's weights
        loss.backward()
    for a, b in zip(student.parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_one_engine_wraps_one_model():
    # a second make_private would keep the first calibration's noise for another number of epochs
    engine = LegRace(rank=1, target_epsilon=2.0)
    with pytest.raises(ValueError, match="not initialised yet"):  # a refused model leaves the engine free
        engine.make_private(module=nn.Sequential(nn.LazyConv2d(4, 3)), optimizer=None, data_loader=tiny_loader(),
                            epochs=1)
    model = SmallCNN(1, 3)
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=tiny_loader(), epochs=1)
    with pytest.raises(ValueError, match="already wraps a model"):
        engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(), epochs=20)
    with pytest.raises(ValueError, match="already wraps a model"):
        engine.convert(SmallCNN(1, 3))


def test_a_checkpoint_resumes_only_at_the_noise_it_was_spent_with():
    trained = LegRace(rank=1, noise_multiplier=0.8)
    model, _, loader = trained.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    for x, _ in loader:
        model(x)
    state = trained.state_dict()
    for other in (LegRace(rank=1, noise_multiplier=3.0), LegRace(rank=1, noise_multiplier=0.8, clip=1.0),
                  LegRace(rank=1, target_epsilon=8.0)):
        with pytest.raises(ValueError, match="noise_multiplier=0.8"):
            other.load_state_dict(state)
    same = LegRace(rank=1, noise_multiplier=0.8)  # before make_private, as `legrace train --resume` does
    same.load_state_dict(state)
    same.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    assert same.get_epsilon() == pytest.approx(trained.get_epsilon())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_map_sizes_are_planned_in_the_models_own_dtype(dtype):
    # the last conv sees 2x2 maps, which R = 4 covers: it releases nothing and is not accounted
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten()).to(dtype)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8, dtype=dtype), torch.randint(0, 2, (8,))), batch_size=4)
    engine = LegRace(rank=4, target_epsilon=4.0)
    engine.make_private(module=net, optimizer=None, data_loader=data, epochs=5)
    assert engine.releases_per_sample == 1


def test_forwards_beyond_one_per_yielded_sample_during_a_pass_are_charged_as_uses():
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    other = next(iter(tiny_loader(seed=1)))[0]
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):  # 4 batches
            model(x)
            if i == 1:
                with pytest.warns(UserWarning, match="more samples' residuals than"):
                    model(x)  # the same batch again (train accuracy, a second view): one more use
            if i == 2:
                model.eval()
                model(other[:5])  # other data in the middle of the pass: one more use, whatever it is
                model.train()
    assert engine.ledger.uses == {"train": 1, "outside a private loader": 2} and engine.ledger.max_uses == 3
    with torch.no_grad():
        for x, _ in loader:  # an ordinary pass again: nothing extra
            model(x[:4])
            model(x[4:])  # micro-batches of one yielded batch are one use
    assert engine.ledger.uses == {"train": 2, "outside a private loader": 2}
    it = iter(loader)
    x, _ = next(it)  # a pass left open must not make later forwards free
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert engine.ledger.uses == {"train": 3, "outside a private loader": 4}


@pytest.mark.parametrize("sampler", ["replacement", "more", "weighted"])
def test_a_loader_that_repeats_samples_within_a_pass_is_refused(sampler):
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    ds = tiny_loader().dataset
    pick = {"replacement": RandomSampler(ds, replacement=True), "more": RandomSampler(ds, num_samples=4 * len(ds)),
            "weighted": WeightedRandomSampler(torch.ones(len(ds)), len(ds))}[sampler]
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    with pytest.raises(ValueError, match="repeats samples|with replacement"):
        engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=DataLoader(ds, batch_size=8, sampler=pick))


class Stream(torch.utils.data.IterableDataset):
    """tiny_loader's samples as an iterable-style data set (no length, no indexing)."""

    def __iter__(self):
        return iter(tiny_loader().dataset)


def test_an_iterable_dataset_read_by_several_workers_is_refused():
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    with pytest.raises(ValueError, match="several workers"):
        engine.make_private(module=SmallCNN(1, 3), optimizer=None,
                            data_loader=DataLoader(Stream(), batch_size=8, num_workers=2))


def test_a_batch_larger_than_accounted_after_a_batchnorm_is_priced_or_refused():
    prebatched = DataLoader([(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))], batch_size=1,
                            collate_fn=lambda b: b[0])  # declares batches of 1, yields 8 samples at once
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=prebatched)
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    assert engine.batch_size == 8  # the coupled release is priced at the batch that crossed
    assert engine.releases_per_use()[1][0] == 2.0 * math.sqrt(8)

    engine = LegRace(rank=1, clip=0.5, target_epsilon=8.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=4),
                                           epochs=1)
    seen = spy_on_releases(engine)
    with torch.no_grad(), pytest.raises(ValueError, match="calibrated for batches of at most 4"):
        model(torch.randn(16, 1, 8, 8))  # one sample would move 16 released residuals
    assert not seen  # the release after the BatchNorm never crossed (layer 0, one channel at R = 1, releases nothing)
    with torch.no_grad():
        model.eval()(torch.randn(16, 1, 8, 8))  # in eval mode BatchNorm couples nothing


def test_uses_spent_at_a_higher_price_are_not_taken_over_cheaper(tmp_path):
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=16))
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    state = engine.state_dict()
    smaller = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    smaller.load_state_dict(state)  # the checkpoint's batch size comes with it: its uses stay priced at 16
    smaller.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=4))
    assert smaller.batch_size == 16 and smaller.get_epsilon() == pytest.approx(engine.get_epsilon())
    other = LegRace(rank=4, clip=0.5, noise_multiplier=3.0)  # R = 4 covers a point: one release fewer per use
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="less: make the engine with the same model, rank and batch size"):
        other.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=16))
        next(iter(other.private_loader(tiny_loader(batch=16), "train")))
    same = LegRace(rank=1, clip=0.5, noise_multiplier=3.0, ledger_path=tmp_path / "ledger.json")
    same.load_state_dict(state)
    model, _, loader = same.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=16))
    next(iter(loader))  # the same pricing: resumes
    assert same.ledger.uses == {"train": 2}
    from_file = LegRace(rank=1, clip=0.5, noise_multiplier=3.0, ledger_path=tmp_path / "ledger.json")
    from_file.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader(batch=4))
    with pytest.raises(ValueError, match="less"):  # a ledger file carries its pricing too
        next(iter(from_file.private_loader(tiny_loader(batch=4), "train")))


def test_misused_settings_are_refused_with_a_message():
    with pytest.raises(ValueError, match="unknown accountant"):
        LegRace(rank=1, clip=0.5, noise_multiplier=3.0, accountant="foo")
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    for delta in (1.5, -1, 0):
        with pytest.raises(ValueError, match="delta must be a number in"):
            engine.get_epsilon(delta)
    with pytest.raises(ValueError, match="epochs must be an int"):
        LegRace(rank=1, target_epsilon=8.0).make_private(module=SmallCNN(1, 3), optimizer=None,
                                                         data_loader=tiny_loader(), epochs=2.5)
    with pytest.raises(ValueError, match="calibrates its noise in make_private"):
        LegRace(rank=1, target_epsilon=8.0).convert(SmallCNN(1, 3))


class FirstSampleMixer(nn.Module):
    """Adds the batch's first sample to every sample before its second conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 3, 3)

    def forward(self, x):
        h = self.conv1(x)
        return self.conv2(h + h[0])


def test_a_loader_over_an_iterable_dataset_has_the_model_checked_on_its_first_batch():
    # its samples show only by iterating (peeking could use up a stream): checked when the first batch comes
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the check is not skipped, only deferred
        model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None,
                                               data_loader=DataLoader(Stream(), batch_size=8))
        with torch.no_grad():
            for x, _ in loader:
                model(x)
        # a map-style data set shows its samples: checked at make_private, no warning either
        LegRace(rank=1, clip=0.5, noise_multiplier=3.0).make_private(module=SmallCNN(1, 3), optimizer=None,
                                                                     data_loader=tiny_loader())
    assert engine.get_epsilon() > 0

    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    model, _, loader = engine.make_private(module=FirstSampleMixer(), optimizer=None,
                                           data_loader=DataLoader(Stream(), batch_size=8))
    seen = spy_on_releases(engine)
    x = next(iter(DataLoader(Stream(), batch_size=8)))[0]
    with pytest.raises(ValueError, match="not yet checked for mixing.*Iterate the private loader first"):
        model(x)  # private data outside the loader, before its first batch: nothing crosses unchecked
    refused = "layer 'conv2'.*mixes the batch.*first batch of a loader whose samples show only by iterating"
    with pytest.raises(UnsupportedModelError, match=refused + ".*new LegRace engine"):
        next(iter(loader))
    for _ in range(2):  # the refusal stays: a second pass, and a forward outside, are refused alike
        with pytest.raises(UnsupportedModelError, match=refused):
            for x, _ in loader:
                model(x)
        with pytest.raises(UnsupportedModelError, match=refused):
            model(x)
    assert not seen and engine.get_epsilon() == 0  # refused before a pass was accounted or anything released
    with engine.unaccounted():
        model(torch.randn(2, 1, 8, 8))  # data that is not private may still run (nothing to account)
    assert seen


def test_a_model_refused_before_its_conversion_leaves_no_check_pending():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent control flow: fx cannot trace

    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    with pytest.raises(UnsupportedModelError, match="could not trace"):
        engine.make_private(module=Untraceable(), optimizer=None, data_loader=DataLoader(Stream(), batch_size=8))
    model, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None, data_loader=tiny_loader())
    with torch.no_grad():
        for x, _ in loader:  # the mended model, with a map-style loader: checked at make_private, nothing pending
            model(x)
    assert engine.get_epsilon() > 0

    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    with pytest.raises(UnsupportedModelError, match="could not trace"):
        engine.make_private(module=Untraceable(), optimizer=None, data_loader=DataLoader(Stream(), batch_size=8))
    model = engine.convert(SmallCNN(1, 3))  # no loader at all: its forwards are charged as outside ones
    with torch.no_grad(), pytest.warns(UserWarning, match="outside a pass over a private loader"):
        model(torch.randn(4, 1, 8, 8))


class VectorStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.randn(5), 0)] * 8)


def test_samples_the_model_cannot_take_are_warned_of_at_the_users_call():
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    with pytest.warns(UserWarning, match="not checked that the model keeps samples apart") as caught:
        engine.make_private(module=SmallCNN(1, 3), optimizer=None,
                            data_loader=DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 5)), batch_size=4))
    assert [w.filename for w in caught if "keeps samples apart" in str(w.message)] == [__file__]
    engine = LegRace(rank=1, clip=0.5, noise_multiplier=3.0)
    _, _, loader = engine.make_private(module=SmallCNN(1, 3), optimizer=None,
                                       data_loader=DataLoader(VectorStream(), batch_size=4))
    with pytest.warns(UserWarning, match="not checked that the model keeps samples apart") as caught:
        next(iter(loader))  # checked on the first batch, and warned of there
    assert [w.filename for w in caught if "keeps samples apart" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        next(iter(loader))


class Records(torch.utils.data.Dataset):
    """tiny_loader's samples as dicts, as Hugging Face data sets give them."""

    def __init__(self):
        self.x, self.y = tiny_loader().dataset.tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def test_a_loader_of_dicts_shows_its_input_shape_by_its_one_image_tensor():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked: no warning
        LegRace(rank=1, clip=0.5, noise_multiplier=3.0).make_private(
            module=SmallCNN(1, 3), optimizer=None, data_loader=DataLoader(Records(), batch_size=8))
        batches = list(DataLoader(Records(), batch_size=8))  # a list of batches of dicts
        LegRace(rank=1, clip=0.5, noise_multiplier=3.0).make_private(module=SmallCNN(1, 3), optimizer=None,
                                                                     data_loader=batches)
