"""The trust boundary: every message that may cross between the trusted side and the accelerator.

Read this file to audit legrace's privacy claim. The trusted side (the TEE) reaches the untrusted
accelerator only through `Boundary`, and `Boundary` sends only the message types defined here.

Trusted -> untrusted (what the adversary may see):
  RegisterConv   a conv layer's stride, padding and dilation (architecture, public).
  SetWeight      a conv weight W (visible to the adversary in the paper's threat model).
  ConvForward    a NoisedResidual: clip(X_res, C) + N(0, sigma^2 I). The only activation that
                 ever crosses; only `legrace.mechanism` makes one. Accounted (DESIGN section 3).
  ConvBackward   dL/dY of a conv, as in the paper's mode: outside the formal guarantee, its
                 leakage is measured with gradient-inversion attacks (DESIGN section 3).
  Free           ids of stored residuals that no backward pass will use.

Untrusted -> trusted (checked for shape, dtype and finiteness before use):
  ConvForwardReply   Y_res = conv(X_res~, W)
  ConvBackwardReply  dL/dX = conv_transpose(dL/dY, W) and dW_res = X_res~ (*) dL/dY

Never crosses: raw inputs, labels, X_main, A, V, X_res before noise, BatchNorm statistics,
losses, the noise generator's state. `legrace.audit` can log every crossing to prove it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Protocol, Union

import torch
from torch import Tensor

Shape = tuple[int, ...]


class BoundaryError(RuntimeError):
    """The accelerator's answer cannot be used (wrong shape/dtype, NaN/inf, unknown reply)."""


@dataclass(frozen=True)
class NoisedResidual:
    """clip(X_res, clip) + N(0, sigma^2 I), per sample. Made only by GaussianMechanism.release."""

    tensor: Tensor
    clip: Optional[float]
    sigma: float


# ---- trusted -> untrusted -------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterConv:
    layer: int
    stride: Shape
    padding: Shape
    dilation: Shape


@dataclass(frozen=True)
class SetWeight:
    layer: int
    weight: Tensor


@dataclass(frozen=True)
class ConvForward:
    layer: int
    residual: NoisedResidual
    keep: bool  # keep X_res~ on the accelerator for this layer's weight gradient


@dataclass(frozen=True)
class ConvBackward:
    layer: int
    stored: Optional[int]  # id of the kept X_res~, or None when no weight gradient is wanted
    grad_y: Tensor
    x_shape: Shape  # shape of the conv input (that of the residual already sent)
    need_grad_x: bool
    need_grad_w: bool


@dataclass(frozen=True)
class Free:
    stored: tuple[int, ...]


# ---- untrusted -> trusted -------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class ConvForwardReply:
    y_res: Tensor
    stored: Optional[int]


@dataclass(frozen=True)
class ConvBackwardReply:
    grad_x: Optional[Tensor]
    grad_w: Optional[Tensor]


TO_ACCELERATOR = (RegisterConv, SetWeight, ConvForward, ConvBackward, Free)
TO_TRUSTED = (Ack, ConvForwardReply, ConvBackwardReply)
Message = Union[RegisterConv, SetWeight, ConvForward, ConvBackward, Free, Ack, ConvForwardReply, ConvBackwardReply]


class Transport(Protocol):
    """Carries one request to the accelerator and brings back its reply."""

    def request(self, message: Message) -> Message: ...


