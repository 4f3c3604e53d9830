"""The untrusted accelerator's role: the heavy linear work on what it was sent, nothing more.

It holds conv weights and the noised residuals it received (kept until the matching backward),
never a data set, a label, X_main, A or V. It answers the requests of `legrace.boundary.messages`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.grad import conv2d_input, conv2d_weight

from legrace.precision import full_float32
from legrace.boundary.messages import (
    Ack,
    ConvBackward,
    ConvBackwardReply,
    ConvForward,
    ConvForwardReply,
    Free,
    Message,
    RegisterConv,
    ResendOutput,
    SetWeight,
)


class AcceleratorError(RuntimeError):
    """A request the accelerator cannot serve (unknown layer or stored residual)."""


@dataclass
class _Conv:
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    weight: Tensor | None = None


def local_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device of this machine; ValueError if it is not one."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"accelerator must be 'cpu', a torch device such as 'cuda', 'process[:DEVICE]' or 'tcp://HOST:PORT' "
            f"(got {device!r})"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("accelerator 'cuda' was asked for but this machine has no usable CUDA GPU")
    return device


class Accelerator:
    """Serves conv forward, dL/dX and the residual's weight-gradient part on `device`.

    pinned: move requests and answers through page-locked host memory (DMA at full bus speed,
    instead of the driver staging each pageable copy through a small buffer). Default: on for
    CUDA (what it saves per step: docs/performance.md)."""

    def __init__(self, device: str | torch.device = "cpu", pinned: bool | None = None) -> None:
        self.device = local_device(device)
        self.pinned = (pinned is None or pinned) and self.device.type == "cuda"
        self._convs: dict[int, _Conv] = {}
        self._stored: dict[int, Tensor] = {}
        self._ids = itertools.count()

    def handle(self, message: Message) -> Message:
        if isinstance(message, RegisterConv):
            self._convs[message.layer] = _Conv(message.stride, message.padding, message.dilation)
            return Ack()
        if isinstance(message, SetWeight):
            self._conv(message.layer, weighted=False).weight = message.weight.to(self.device)
            return Ack()
        if isinstance(message, ConvForward):
            with full_float32(self.device):
                return self._forward(message)
        if isinstance(message, ConvBackward):
            with full_float32(self.device):
                return self._backward(message)
        if isinstance(message, ResendOutput):
            with full_float32(self.device):
                return self._resend(message)
        if isinstance(message, Free):
            for i in message.stored:
                self._stored.pop(i, None)
            return Ack()
        raise AcceleratorError(f"unknown request {type(message).__name__}")

    def _conv(self, layer: int, weighted: bool = True) -> _Conv:
        if layer not in self._convs:
            raise AcceleratorError(f"layer {layer} was never registered")
        if weighted and self._convs[layer].weight is None:
            raise AcceleratorError(f"layer {layer} has no weight yet")
        return self._convs[layer]

    def _forward(self, m: ConvForward) -> ConvForwardReply:
        conv = self._conv(m.layer)
        x = self._to_device(m.residual.tensor)  # kept as sent (e.g. bfloat16: half the memory)
        y = self._conv_of(conv, x, m.full_answer)
        stored = None
        if m.keep:  # only once the conv succeeded: a refused request leaves nothing behind
            stored = next(self._ids)
            self._stored[stored] = x
        return ConvForwardReply(y, stored)

    def _to_device(self, t: Tensor) -> Tensor:
        if not self.pinned:
            return t.to(self.device)
        if t.is_pinned():  # a noised residual drawn into pinned memory (GaussianMechanism.pinned_output)
            return t.to(self.device, non_blocking=True)
        # via a pinned buffer: faster than a copy straight from pageable memory, even counting the
        # copy into it; the buffer returns to torch's cache once the copy is done
        return t.pin_memory().to(self.device, non_blocking=True)

    def _to_host(self, t: Tensor) -> Tensor:
        if not self.pinned:
            return t.to("cpu")
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # from torch's caching host allocator
        host.copy_(t, non_blocking=True)
        # A blocking-sync event: this thread sleeps until the copy is done. A stream sync would
        # spin (CUDA's default with fewer contexts than cores) on a core the trusted side uses.
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()
        return host

    def _conv_of(self, conv: _Conv, x: Tensor, full: bool = False) -> Tensor:
        """conv(x, W) computed in W's dtype, answered in the dtype x was sent in (in W's with `full`)."""
        y = F.conv2d(x.to(conv.weight.dtype), conv.weight, None, conv.stride, conv.padding, conv.dilation)
        return self._to_host(y if full else y.to(x.dtype))

    def _resend(self, m: ResendOutput) -> ConvForwardReply:
        conv = self._conv(m.layer)
        x = self._stored.get(m.stored)
        if x is None:
            raise AcceleratorError(f"no stored residual {m.stored} for layer {m.layer}")
        return ConvForwardReply(self._conv_of(conv, x, m.full_answer), None)

    def _backward(self, m: ConvBackward) -> ConvBackwardReply:
        conv = self._conv(m.layer)
        gy = self._to_device(m.grad_y)
        x = self._stored.pop(m.stored, None) if m.stored is not None else None
        if m.need_grad_w and x is None:
            raise AcceleratorError(f"no stored residual {m.stored} for layer {m.layer}")
        gx = gw = None
        if m.need_grad_x:
            gx = self._to_host(conv2d_input(m.x_shape, conv.weight, gy, conv.stride, conv.padding, conv.dilation))
        if m.need_grad_w:
            gw = conv2d_weight(x.to(gy.dtype), conv.weight.shape, gy, conv.stride, conv.padding, conv.dilation)
            gw = self._to_host(gw)
        return ConvBackwardReply(gx, gw)
