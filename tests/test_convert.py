import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legrace import LegRace
from legrace.convert import UnsupportedModelError, batch_coupled, conv_nodes, convert, trace
from legrace.split_conv import SplitConv2d


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
