"""Tests for legrace.models: shapes, data adaptation, errors and converter compatibility."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from legrace.models import (
    BUILTIN_MODELS,
    TORCHVISION_MODELS,
    ModelError,
    SmallCNN,
    build_model,
    model_names,
)

NUM_CLASSES = 7
SUPPORTED_LEAVES = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
)
SUPPORTED_FUNCTIONS = {torch.flatten, operator.add, operator.iadd}


@functools.lru_cache(maxsize=None)
def _model(name: str, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build once per configuration (VGG construction takes ~1 s); callers must not mutate."""
    torch.manual_seed(0)
    model = build_model(
        name, num_classes=NUM_CLASSES, in_channels=in_channels, image_size=image_size
    )
    return model.eval()


@functools.lru_cache(maxsize=None)
def _torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES).state_dict()


def _forward(model: nn.Module, batch: int, channels: int, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, channels, size, size))


def test_model_names() -> None:
    names = model_names()
    assert names == list(BUILTIN_MODELS) + list(TORCHVISION_MODELS)
    assert len(set(names)) == len(names)
    assert "cnn" in names and "resnet50" in names and "vgg19_bn" in names


@pytest.mark.parametrize("name", model_names())
def test_output_shape_32(name: str) -> None:
    assert _forward(_model(name), 2, 3, 32).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", model_names())
def test_traceable_and_supported_layers(name: str) -> None:
    model = _model(name)
    leaves = [m for m in model.modules() if not list(m.children())]
    bad = sorted({type(m).__name__ for m in leaves if not isinstance(m, SUPPORTED_LEAVES)})
    assert not bad, f"{name} has unsupported layers: {bad}"
    for m in leaves:
        if isinstance(m, nn.Conv2d):
            assert m.groups == 1 and m.padding_mode == "zeros"

    traced = torch.fx.symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(traced.get_submodule(node.target), SUPPORTED_LEAVES)
        elif node.op in ("call_function", "call_method"):
            assert node.target in SUPPORTED_FUNCTIONS, f"{name}: {node.op} {node.target}"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_cnn_on_8x8_single_channel_digits() -> None:
    model = _model("cnn", in_channels=1, image_size=8)
    assert isinstance(model, SmallCNN)
    assert model.features[0].in_channels == 1
    assert _forward(model, 3, 1, 8).shape == (3, NUM_CLASSES)


def test_cnn_train_step_runs() -> None:
    model = SmallCNN(1, 4, width=8)
    logits = model(torch.randn(4, 1, 8, 8))
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_in_channels_1_small(name: str) -> None:
    model = _model(name, in_channels=1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert _forward(model, 2, 1, 32).shape == (2, NUM_CLASSES)


def test_in_channels_keeps_first_conv_hyperparameters() -> None:
    vgg = _model("vgg11", in_channels=1)
    ref = _model("vgg11").features[0]  # the unmodified 3-channel torchvision conv
    conv = vgg.features[0]
    hyper = (conv.kernel_size, conv.stride, conv.padding)
    assert hyper == (ref.kernel_size, ref.stride, ref.padding)
    assert conv.bias is not None and conv.out_channels == ref.out_channels

    resnet = _model("resnet18", in_channels=1, image_size=224)  # construction only: fast
    conv = resnet.conv1
    assert conv.in_channels == 1 and conv.out_channels == 64
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert conv.bias is None


def test_cifar_stems_for_small_images() -> None:
    resnet = _model("resnet18")
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.conv1.padding == (1, 1) and resnet.conv1.bias is None
    assert isinstance(resnet.maxpool, nn.Identity)

    vgg = _model("vgg16_bn")
    assert isinstance(vgg.avgpool, nn.AdaptiveAvgPool2d) and vgg.avgpool.output_size == 1
    assert isinstance(vgg.classifier, nn.Linear)
    assert (vgg.classifier.in_features, vgg.classifier.out_features) == (512, NUM_CLASSES)
    assert not any(isinstance(m, nn.Dropout) for m in vgg.modules())


def test_imagenet_architecture_for_large_images() -> None:
    # Construction only (fast); the 224x224 forward passes are in the slow test below.
    resnet = _model("resnet18", image_size=224)
    assert resnet.conv1.kernel_size == (7, 7) and resnet.conv1.stride == (2, 2)
    assert isinstance(resnet.maxpool, nn.MaxPool2d)

    vgg = _model("vgg11", image_size=224)
    assert vgg.avgpool.output_size == (7, 7)
    assert isinstance(vgg.classifier, nn.Sequential)
    assert any(isinstance(m, nn.Dropout) for m in vgg.classifier)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_output_shape_224(name: str) -> None:
    assert _forward(_model(name, image_size=224), 1, 3, 224).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize(
    ("name", "image_size"),
    [("resnet18", 224), ("vgg11", 224), ("resnet18", 32), ("vgg11", 32)],
)
def test_parameter_names_match_torchvision(name: str, image_size: int) -> None:
    ours = _model(name, image_size=image_size).state_dict()
    ref = _torchvision_state_dict(name)
    if name.startswith("vgg") and image_size <= 64:
        # Only the head is replaced: classifier.0 -> classifier (single Linear).
        ref = {k: v for k, v in ref.items() if not k.startswith("classifier.")}
        ours = {k: v for k, v in ours.items() if not k.startswith("classifier")}
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours if k != "conv1.weight")


def test_minimum_sizes_that_work() -> None:
    assert _forward(_model("resnet18", image_size=8), 1, 3, 8).shape == (1, NUM_CLASSES)
    assert _forward(_model("cnn", image_size=4), 1, 3, 4).shape == (1, NUM_CLASSES)


def test_unknown_name_raises() -> None:
    with pytest.raises(ModelError, match="unknown model 'alexnet'") as info:
        build_model("alexnet", num_classes=10)
    assert all(n in str(info.value) for n in model_names())
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "image_size", "minimum"),
    [("vgg16", 8, 32), ("vgg11", 16, 32), ("resnet18", 4, 8), ("resnet50", 4, 8), ("cnn", 2, 4)],
)
def test_too_small_image_raises(name: str, image_size: int, minimum: int) -> None:
    with pytest.raises(ModelError) as info:
        build_model(name, num_classes=10, image_size=image_size)
    message = str(info.value)
    assert name in message and str(image_size) in message and f">= {minimum}" in message
    assert "\n" not in message


def test_invalid_counts_raise() -> None:
    with pytest.raises(ModelError, match="num_classes"):
        build_model("cnn", num_classes=0)
    with pytest.raises(ModelError, match="in_channels"):
        build_model("cnn", num_classes=10, in_channels=0)
