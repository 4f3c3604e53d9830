"""Record what the accelerator sees in a real run: the input of every attack.

`BoundaryTap` replaces the `Transport` of an engine's `Boundary` with a recorder that copies each
tensor handed to the accelerator and passes the message on unchanged:
  inputs   ConvForward's noised residual (the only activation that crosses),
  grad_y   ConvBackward's dL/dY,
  weights  SetWeight's weight.
So an attack works on exactly what crossed, not on a re-computation of what should have crossed.
`ActivationTap` records the same three for a plain model (gpu_only), where the accelerator holds
the raw conv inputs. Tensors are copied when they cross: later in-place updates (an optimizer
step on the weights) cannot change what was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from legrace.boundary.messages import ConvBackward, ConvForward, Message, SetWeight
from legrace.trusted.convert import conv_modules

KINDS = ("inputs", "grad_y", "weights")


@dataclass
class AcceleratorView:
    """Per decomposition point, the tensors the accelerator received, in the order they came."""

    inputs: dict[int, list[Tensor]] = field(default_factory=dict)
    grad_y: dict[int, list[Tensor]] = field(default_factory=dict)
    weights: dict[int, list[Tensor]] = field(default_factory=dict)

    def add(self, kind: str, layer: int, tensor: Tensor) -> None:
        getattr(self, kind).setdefault(layer, []).append(tensor.detach().to("cpu", copy=True))

    def stacked(self, kind: str, layer: int) -> Tensor:
        """Everything of `kind` at `layer`, batches concatenated along the sample axis."""
        seen = getattr(self, kind).get(layer)
        if not seen:
            raise KeyError(f"nothing of kind {kind!r} crossed at layer {layer}")
        return torch.cat(seen)

    def clear(self) -> None:
        for kind in KINDS:
            getattr(self, kind).clear()


class BoundaryTap:
    """A Transport that records what crosses, then forwards to the transport it replaced.

    Use as a context manager around the run: `with BoundaryTap(engine.boundary) as tap: ...`.
    `layers` limits the recording to some decomposition points (None: all); `kinds` to some of
    inputs / grad_y / weights.
    """

    def __init__(self, boundary, layers: Optional[Iterable[int]] = None, kinds: Iterable[str] = KINDS) -> None:
        if boundary is None:
            raise ValueError("this mode has no boundary: nothing crosses to the accelerator")
        self.boundary = boundary
        self.layers = None if layers is None else set(layers)
        self.kinds = set(kinds)
        self.view = AcceleratorView()
        self._inner = None

    def __enter__(self) -> "BoundaryTap":
        self._inner = self.boundary.transport
        self.boundary.transport = self
        return self

    def __exit__(self, *exc) -> None:
        if self.boundary.transport is self:
            self.boundary.transport = self._inner

    def _wanted(self, kind: str, layer: int) -> bool:
        return kind in self.kinds and (self.layers is None or layer in self.layers)

    def request(self, message: Message, reply_bytes: Optional[int] = None) -> Message:
        if isinstance(message, ConvForward) and self._wanted("inputs", message.layer):
            self.view.add("inputs", message.layer, message.residual.tensor)
        elif isinstance(message, ConvBackward) and self._wanted("grad_y", message.layer):
            self.view.add("grad_y", message.layer, message.grad_y)
        elif isinstance(message, SetWeight) and self._wanted("weights", message.layer):
            self.view.add("weights", message.layer, message.weight)
        return self._inner.request(message, reply_bytes)


class ActivationTap:
    """What a plain accelerator holds when the whole model runs on it (gpu_only): each conv's raw
    input, its dL/dY and its weight (at every forward), with the same layer numbers as
    the decomposition points."""

    def __init__(self, model: nn.Module, layers: Optional[Iterable[int]] = None, kinds: Iterable[str] = KINDS) -> None:
        self.model = model
        self.convs = conv_modules(model)
        self.layers = None if layers is None else set(layers)
        self.kinds = set(kinds)
        self.view = AcceleratorView()
        self._handles: list = []

    def _wanted(self, kind: str, layer: int) -> bool:
        return kind in self.kinds and (self.layers is None or layer in self.layers)

    def __enter__(self) -> "ActivationTap":
        for layer, conv in enumerate(self.convs):
            self._handles.append(conv.register_forward_pre_hook(self._pre_hook(layer)))
            self._handles.append(conv.register_forward_hook(self._post_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, layer: int):
        def hook(module: nn.Conv2d, args):
            if self._wanted("weights", layer):  # at every forward, as legrace's SetWeight
                self.view.add("weights", layer, module.weight)
            if self._wanted("inputs", layer):
                self.view.add("inputs", layer, args[0])
        return hook

    def _post_hook(self, layer: int):
        def hook(module: nn.Conv2d, args, output: Tensor):
            if self._wanted("grad_y", layer) and output.requires_grad:
                output.register_hook(lambda g: self.view.add("grad_y", layer, g))
        return hook
