"""Model zoo: standard CNNs restricted to the layers legrace's converter understands.

Every model here uses only Conv2d (groups=1, zero padding), Linear, BatchNorm2d, ReLU,
MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, Identity, residual additions and flatten,
and traces with ``torch.fx.symbolic_trace``. Torchvision models are built without
pretrained weights (no network) and adapted to the data: input channels and, for small
images, the usual CIFAR-style stem/head so 32x32 inputs are not downsampled to nothing.
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

TORCHVISION_MODELS = (
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
)
BUILTIN_MODELS = ("cnn",)

# Inputs up to this size get the CIFAR-style stem (ResNet) / head (VGG).
SMALL_IMAGE_MAX = 64


class ModelError(ValueError):
    """Unknown model name or a model/input combination that cannot work."""


class SmallCNN(nn.Module):
    """Three Conv3x3-BN-ReLU blocks (width, 2*width, 4*width) for quick CPU runs.

    MaxPool2d(2) follows the first two blocks, so inputs down to 4x4 (e.g. 8x8 digits) work;
    global average pooling makes the head independent of the image size.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def model_names() -> list[str]:
    """All names accepted by :func:`build_model`."""
    return list(BUILTIN_MODELS + TORCHVISION_MODELS)


def _min_image_size(name: str, small: bool) -> int:
    """Smallest input side that still leaves >= 1 pixel after all strided layers."""
    if name == "cnn":
        return 4  # two MaxPool2d(2)
    if name.startswith("vgg"):
        return 32  # five MaxPool2d(2)
    return 8 if small else 32  # ResNet: x8 with the CIFAR stem, x32 with the ImageNet one


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh conv with ``conv``'s hyper-parameters but ``in_channels`` inputs."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # Same init torchvision applies to ResNet/VGG convs, so replaced layers match the rest.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _adapt_resnet(model: nn.Module, in_channels: int, small: bool) -> None:
    if small:
        # CIFAR stem: 3x3 stride-1 conv and no max-pool, so 32x32 keeps 4x4 maps at the end.
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        _init_conv(model.conv1)
    elif in_channels != 3:
        model.conv1 = _init_conv(_conv_like(model.conv1, in_channels))


def _adapt_vgg(model: nn.Module, in_channels: int, num_classes: int, small: bool) -> None:
    if in_channels != 3:
        model.features[0] = _init_conv(_conv_like(model.features[0], in_channels))
    if small:
        # CIFAR VGG head: features end at 1x1x512, a single dropout-free Linear classifies.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
        nn.init.normal_(model.classifier.weight, 0, 0.01)
        nn.init.zeros_(model.classifier.bias)


def build_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build ``name`` (see :func:`model_names`) untrained, sized for the data.

    ``image_size`` is the input side in pixels; up to 64 px ResNets get the CIFAR stem and
    VGGs the CIFAR head, larger inputs keep torchvision's ImageNet architecture.
    Raises :class:`ModelError` for unknown names or inputs too small for the model.
    """
    name = name.strip().lower()
    if name not in model_names():
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value < 1:
            raise ModelError(f"{arg} must be >= 1, got {value}")
    small = image_size <= SMALL_IMAGE_MAX
    minimum = _min_image_size(name, small)
    if image_size < minimum:
        raise ModelError(
            f"model {name!r} needs image_size >= {minimum}, got {image_size}"
        )

    if name == "cnn":
        return SmallCNN(in_channels, num_classes)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if name.startswith("resnet"):
        _adapt_resnet(model, in_channels, small)
    else:
        _adapt_vgg(model, in_channels, num_classes, small)
    return model


def fails_on_one_sample(model: nn.Module, in_channels: int, image_size: int) -> bool:
    """Whether training steps on batches of one sample would fail: a BatchNorm on 1x1 maps sees
    one value per channel. Found by a forward of a copy on zeros, so callers can refuse such a run
    before it writes or releases anything."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(torch.zeros(1, in_channels, image_size, image_size))
    except ValueError as err:
        if "more than 1 value per channel" not in str(err):
            raise
        return True
    return False
