"""The trusted side's end of the boundary: `Boundary` sends only the messages of
`legrace.boundary.messages` over a `Transport`, and checks every answer before the trusted side
uses it (shape, dtype, finiteness; with a verifier, a Freivalds check)."""

from __future__ import annotations

import math
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Protocol, Union

import torch
from torch import Tensor

from legrace.boundary.audit import AuditLog, tensor_fields
from legrace.boundary.messages import (TO_ACCELERATOR, TO_TRUSTED, Ack, BoundaryError, ConvBackward, ConvBackwardReply, ConvForward,
                                       ConvForwardReply, Free, Message, NoisedResidual, Refused, RegisterConv,
                                       ResendOutput, SetWeight, Shape, printable, reply_bytes)


class Transport(Protocol):
    """Carries one request to the accelerator and brings back its reply (`close` is optional).

    `reply_bytes` (see the function of that name) is the most the answer can take: a transport
    that reads frames refuses a longer one before allocating it.

    A transport may also offer `start(message, reply_bytes)`, which sends a request and returns
    at once with a handle whose `wait()` brings the reply: the trusted side then works while the accelerator
    does (`Boundary(overlap=True)`). Transports without it are used one request at a time.
    """

    def request(self, message: Message, reply_bytes: Optional[int] = None) -> Message: ...


class InProcessTransport:
    """Both roles in one process (development, tests): the accelerator is a plain object.
    `start` runs it on a thread of its own, so that a GPU works while the trusted side does."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self._thread: Optional[ThreadPoolExecutor] = None

    def request(self, message: Message, reply_bytes: Optional[int] = None) -> Message:
        return self.accelerator.handle(message)

    def start(self, message: Message, reply_bytes: Optional[int] = None):
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="legrace-accelerator")
            weakref.finalize(self, self._thread.shutdown, wait=False)
        future = self._thread.submit(_handle_with_threads, self.accelerator.handle, message, torch.get_num_threads())
        return _FutureHandle(future)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None


def _handle_with_threads(handle, message: Message, threads: int) -> Message:
    """handle(message) with as many OpenMP threads as the trusted side runs when it sends it: a new
    thread starts with OpenMP's default team, and a CPU conv's sums split over another count round
    otherwise (overlapped training would then differ from one request at a time)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return handle(message)


class _FutureHandle:
    def __init__(self, future) -> None:
        self.future = future

    def wait(self) -> Message:
        return self.future.result()


