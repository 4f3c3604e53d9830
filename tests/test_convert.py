import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legrace import LegRace
from legrace.trusted.compact import PackedReLU
from legrace.trusted.convert import UnsupportedModelError, batch_coupled, conv_nodes, convert, probe_conv_inputs, trace
from legrace.trusted.split_conv import SplitConv2d


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = layer

    def forward(self, x):
        return self.layer(self.conv(x))


@pytest.mark.parametrize("layer,name", [(nn.GELU(), "GELU"), (nn.LayerNorm(8), "LayerNorm"),
                                        (nn.Conv1d(4, 4, 1), "Conv1d"), (nn.Upsample(scale_factor=2), "Upsample")])
def test_unsupported_layer_is_named(layer, name):
    with pytest.raises(UnsupportedModelError, match=f"layer 'layer' \\({name}\\) is not supported"):
        LegRace(noise_multiplier=1.0).convert(Block(layer))


def test_operation_inside_a_user_layer_names_the_layer():
    class ShiftedReLU(nn.ReLU):  # a ReLU subclass with its own forward is traced through, not kept
        def forward(self, x):
            return torch.clamp(x - 0.1, min=0)

    with pytest.raises(UnsupportedModelError, match=r"operation 'sub' .*in layer 'layer' \(ShiftedReLU\)"):
        LegRace(noise_multiplier=1.0).convert(Block(ShiftedReLU()))


def test_unsupported_function_and_conv_options():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.cat([self.conv(x), x], 1)

    with pytest.raises(UnsupportedModelError, match="operation 'cat'"):
        convert(Cat())
    with pytest.raises(UnsupportedModelError, match="groups=3"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)))
    with pytest.raises(UnsupportedModelError, match="padding_mode='reflect'"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")))


def test_untraceable_model_gets_one_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedModelError, match="could not trace Branchy"):
        convert(Branchy())
    with pytest.raises(TypeError, match="expected an nn.Module"):
        trace(lambda x: x)


def test_conv_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(UnsupportedModelError, match="called more than once"):
        convert(Twice())


def test_names_and_unused_modules_are_kept():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
            self.spare = nn.Linear(5, 5)  # never called in forward
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    model = WithSpare()
    split = LegRace(noise_multiplier=1.0, clip=1.0).convert(model)
    assert split.state_dict().keys() == model.state_dict().keys()
    first, second = split.get_submodule("features.0"), split.get_submodule("features.2")
    assert isinstance(first, SplitConv2d) and isinstance(second, SplitConv2d)
    assert first.weight is model.features[0].weight
    assert split.spare is model.spare
    assert isinstance(model.features[0], nn.Conv2d)  # the user's model is not modified


def test_decomposition_points_in_forward_order_and_coupling():
    import torchvision

    gm = trace(torchvision.models.resnet18(num_classes=3))
    nodes = conv_nodes(gm)
    assert len(nodes) == 20 and nodes[0].target == "conv1"
    coupled = batch_coupled(gm, nodes)
    assert coupled[0] is False and all(coupled[1:])


class Head(nn.Module):
    """conv -> pooled features -> a dropout given by `drop` -> linear."""

    def __init__(self, drop):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        self.drop = drop

    def forward(self, x):
        return self.fc(self.drop(self, torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1)))


def _split(model):
    return LegRace(rank=2, clip=None, noise_multiplier=0, basis_dtype="float32").convert(model)


@pytest.mark.parametrize("train_at_convert", [True, False])
def test_functional_dropout_follows_train_and_eval(train_at_convert):
    torch.manual_seed(0)
    model = Head(lambda self, h: F.dropout(h, 0.5, training=self.training)).train(train_at_convert)
    split, x = _split(model), torch.randn(4, 3, 8, 8)
    split.eval()
    assert torch.equal(split(x), split(x))  # off in eval, whatever the mode at conversion
    assert torch.allclose(split(x), model.eval()(x), atol=1e-5)
    split.train()
    assert not torch.equal(split(x), split(x))  # on in training


