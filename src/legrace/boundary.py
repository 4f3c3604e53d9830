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
  ResendOutput   the id of a stored residual whose Y_res the trusted side wants again in
                 backward (it keeps no conv outputs; see legrace.recompute). Carries no data:
                 the reply is the same post-processing of an already released residual.
                 (Both may ask for Y_res in the weight's dtype: `full_answer`, a flag.)
  Free           ids of stored residuals that no backward pass will use.

Untrusted -> trusted (checked for shape, dtype and finiteness before use; with verify=True also
by a Freivalds check, `legrace.freivalds`):
  Ack                nothing to return.
  ConvForwardReply   Y_res = conv(X_res~, W) (also the answer to ResendOutput)
  ConvBackwardReply  dL/dX = conv_transpose(dL/dY, W) and dW_res = X_res~ (*) dL/dY
  Refused            the accelerator could not serve a request; the reason, as text.

Between processes the messages travel in the wire format defined at the end of this file
(`encode`, `decode`): a JSON header and raw tensor bytes, validated field by field. Never pickle.

Never crosses: raw inputs, labels, X_main, A, V, X_res before noise, BatchNorm statistics,
losses, the noise generator's state. `AuditLog` can log every crossing to prove it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Optional, Protocol, Union

import torch
from torch import Tensor

Shape = tuple[int, ...]


class BoundaryError(RuntimeError):
    """A message cannot be used: wrong shape/dtype, NaN/inf, garbage bytes, a lost or refused
    connection, or an answer that fails the integrity check."""


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
    # answer Y_res in the weight's dtype, not the residual's (a bfloat16 wire under verification:
    # a bfloat16 answer is only checkable to bfloat16's rounding, about 3% of its scale)
    full_answer: bool = False


@dataclass(frozen=True)
class ConvBackward:
    layer: int
    stored: Optional[int]  # id of the kept X_res~, or None when no weight gradient is wanted
    grad_y: Tensor
    x_shape: Shape  # shape of the conv input (that of the residual already sent)
    need_grad_x: bool
    need_grad_w: bool


@dataclass(frozen=True)
class ResendOutput:
    layer: int
    stored: int  # id of the kept X_res~: the accelerator answers conv(X_res~, W) again
    full_answer: bool = False  # as ConvForward's


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


@dataclass(frozen=True)
class Refused:
    reason: str


TO_ACCELERATOR = (RegisterConv, SetWeight, ConvForward, ConvBackward, ResendOutput, Free)
TO_TRUSTED = (Ack, ConvForwardReply, ConvBackwardReply, Refused)
Message = Union[RegisterConv, SetWeight, ConvForward, ConvBackward, ResendOutput, Free, Ack, ConvForwardReply,
                ConvBackwardReply, Refused]


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


class AuditLog:
    """One JSON line per crossing: direction, message kind, layer, field, shape, dtype, l2 norm.

    Lines are flushed as they are written, so the log of a run that crashed is complete up to
    the crash.
    """

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
        self._file.flush()

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
            b.bytes_in += sum(t.numel() * t.element_size() for _, t in _tensor_fields(reply))
            self._reply = reply
        return self._reply


class Boundary:
    """The trusted side's only door to the accelerator: sends allowed messages, checks replies.

    `verifier` (a `legrace.freivalds.FreivaldsVerifier`) also checks that each answer is the
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
        self.bytes_out += sum(t.numel() * t.element_size() for _, t in _tensor_fields(message))
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
            y = _checked(reply.y_res, out_shape, dtype, f"Y_res of layer {layer}")
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
            y = _checked(reply.y_res, out_shape, stored.dtype, f"the resent Y_res of layer {layer}")
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
            gx = _checked(reply.grad_x, x_shape, grad_y.dtype, f"dL/dX of layer {layer}") if need_grad_x else None
            gw = _checked(reply.grad_w, w_shape, grad_y.dtype, f"dW_res of layer {layer}") if msg.need_grad_w else None
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


def _checked(t: object, shape: Shape, dtype: torch.dtype, what: str) -> Tensor:
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


def printable(text: str, limit: int = 300) -> str:
    """Text from the other side, safe to show: printable characters only, bounded length."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


# ---- the wire format --------------------------------------------------------------------------
#
# Between processes a message is one frame body:
#
#     u32 header length (little-endian) | JSON header | tensor bytes, each at a multiple of ALIGN
#
# with the header {"kind": "ConvForward", "fields": {...}, "tensors": [[field, dtype, shape], ...]}.
# "fields" holds the message's non-tensor fields; "tensors" lists its tensors in the order their
# raw bytes follow (C order, little-endian). WIRE_FIELDS fixes each kind's fields and types, and
# `decode` accepts exactly that: a kind allowed in its direction, every field and no other, values
# of the right type and range, allowlisted dtypes, and byte lengths that add up. There is no
# pickle and no eval: a hostile peer can at worst send something `decode` refuses.

ALIGN = 64
MAX_HEADER_BYTES = 1 << 16
MAX_INTS = 1 << 16  # a Free of many ids is the longest list
MAX_DIMS = 8
MAX_TEXT = 1000
MAX_ID = 1 << 62
WIRE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

# Field types: "id" int in [0, 2^62), "id?" the same or None, "ints" list of ids, "bool", "text",
# "tensor", "tensor?" (may be absent), "residual" (a NoisedResidual: tensor + clip + sigma).
WIRE_FIELDS: dict[type, dict[str, str]] = {
    RegisterConv: {"layer": "id", "stride": "ints", "padding": "ints", "dilation": "ints"},
    SetWeight: {"layer": "id", "weight": "tensor"},
    ConvForward: {"layer": "id", "residual": "residual", "keep": "bool", "full_answer": "bool"},
    ConvBackward: {"layer": "id", "stored": "id?", "grad_y": "tensor", "x_shape": "ints", "need_grad_x": "bool",
                   "need_grad_w": "bool"},
    ResendOutput: {"layer": "id", "stored": "id", "full_answer": "bool"},
    Free: {"stored": "ints"},
    Ack: {},
    ConvForwardReply: {"y_res": "tensor", "stored": "id?"},
    ConvBackwardReply: {"grad_x": "tensor?", "grad_w": "tensor?"},
    Refused: {"reason": "text"},
}
_TENSOR_TYPES = ("tensor", "tensor?", "residual")
_U32 = struct.Struct("<I")


def reply_bytes(*tensors: tuple[Shape, torch.dtype]) -> int:
    """The most bytes a frame body may take whose tensors have these shapes and dtypes. The
    trusted side knows what each answer must hold, so a hostile accelerator cannot make it
    allocate more than that (a transport refuses a longer frame before reading it)."""
    return _U32.size + MAX_HEADER_BYTES + sum(ALIGN + math.prod(shape) * dtype.itemsize for shape, dtype in tensors)


def encode(message: Message) -> list[Union[bytes, memoryview]]:
    """The frame body of `message` as a list of byte chunks (tensor chunks are views, not copies)."""
    if sys.byteorder != "little":
        raise BoundaryError("the wire format is little-endian; this host is not")
    schema = WIRE_FIELDS.get(type(message))
    if schema is None:
        raise TypeError(f"{type(message).__name__} has no wire format")
    fields, tensors = {}, []
    for name, kind in schema.items():
        value = getattr(message, name)
        if kind == "residual":
            fields[name] = {"clip": value.clip, "sigma": value.sigma}
            value = value.tensor
        if kind in _TENSOR_TYPES:
            if value is not None:
                tensors.append((name, value.detach().to("cpu").contiguous()))
        else:
            fields[name] = list(value) if kind == "ints" else value
        _check_field(kind, fields.get(name), f"{type(message).__name__}.{name}")
    specs = []
    for name, t in tensors:
        if t.dtype not in _DTYPE_NAMES:
            raise BoundaryError(f"{type(message).__name__}.{name} has dtype {t.dtype}, which may not cross")
        specs.append([name, _DTYPE_NAMES[t.dtype], list(t.shape)])
    header = json.dumps({"kind": type(message).__name__, "fields": fields, "tensors": specs}).encode()
    chunks: list[Union[bytes, memoryview]] = [_U32.pack(len(header)) + header]
    size = len(chunks[0])
    for _, t in tensors:
        pad = -size % ALIGN
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        chunks += [bytes(pad), data]
        size += pad + data.nbytes
    return chunks


def decode(body: Union[Tensor, bytes, bytearray, memoryview], allowed: tuple[type, ...]) -> Message:
    """The message in a frame body; BoundaryError unless it is a well-formed message of an `allowed` kind.

    `body` is best a 1-d uint8 tensor (the transports read into one): tensors are then views of it.
    """
    if isinstance(body, Tensor):
        if body.dtype != torch.uint8 or body.dim() != 1:
            raise TypeError("decode reads a 1-d uint8 tensor or bytes")
        buf = body
    else:
        buf = torch.frombuffer(bytearray(body), dtype=torch.uint8) if len(body) else torch.empty(0, dtype=torch.uint8)
    n = buf.numel()
    if n < _U32.size:
        raise BoundaryError(f"a message of {n} bytes is too short to hold a header")
    (header_len,) = _U32.unpack(buf[:_U32.size].numpy().tobytes())
    if header_len > MAX_HEADER_BYTES or _U32.size + header_len > n:
        raise BoundaryError(f"a message header of {header_len} bytes does not fit (message of {n} bytes)")
    try:
        header = json.loads(buf[_U32.size:_U32.size + header_len].numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BoundaryError(f"unreadable message header ({type(err).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"kind", "fields", "tensors"}:
        raise BoundaryError("a message header must have exactly the keys kind, fields and tensors")
    side = "the trusted side" if allowed == TO_TRUSTED else "the accelerator"
    kinds = {cls.__name__: cls for cls in allowed}
    cls = kinds.get(header["kind"]) if isinstance(header["kind"], str) else None
    if cls is None:
        raise BoundaryError(f"{printable(repr(header['kind']), 60)} is not a message {side} accepts")
    schema, fields, specs = WIRE_FIELDS[cls], header["fields"], header["tensors"]
    plain = {name for name, kind in schema.items() if kind not in ("tensor", "tensor?")}
    if not isinstance(fields, dict) or set(fields) != plain:
        raise BoundaryError(f"{cls.__name__} must have exactly the fields {sorted(plain)}")
    values = {}
    for name in plain:
        values[name] = _check_field(schema[name], fields[name], f"{cls.__name__}.{name}")
    if not isinstance(specs, list):
        raise BoundaryError(f"{cls.__name__}: the tensor list is not a list")
    offset = _U32.size + header_len
    tensors: dict[str, Tensor] = {}
    for spec in specs:
        name, dtype, shape = _check_tensor_spec(spec, schema, tensors, cls.__name__)
        offset += -offset % ALIGN
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > n:
            raise BoundaryError(f"{cls.__name__}.{name}: {nbytes} bytes announced, only {max(n - offset, 0)} sent")
        try:
            tensors[name] = buf[offset:offset + nbytes].view(dtype).reshape(shape)
        except RuntimeError as err:  # a shape torch cannot lay out (its strides overflow)
            raise BoundaryError(f"{cls.__name__}.{name}: shape {list(shape)} cannot be laid out ({err})") from None
        offset += nbytes
    if offset != n:
        raise BoundaryError(f"{cls.__name__}: {n - offset} bytes more than its fields announce")
    for name, kind in schema.items():
        if kind in ("tensor", "residual") and name not in tensors:
            raise BoundaryError(f"{cls.__name__}.{name}: the tensor is missing")
        if kind == "residual":
            values[name] = NoisedResidual(tensors[name], **values[name])
        elif kind in ("tensor", "tensor?"):
            values[name] = tensors.get(name)
    return cls(**values)


def _check_field(kind: str, value: object, where: str):
    """`value` as the message field of wire type `kind`; BoundaryError if it is not one."""
    def is_id(v):
        return type(v) is int and 0 <= v < MAX_ID

    def is_number(v):
        return type(v) in (int, float) and math.isfinite(v)

    if kind == "id" and is_id(value) or kind == "id?" and (value is None or is_id(value)):
        return value
    if kind == "bool" and type(value) is bool:
        return value
    if kind == "ints" and isinstance(value, list) and len(value) <= MAX_INTS and all(is_id(v) for v in value):
        return tuple(value)
    if kind == "text" and isinstance(value, str) and len(value) <= MAX_TEXT:
        return value
    if kind in ("tensor", "tensor?"):
        return value
    if kind == "residual" and isinstance(value, dict) and set(value) == {"clip", "sigma"}:
        clip, sigma = value["clip"], value["sigma"]
        if (clip is None or is_number(clip) and clip > 0) and is_number(sigma) and sigma >= 0:
            return {"clip": None if clip is None else float(clip), "sigma": float(sigma)}
    raise BoundaryError(f"{where}: {printable(repr(value), 80)} is not a valid {kind}")


def _check_tensor_spec(spec: object, schema: dict[str, str], seen: dict, kind: str) -> tuple[str, torch.dtype, Shape]:
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)):
        raise BoundaryError(f"{kind}: a tensor entry must be [field, dtype, shape]")
    name, dtype, shape = spec
    if schema.get(name) not in _TENSOR_TYPES or name in seen:
        raise BoundaryError(f"{kind}: unexpected or repeated tensor {printable(repr(name), 60)}")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise BoundaryError(f"{kind}.{name}: dtype {printable(repr(dtype), 40)} may not cross "
                            f"(allowed: {', '.join(WIRE_DTYPES)})")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and 0 <= d < MAX_ID for d in shape)):
        raise BoundaryError(f"{kind}.{name}: {printable(repr(shape), 80)} is not a valid shape")
    return name, WIRE_DTYPES[dtype], tuple(shape)