class InProcessTransport:
    """Both roles in one process (development, tests): the accelerator is a plain object."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    def request(self, message: Message) -> Message:
        return self.accelerator.handle(message)


class AuditLog:
    """One JSON line per crossing: direction, message kind, layer, field, shape, dtype, l2 norm."""

    def __init__(self, path: Union[str, Path, IO[str]]) -> None:
        self._file = open(path, "w") if isinstance(path, (str, Path)) else path

    def record(self, direction: str, message: Message) -> None:
        base = {"direction": direction, "kind": type(message).__name__, "layer": getattr(message, "layer", None)}
        tensors = _tensor_fields(message)
        for field, t in tensors:
            line = dict(base, field=field, shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                        norm=float(t.detach().double().norm()))
            if field == "residual.tensor":
                line.update(clip=message.residual.clip, sigma=message.residual.sigma)
            self._file.write(json.dumps(line) + "\n")
        if not tensors:
            self._file.write(json.dumps(base) + "\n")

    def close(self) -> None:
        self._file.close()


def _tensor_fields(message: Message) -> list[tuple[str, Tensor]]:
    out = []
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, NoisedResidual):
            out.append((f"{f.name}.tensor", value.tensor))
        elif isinstance(value, Tensor):
            out.append((f.name, value))
    return out


class Stored:
    """A residual kept on the accelerator for backward; freed there when no longer reachable."""

    __slots__ = ("id", "_boundary", "__weakref__")

    def __init__(self, id: int, boundary: "Boundary") -> None:
        self.id = id
        self._boundary = boundary

    def take(self) -> int:
        """Hand the id to a backward pass, which frees it on the accelerator."""
        boundary, self._boundary = self._boundary, None
        if boundary is None:
            raise BoundaryError("this residual was already used by a backward pass (retain_graph is not supported)")
        return self.id

    def __del__(self) -> None:
        if self._boundary is not None:
            self._boundary._pending_free.append(self.id)


class Boundary:
    """The trusted side's only door to the accelerator: sends allowed messages, checks replies."""

    def __init__(self, transport: Transport, audit: Optional[AuditLog] = None) -> None:
        self.transport = transport
        self.audit = audit
        self.crossings = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.seconds_waiting = 0.0
        self._pending_free: list[int] = []

    def _send(self, message: Message) -> Message:
        if not isinstance(message, TO_ACCELERATOR):
            raise TypeError(f"{type(message).__name__} may not cross to the accelerator")
        if self._pending_free and not isinstance(message, Free):
            ids, self._pending_free = tuple(self._pending_free), []
            self._send(Free(ids))
        if self.audit:
            self.audit.record("to_accelerator", message)
        t0 = time.perf_counter()
        reply = self.transport.request(message)
        self.seconds_waiting += time.perf_counter() - t0
        if not isinstance(reply, TO_TRUSTED):
            raise BoundaryError(f"the accelerator answered {type(message).__name__} with {type(reply).__name__}")
        if self.audit:
            self.audit.record("to_trusted", reply)
        self.crossings += 1
        self.bytes_out += sum(t.numel() * t.element_size() for _, t in _tensor_fields(message))
        self.bytes_in += sum(t.numel() * t.element_size() for _, t in _tensor_fields(reply))
        return reply

    def register_conv(self, layer: int, stride: Shape, padding: Shape, dilation: Shape) -> None:
        self._expect(self._send(RegisterConv(layer, stride, padding, dilation)), Ack, "RegisterConv")

    def set_weight(self, layer: int, weight: Tensor) -> None:
        self._expect(self._send(SetWeight(layer, weight.detach())), Ack, "SetWeight")

    def conv_forward(
        self, layer: int, residual: NoisedResidual, keep: bool, out_shape: Shape
    ) -> tuple[Tensor, Optional[Stored]]:
        if not isinstance(residual, NoisedResidual):
            raise TypeError("only a NoisedResidual made by the Gaussian mechanism may cross")
        reply = self._expect(self._send(ConvForward(layer, residual, keep)), ConvForwardReply, "ConvForward")
        y = _checked(reply.y_res, out_shape, residual.tensor.dtype, f"Y_res of layer {layer}")
        if keep and reply.stored is None:
            raise BoundaryError(f"the accelerator did not keep the residual of layer {layer} for backward")
        return y, Stored(reply.stored, self) if keep else None

    def conv_backward(
        self, layer: int, stored: Optional[Stored], grad_y: Tensor, x_shape: Shape, w_shape: Shape,
        need_grad_x: bool, need_grad_w: bool,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        sid = stored.take() if stored is not None else None
        msg = ConvBackward(layer, sid, grad_y.contiguous(), tuple(x_shape), need_grad_x, need_grad_w and sid is not None)
        reply = self._expect(self._send(msg), ConvBackwardReply, "ConvBackward")
        gx = _checked(reply.grad_x, x_shape, grad_y.dtype, f"dL/dX of layer {layer}") if need_grad_x else None
        gw = _checked(reply.grad_w, w_shape, grad_y.dtype, f"dW_res of layer {layer}") if msg.need_grad_w else None
        return gx, gw

    def flush(self) -> None:
        """Free residuals whose backward pass will never come (e.g. after an evaluation)."""
        if self._pending_free:
            ids, self._pending_free = tuple(self._pending_free), []
            self._send(Free(ids))

    @staticmethod
    def _expect(reply: Message, kind: type, request: str):
        if not isinstance(reply, kind):
            raise BoundaryError(f"the accelerator answered {request} with {type(reply).__name__}, not {kind.__name__}")
        return reply


def _checked(t: object, shape: Shape, dtype: torch.dtype, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise BoundaryError(f"the accelerator sent {type(t).__name__} for {what}, not a tensor")
    if tuple(t.shape) != tuple(shape):
        raise BoundaryError(f"the accelerator sent {what} with shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise BoundaryError(f"the accelerator sent {what} as {t.dtype}, expected {dtype}")
    if not torch.isfinite(t).all():
        raise BoundaryError(f"the accelerator sent {what} with NaN or inf values")
    return t