def test_dropout_that_ignores_the_mode_is_kept_as_written():
    always = Head(lambda self, h: F.dropout(h, 0.5)).eval()  # F.dropout's training defaults to True
    split, x = _split(always), torch.randn(4, 3, 8, 8)
    assert not torch.equal(split(x), split(x)) and not torch.equal(always(x), always(x))


def test_forward_that_branches_on_the_mode_is_refused():
    model = Head(lambda self, h: torch.relu(h) if self.training else h)
    with pytest.raises(UnsupportedModelError, match="changes with train/eval mode"):
        convert(model)
    assert model.training  # the flags set for tracing are restored


@pytest.mark.parametrize("wrap,message", [
    (lambda c: torch.nn.utils.parametrizations.weight_norm(c), "parametrized weights"),
    (lambda c: torch.nn.utils.parametrizations.spectral_norm(c), "parametrized weights"),
    (lambda c: torch.nn.utils.spectral_norm(c), "not an nn.Parameter"),
    (lambda c: c.register_forward_hook(lambda m, i, o: o * 0.5) and c, "hooks"),
    (lambda c: c.register_forward_pre_hook(lambda m, i: (i[0] * 2,)) and c, "hooks"),
    (lambda c: c.register_full_backward_hook(lambda m, gi, go: None) and c, "hooks"),
])
def test_conv_the_stand_in_cannot_follow_is_refused(wrap, message):
    model = Head(lambda self, h: h)
    model.conv = wrap(model.conv)
    with pytest.raises(UnsupportedModelError, match=f"layer 'conv' .*{message}"):
        _split(model)
    x, model = torch.randn(2, 3, 8, 8), model.eval()  # eval: spectral_norm's power iteration holds still
    assert torch.equal(convert(model)(x), model(x))  # kept as is (tee_only), it runs as written


def test_hooks_the_traced_model_would_not_run_are_refused():
    model = Head(lambda self, h: h)
    model.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UnsupportedModelError, match="Head has forward or backward hooks"):
        convert(model)
    seen = []
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), nn.Flatten())
    model[0].register_forward_pre_hook(lambda m, i: seen.append(i))  # traced through: would run once, at trace
    with pytest.raises(UnsupportedModelError, match="layer '0' \\(Sequential\\) has forward or backward hooks"):
        convert(model)


def test_modes_are_kept_per_module_and_the_users_modules_left_alone():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(self.conv(x)), 1), 1))

    torch.manual_seed(0)
    model = Frozen().train()
    model.body.eval()  # a frozen BatchNorm (and its block)
    plain = copy.deepcopy(model)
    split = _split(model)
    assert [m.training for m in model.modules()] == [m.training for m in plain.modules()]
    assert split.training and split.conv.training
    assert not split.body.training and not any(m.training for m in split.body.modules())
    assert isinstance(split.get_submodule("body.2"), SplitConv2d)
    assert isinstance(split.get_submodule("body.1"), PackedReLU)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(split(x), plain(x), atol=1e-5)


def test_unused_parameters_and_buffers_are_kept_in_the_original_order():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.ones(1))  # used
            self.aux = nn.Parameter(torch.zeros(3))  # never used in forward
            self.register_buffer("steps", torch.zeros(()))  # never used in forward
            self.register_buffer("scratch", torch.zeros(2), persistent=False)  # never used, not saved
            self.register_buffer("scale", torch.ones(1), persistent=False)  # used, not saved
            self.shift = torch.zeros(1)  # a plain tensor attribute: not saved

        def forward(self, x):
            return self.conv(x) + self.scale + self.gamma + self.shift

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)  # registered first, called last
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = Block()

        def forward(self, x):
            return self.head(torch.flatten(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))

    model = Net()
    for split in (convert(model), _split(model)):
        assert list(split.state_dict()) == list(model.state_dict())
        assert [n for n, _ in split.named_parameters()] == [n for n, _ in model.named_parameters()]
        assert {n for n, _ in split.named_buffers()} >= {n for n, _ in model.named_buffers()}
        assert split.block.aux is model.block.aux and split.block.steps is model.block.steps
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(split(x), model(x), atol=1e-5)


def test_keyword_input_call_runs():
    class Keyword(Head):
        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(input=x), 1), 1))

    torch.manual_seed(0)
    model = Keyword(lambda self, h: h)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(_split(model)(x), model(x), atol=1e-5)


