"""The trust boundary: every message that may cross between the trusted side and the accelerator.

Read this file to audit legrace's privacy claim. The trusted side (the TEE) reaches the untrusted
accelerator only through `legrace.boundary.gateway.Boundary`, which sends only the message types
defined here; `legrace.boundary.transport` carries them between processes in the wire format
defined at the end of this file.

Trusted -> untrusted (what the adversary may see):
  RegisterConv   a conv layer's stride, padding and dilation (architecture, public).
  SetWeight      a conv weight W (visible to the adversary in the paper's threat model).
  ConvForward    a NoisedResidual: clip(X_res, C) + N(0, sigma^2 I). The only activation that
                 ever crosses; only `legrace.trusted.mechanism` makes one. Accounted (DESIGN section 3).
  ConvBackward   dL/dY of a conv, as in the paper's mode: outside the formal guarantee, its
                 leakage is measured with gradient-inversion attacks (DESIGN section 3).
  ResendOutput   the id of a stored residual whose Y_res the trusted side wants again in
                 backward (it keeps no conv outputs; see legrace.trusted.recompute). Carries no data:
                 the reply is the same post-processing of an already released residual.
                 (Both may ask for Y_res in the weight's dtype: `full_answer`, a flag.)
  Free           ids of stored residuals that no backward pass will use.

Untrusted -> trusted (checked for shape, dtype and finiteness before use; with verify=True also
by a Freivalds check, `legrace.trusted.freivalds`):
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

import json
import math
import struct
import sys
from dataclasses import dataclass
from typing import Optional, Union

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