class _Ready:
    """The handle of a request that was answered when it was sent (a transport without `start`)."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply

    def wait(self) -> Message:
        return self.reply



class Stored:
    """A residual kept on the accelerator for backward; freed there when no longer reachable.

    With verification on, the trusted side keeps its own copy of the released residual (`residual`)
    to check the accelerator's weight gradient.
    """

    __slots__ = ("id", "residual", "dtype", "_boundary", "__weakref__")

    def __init__(self, id: int, boundary: "Boundary", residual: Optional[Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.id = id
        self.residual = residual
        self.dtype = dtype  # the dtype a resent Y_res comes back in (that of the first answer)
        self._boundary = boundary

    @property
    def taken(self) -> bool:
        return self._boundary is None

    def take(self) -> int:
        """Hand the id to a backward pass, which frees it on the accelerator."""
        boundary, self._boundary = self._boundary, None
        if boundary is None:
            raise BoundaryError("this residual was already used by a backward pass (retain_graph is not supported)")
        return self.id

    def __del__(self) -> None:
        if self._boundary is not None:
            self._boundary._pending_free.append(self.id)


class Pending:
    """A request on its way to the accelerator: `result()` waits for its checked answer (once)."""

    def __init__(self, finish: Callable[[], Any]) -> None:
        self._finish, self._done, self._value = finish, False, None

    def result(self) -> Any:
        if not self._done:
            self._value, self._done = self._finish(), True
        return self._value


class _Flight:
    """One request the transport carries: its reply is fetched once, however many ask for it."""

    def __init__(self, boundary: "Boundary", message: Message, handle) -> None:
        self.boundary, self.message, self.handle = boundary, message, handle
        self._reply: Optional[Message] = None
        self._error: Optional[BaseException] = None

    def reply(self) -> Message:
        if self._error is not None:
            raise self._error
        if self._reply is None:
            b = self.boundary
            t0 = time.perf_counter()
            try:
                reply = self.handle.wait()
                if not isinstance(reply, TO_TRUSTED):
                    raise BoundaryError(f"the accelerator answered {type(self.message).__name__} with "
                                        f"{type(reply).__name__}")
            except BaseException as err:
                self._error = err
                raise
            finally:
                b.seconds_waiting += time.perf_counter() - t0
                if b._inflight is self:
                    b._inflight = None
            if b.audit:
                b.audit.record("to_trusted", reply)
            b.crossings += 1
            b.bytes_in += sum(t.numel() * t.element_size() for _, t in tensor_fields(reply))
            self._reply = reply
        return self._reply


class Boundary:
    """The trusted side's only door to the accelerator: sends allowed messages, checks replies.

    `verifier` (a `legrace.trusted.freivalds.FreivaldsVerifier`) also checks that each answer is the
    computation that was asked for; the boundary then remembers each layer's conv settings and
    the weight it last sent.

    `overlap`: conv requests made with wait=False return at once (when the transport can `start`
    a request), so the trusted side computes its own part while the accelerator computes its
    part. One request is in flight at a time: any other request first collects its answer.
    `seconds_waiting` counts only the time the trusted side is blocked on the accelerator.
    """

    def __init__(self, transport: Transport, audit: Optional[AuditLog] = None, verifier=None,
                 overlap: bool = False) -> None:
        self.transport = transport
        self.audit = audit
        self.verifier = verifier
        self.overlap = overlap
        self.crossings = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.seconds_waiting = 0.0
        self._pending_free: list[int] = []
        self._inflight: Optional[_Flight] = None
        self._convs: dict[int, tuple[Shape, Shape, Shape]] = {}
        self._weights: dict[int, Tensor] = {}  # per layer, the weight the accelerator holds (no copy)

    def _send(self, message: Message) -> Message:
        """A request answered by an Ack (or a Refused): a header and no tensor."""
        return self._start(message, wait=True, reply_limit=reply_bytes()).reply()

    def _start(self, message: Message, wait: bool, reply_limit: int) -> _Flight:
        if not isinstance(message, TO_ACCELERATOR):
            raise TypeError(f"{type(message).__name__} may not cross to the accelerator")
        if self._inflight is not None:
            self._inflight.reply()
        if self._pending_free and not isinstance(message, Free):
            ids, self._pending_free = tuple(self._pending_free), []
            self._expect(self._send(Free(ids)), Ack, "Free")
        if self.audit:
            self.audit.record("to_accelerator", message)
        self.bytes_out += sum(t.numel() * t.element_size() for _, t in tensor_fields(message))
        start = getattr(self.transport, "start", None) if self.overlap and not wait else None
        t0 = time.perf_counter()
        try:
            handle = (start(message, reply_bytes=reply_limit) if start is not None
                      else _Ready(self.transport.request(message, reply_bytes=reply_limit)))
        finally:
            self.seconds_waiting += time.perf_counter() - t0
        self._inflight = _Flight(self, message, handle)
        return self._inflight

    def register_conv(self, layer: int, stride: Shape, padding: Shape, dilation: Shape) -> None:
        self._expect(self._send(RegisterConv(layer, stride, padding, dilation)), Ack, f"RegisterConv of layer {layer}")
        self._convs[layer] = (tuple(stride), tuple(padding), tuple(dilation))

    def set_weight(self, layer: int, weight: Tensor) -> None:
        weight = weight.detach()
        self._expect(self._send(SetWeight(layer, weight)), Ack, f"SetWeight of layer {layer}")
        # The Parameter's storage, not a copy: it only changes in place after backward (an optimizer
        # step), and the next forward sends it again. The verifier checks answers against it.
        self._weights[layer] = weight

    def conv_forward(
        self, layer: int, residual: NoisedResidual, keep: bool, out_shape: Shape, *, wait: bool = True
    ) -> Union[tuple[Tensor, Optional[Stored]], Pending]:
        """Y_res = conv(X_res~, W) and, with keep, the handle of the residual kept for backward.
        wait=False: a Pending whose result() is that pair (see `overlap`)."""
        if not isinstance(residual, NoisedResidual):
            raise TypeError("only a NoisedResidual made by the Gaussian mechanism may cross")
        request = f"ConvForward of layer {layer}"
        full = self._full_answer(layer, residual.tensor.dtype)
        dtype = self._weights[layer].dtype if full else residual.tensor.dtype
        flight = self._start(ConvForward(layer, residual, keep, full), wait, reply_bytes((out_shape, dtype)))

        def finish() -> tuple[Tensor, Optional[Stored]]:
            reply = self._expect(flight.reply(), ConvForwardReply, request)
            y = checked_tensor(reply.y_res, out_shape, dtype, f"Y_res of layer {layer}")
            if keep and reply.stored is None:
                raise BoundaryError(f"the accelerator did not keep the residual of layer {layer} for backward")
            if self.verifier is not None:
                self.verifier.conv_forward(layer, residual.tensor, self._weights[layer], y, *self._convs[layer])
            if not keep:
                return y, None
            return y, Stored(reply.stored, self, residual.tensor if self.verifier is not None else None, dtype)

        return finish() if wait else Pending(finish)

    def _full_answer(self, layer: int, sent: torch.dtype) -> bool:
        """Ask for Y_res in the weight's dtype when a check must see more than the wire's rounding:
        under verification, a residual sent in a smaller dtype (bfloat16)."""
        held = self._weights.get(layer)
        return self.verifier is not None and held is not None and held.dtype.itemsize > sent.itemsize

    def hold_weight(self, layer: int, weight: Tensor) -> None:
        """Before a backward request: send `weight` again if the accelerator holds another for
        this layer (a deep copy of the model, an EMA teacher, ran a forward since)."""
        held = self._weights.get(layer)
        if held is None or held.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr() \
                or held.shape != weight.shape:
            self.set_weight(layer, weight)

    def resend_output(self, layer: int, stored: Stored, out_shape: Shape, *,
                      wait: bool = True) -> Union[Tensor, Pending]:
        """Y_res of a residual the accelerator still holds, again (for recomputing Y in backward)."""
        if stored.taken:
            raise BoundaryError(f"the residual of layer {layer} was already used by its backward pass")
        request = f"ResendOutput of layer {layer}"
        full = stored.residual is not None and stored.dtype != stored.residual.dtype
        flight = self._start(ResendOutput(layer, stored.id, full), wait, reply_bytes((out_shape, stored.dtype)))

        def finish() -> Tensor:
            reply = self._expect(flight.reply(), ConvForwardReply, request)
            y = checked_tensor(reply.y_res, out_shape, stored.dtype, f"the resent Y_res of layer {layer}")
            if self.verifier is not None:
                self.verifier.conv_forward(layer, stored.residual, self._weights[layer], y, *self._convs[layer])
            return y

        return finish() if wait else Pending(finish)

    def conv_backward(
        self, layer: int, stored: Optional[Stored], grad_y: Tensor, x_shape: Shape, w_shape: Shape,
        need_grad_x: bool, need_grad_w: bool, *, wait: bool = True,
    ) -> Union[tuple[Optional[Tensor], Optional[Tensor]], Pending]:
        """dL/dX and the residual's part of dL/dW (None where not asked for)."""
        residual = stored.residual if stored is not None else None
        sid = stored.take() if stored is not None else None
        msg = ConvBackward(layer, sid, grad_y.contiguous(), tuple(x_shape), need_grad_x, need_grad_w and sid is not None)
        flight = self._start(msg, wait, reply_bytes((x_shape, grad_y.dtype), (w_shape, grad_y.dtype)))

        def finish() -> tuple[Optional[Tensor], Optional[Tensor]]:
            reply = self._expect(flight.reply(), ConvBackwardReply, f"ConvBackward of layer {layer}")
            gx = checked_tensor(reply.grad_x, x_shape, grad_y.dtype, f"dL/dX of layer {layer}") if need_grad_x else None
            gw = checked_tensor(reply.grad_w, w_shape, grad_y.dtype, f"dW_res of layer {layer}") if msg.need_grad_w else None
            if self.verifier is not None:
                conv = self._convs[layer]
                if gx is not None:
                    self.verifier.grad_input(layer, msg.grad_y, self._weights[layer], gx, *conv)
                if gw is not None:
                    self.verifier.grad_weight(layer, residual, msg.grad_y, gw, *conv)
            return gx, gw

        return finish() if wait else Pending(finish)

    def flush(self) -> None:
        """Free residuals whose backward pass will never come (e.g. after an evaluation)."""
        if self._inflight is not None:
            self._inflight.reply()
        if self._pending_free:
            ids, self._pending_free = tuple(self._pending_free), []
            self._expect(self._send(Free(ids)), Ack, "Free")

    def close(self) -> None:
        """Hang up on the accelerator (for a worker process: it exits)."""
        self._inflight = None
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    @staticmethod
    def _expect(reply: Message, kind: type, request: str):
        if isinstance(reply, Refused):
            raise BoundaryError(f"the accelerator refused {request}: {printable(reply.reason)}")
        if not isinstance(reply, kind):
            raise BoundaryError(f"the accelerator answered {request} with {type(reply).__name__}, not {kind.__name__}")
        return reply


def checked_tensor(t: object, shape: Shape, dtype: torch.dtype, what: str) -> Tensor:
    """t, a tensor of the accelerator's reply, if it has the shape and dtype asked for and only
    finite values; otherwise a BoundaryError naming `what`."""
    if not isinstance(t, Tensor):
        raise BoundaryError(f"the accelerator sent {type(t).__name__} for {what}, not a tensor")
    if tuple(t.shape) != tuple(shape):
        raise BoundaryError(f"the accelerator sent {what} with shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise BoundaryError(f"the accelerator sent {what} as {t.dtype}, expected {dtype}")
    # One reduction instead of isfinite().all() (three passes): any NaN or inf makes the sum
    # non-finite; a finite tensor whose sum overflows float range is garbage as well.
    if not math.isfinite(float(t.sum())):
        raise BoundaryError(f"the accelerator sent {what} with NaN or inf values")
    return t