def test_a_split_conv_keeps_its_inputs_memory_format():
    # as nn.Conv2d does: channels_last in, channels_last out
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    engine = LegRace(rank=2, clip=None, noise_multiplier=0)
    model = engine.convert(plain)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    with engine.unaccounted():
        y = model(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, plain(x))


def test_models_tracing_would_misread_are_refused_by_layer_name():
    class StdConv(nn.Conv2d):  # a subclass's own forward would be lost behind the stand-in
        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    engine = lambda: LegRace(noise_multiplier=1.0)  # noqa: E731
    with pytest.raises(UnsupportedModelError, match="layer '0' is a .*StdConv, a subclass of Conv2d"):
        engine().convert(nn.Sequential(StdConv(3, 4, 3)))
    qat = torch.ao.nn.qat.Conv2d(3, 4, 3, qconfig=torch.ao.quantization.get_default_qat_qconfig("x86"))
    with pytest.raises(UnsupportedModelError, match="torch.ao.nn.qat.*Conv2d, a subclass of Conv2d"):
        engine().convert(nn.Sequential(qat))
    with pytest.raises(UnsupportedModelError, match="layer '0' \\(LazyConv2d\\) is not initialised yet"):
        engine().convert(nn.Sequential(nn.LazyConv2d(4, 3)))
    with pytest.raises(UnsupportedModelError, match="layer '0' has torch.bfloat16 weights"):
        engine().convert(nn.Sequential(nn.Conv2d(3, 4, 3)).bfloat16())
    split = engine().convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match="converted already"):
        engine().convert(split)
    with pytest.raises(ValueError, match="expects a floating-point input, got torch.int64"):
        split(torch.ones(2, 3, 6, 6, dtype=torch.long))


class Mixer(nn.Module):
    """Two convs with `mix` between them: an operation traced from supported pieces."""

    def __init__(self, mix):
        super().__init__()
        self.conv1, self.bn, self.conv2, self.mix = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), mix

    def forward(self, x):
        return self.conv2(self.mix(self.bn(self.conv1(x))))


@pytest.mark.parametrize("mix", [
    lambda h: h + h[0],  # every sample gets the first one's activation
    lambda h: h + h[-1],
    lambda h: h + torch.flatten(h, 0, 1)[:h.size(1)],  # the first sample's channels, through a flatten
])
def test_a_model_that_mixes_the_batch_before_a_conv_is_refused_by_that_conv(mix):
    model = Mixer(mix)
    with pytest.raises(UnsupportedModelError, match="layer 'conv2'.*mixes the batch"):
        probe_conv_inputs(model, (3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="layer 'conv2'.*mixes the batch"):
        LegRace(mode="legrace", rank=2, noise_multiplier=1.0).make_private(
            module=Mixer(mix), optimizer=None,
            data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8)), batch_size=4))


def test_the_probe_passes_per_sample_models_and_reports_map_sizes():
    model = Mixer(lambda h: F.max_pool2d(torch.relu(h), 2))
    model.train()
    running = model.bn.running_mean.clone()
    assert probe_conv_inputs(model, (3, 8, 8)) == [(8, 8), (4, 4)]  # BatchNorm passes: eval mode inside
    assert model.training and torch.equal(model.bn.running_mean, running)  # the modes and the statistics are left alone


def test_a_model_that_changes_the_batch_dimension_is_refused():
    model = Mixer(lambda h: h.reshape(-1, 2, h.size(2), h.size(3)))  # each sample's 4 channels as 2 rows of 2
    model.conv2 = nn.Conv2d(2, 4, 3)
    with pytest.raises(UnsupportedModelError, match="layer 'conv2' gets 4 rows for a batch of 2"):
        probe_conv_inputs(model, (3, 8, 8))


def test_the_probe_passes_batchnorm_without_running_stats_and_always_on_dropout():
    stat_free = Mixer(lambda h: h)
    stat_free.bn = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics even in eval mode
    assert probe_conv_inputs(stat_free, (3, 8, 8)) == [(8, 8), (8, 8)]
    assert stat_free.bn.running_mean is None and stat_free.bn.running_var is None

    dropping = Mixer(lambda h: F.dropout(h, 0.5))  # training=True whatever the mode: draws in every forward
    state = torch.random.get_rng_state()
    assert probe_conv_inputs(dropping, (3, 8, 8)) == [(8, 8), (8, 8)]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_small_cross_sample_term_is_found():
    with pytest.raises(UnsupportedModelError, match="mixes the batch"):
        probe_conv_inputs(Mixer(lambda h: h + 1e-5 * h[0]), (3, 8, 8))


def test_a_model_refused_for_mixing_the_batch_can_be_mended_and_given_to_the_same_engine():
    engine = LegRace(mode="legrace", rank=2, noise_multiplier=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8)), batch_size=4)
    with pytest.raises(UnsupportedModelError, match="mixes the batch"):
        engine.make_private(module=Mixer(lambda h: h + h[0]), optimizer=None, data_loader=loader)
    model, _, _ = engine.make_private(module=Mixer(lambda h: h), optimizer=None, data_loader=loader)
    with engine.unaccounted():
        assert model(torch.randn(4, 3, 8, 8)).shape == (4, 4, 6, 6)


@pytest.mark.parametrize("n, other", [(4, 3), (5, 4), (8, 5), (16, 9)])
def test_the_probe_on_a_larger_batch_finds_every_pair_of_samples(n, other):
    with pytest.raises(UnsupportedModelError, match="layer 'conv2'.*mixes the batch"):
        probe_conv_inputs(Mixer(lambda h: h + h[other]), (3, 8, 8), batch_size=n)
    for victim in range(n):  # sample `victim` alone reads its neighbour: found whichever pair it is
        def mix(h, victim=victim):
            return torch.cat([h[:victim], h[victim:victim + 1] + h[(victim + 1) % n], h[victim + 1:]])
        with pytest.raises(UnsupportedModelError, match="mixes the batch"):
            probe_conv_inputs(Mixer(mix), (3, 8, 8), batch_size=n)
    assert probe_conv_inputs(Mixer(lambda h: h), (3, 8, 8), batch_size=n) == [(8, 8), (8, 8)]
    with pytest.raises(ValueError, match="at least 2 samples"):
        probe_conv_inputs(Mixer(lambda h: h), (3, 8, 8), batch_size=1)


def test_the_probe_takes_infinities_that_do_not_move_as_unmoved():
    overflowing = Mixer(lambda h: torch.where(torch.arange(h.size(1)).view(1, -1, 1, 1) == 0, float("inf"), h))
    assert probe_conv_inputs(overflowing, (3, 8, 8)) == [(8, 8), (8, 8)]
    mixing = Mixer(lambda h: torch.where(torch.arange(h.size(1)).view(1, -1, 1, 1) == 0, float("inf"), h + h[0]))
    with pytest.raises(UnsupportedModelError, match="mixes the batch"):  # an infinity widens no tolerance
        probe_conv_inputs(mixing, (3, 8, 8))


def by_fours(h):
    """Per sample, but runs only on batches of a multiple of 4 rows."""
    return h.reshape(-1, 4, h.size(1), h.size(2), h.size(3)).reshape(h.shape)


@pytest.mark.parametrize("mix, refused", [
    (lambda h: h + h[3], True),  # needs 4 samples to run, then mixes
    (lambda h: by_fours(h) + 1, False),  # needs 4 samples, and keeps them apart
])
def test_a_model_that_cannot_run_on_two_samples_is_probed_at_the_loaders_batch_size(mix, refused):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8)), batch_size=8)
    for data in (loader, list(loader)):  # a DataLoader, and a list of batches (no batch_size: its first batch's)
        engine = LegRace(mode="legrace", rank=2, noise_multiplier=1.0)
        if refused:
            with pytest.raises(UnsupportedModelError, match="layer 'conv2'.*mixes the batch"):
                engine.make_private(module=Mixer(mix), optimizer=None, data_loader=data)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # checked at batch 8: no warning
                engine.make_private(module=Mixer(mix), optimizer=None, data_loader=data)

