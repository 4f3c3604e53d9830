"""The wire format of legrace.boundary.messages: every message round-trips, anything else is refused."""

import json
import os
import pickle
import struct

import pytest
import torch

from legrace.boundary.messages import (
    TO_ACCELERATOR,
    TO_TRUSTED,
    Ack,
    BoundaryError,
    ConvBackward,
    ConvBackwardReply,
    ConvForward,
    ConvForwardReply,
    Free,
    NoisedResidual,
    RegisterConv,
    Refused,
    SetWeight,
    decode,
    encode,
)


def wire(message) -> bytes:
    return b"".join(bytes(c) for c in encode(message))


def header_and_payload(message) -> tuple[dict, bytes]:
    body = wire(message)
    (n,) = struct.unpack("<I", body[:4])
    return json.loads(body[4:4 + n]), body[4 + n:]


def rebuild(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<I", len(h)) + h + payload


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, NoisedResidual):
        return same(a.tensor, b.tensor) and (a.clip, a.sigma) == (b.clip, b.sigma)
    return a == b


g = torch.Generator().manual_seed(0)
MESSAGES = [
    (RegisterConv(3, (2, 2), (1, 0), (1, 2)), TO_ACCELERATOR),
    (SetWeight(0, torch.randn(8, 3, 3, 3, generator=g)), TO_ACCELERATOR),
    (ConvForward(1, NoisedResidual(torch.randn(4, 3, 5, 7, generator=g), 0.25, 0.5), True), TO_ACCELERATOR),
    (ConvForward(1, NoisedResidual(torch.randn(2, 3, 4, 4, generator=g).double(), None, 0.0), False), TO_ACCELERATOR),
    (ConvBackward(2, 17, torch.randn(4, 8, 3, 3, generator=g), (4, 3, 5, 7), True, False), TO_ACCELERATOR),
    (ConvBackward(2, None, torch.randn(1, 2, 1, 1, generator=g).bfloat16(), (1, 3, 1, 1), False, False), TO_ACCELERATOR),
    (Free((1, 2, 99)), TO_ACCELERATOR),
    (Free(()), TO_ACCELERATOR),
    (Ack(), TO_TRUSTED),
    (ConvForwardReply(torch.randn(4, 8, 5, 7, generator=g), 5), TO_TRUSTED),
    (ConvForwardReply(torch.zeros(0, 8, 5, 7), None), TO_TRUSTED),
    (ConvBackwardReply(torch.randn(4, 3, 5, 7, generator=g), None), TO_TRUSTED),
    (ConvBackwardReply(None, torch.randn(8, 3, 3, 3, generator=g).half()), TO_TRUSTED),
    (Refused("layer 9 was never registered"), TO_TRUSTED),
]


@pytest.mark.parametrize("message,direction", MESSAGES, ids=[type(m).__name__ for m, _ in MESSAGES])
def test_every_message_round_trips(message, direction):
    back = decode(wire(message), direction)
    assert type(back) is type(message)
    for field in message.__dataclass_fields__:
        assert same(getattr(message, field), getattr(back, field)), field


@pytest.mark.parametrize("message,direction", MESSAGES[:4], ids=lambda m: type(m).__name__)
def test_a_message_is_refused_in_the_wrong_direction(message, direction):
    with pytest.raises(BoundaryError, match="is not a message the trusted side accepts"):
        decode(wire(message), TO_TRUSTED)


def test_tensors_are_aligned_views_of_the_frame():
    body = torch.frombuffer(bytearray(wire(MESSAGES[2][0])), dtype=torch.uint8)
    message = decode(body, TO_ACCELERATOR)
    assert message.residual.tensor.untyped_storage().data_ptr() == body.untyped_storage().data_ptr()
    assert (message.residual.tensor.data_ptr() - body.data_ptr()) % 64 == 0


def test_what_may_not_cross_cannot_be_encoded():
    labels = torch.tensor([3, 1, 4])
    with pytest.raises(BoundaryError, match="int64, which may not cross"):
        encode(SetWeight(0, labels))
    with pytest.raises(BoundaryError, match="not a valid residual"):
        encode(ConvForward(0, NoisedResidual(torch.ones(1, 1, 2, 2), float("nan"), 1.0), True))
    with pytest.raises(TypeError, match="no wire format"):
        encode(NoisedResidual(torch.ones(1), 1.0, 1.0))


def tamper(edit):
    """A ConvForward frame whose header was changed by `edit(header)` (payload unchanged)."""
    header, payload = header_and_payload(MESSAGES[2][0])
    edit(header)
    return rebuild(header, payload)


GARBAGE = {
    "empty": b"",
    "random bytes": os.urandom(300),
    "header longer than the frame": struct.pack("<I", 10_000) + b"{}",
    "header not json": struct.pack("<I", 4) + b"\xff\xfe{x",
    "header not an object": rebuild([1, 2], b""),
    "unknown kind": tamper(lambda h: h.update(kind="Exec")),
    "kind not a string": tamper(lambda h: h.update(kind=["ConvForward"])),
    "extra field": tamper(lambda h: h["fields"].update(labels=[1, 2])),
    "missing field": tamper(lambda h: h["fields"].pop("keep")),
    "bool as int": tamper(lambda h: h["fields"].update(keep=1)),
    "negative layer": tamper(lambda h: h["fields"].update(layer=-1)),
    "huge layer": tamper(lambda h: h["fields"].update(layer=10**40)),
    "float layer": tamper(lambda h: h["fields"].update(layer=1.0)),
    "nan sigma": tamper(lambda h: h["fields"]["residual"].update(sigma=float("nan"))),
    "negative clip": tamper(lambda h: h["fields"]["residual"].update(clip=-1.0)),
    "string sigma": tamper(lambda h: h["fields"]["residual"].update(sigma="0.1")),
    "int64 tensor": tamper(lambda h: h["tensors"][0].__setitem__(1, "int64")),
    "object dtype": tamper(lambda h: h["tensors"][0].__setitem__(1, "object")),
    "shape too large": tamper(lambda h: h["tensors"][0].__setitem__(2, [4, 3, 5, 8])),
    "shape too small": tamper(lambda h: h["tensors"][0].__setitem__(2, [4, 3, 5, 6])),
    "negative dim": tamper(lambda h: h["tensors"][0].__setitem__(2, [-4, 3, 5, 7])),
    "too many dims": tamper(lambda h: h["tensors"][0].__setitem__(2, [1] * 9 + [420])),
    "strides overflow": tamper(lambda h: h["tensors"][0].__setitem__(2, [0, 2**62 - 1, 4])),
    "unknown tensor field": tamper(lambda h: h["tensors"][0].__setitem__(0, "labels")),
    "tensor missing": tamper(lambda h: h.update(tensors=[])),
    "tensor repeated": tamper(lambda h: h["tensors"].append(h["tensors"][0])),
    "trailing bytes": wire(MESSAGES[2][0]) + b"\0" * 8,
    "deep nesting": struct.pack("<I", 20_000) + b"[" * 20_000,
}


@pytest.mark.parametrize("body", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_a_boundary_error(body):
    with pytest.raises(BoundaryError):
        decode(body, TO_ACCELERATOR)


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for body in (pickle.dumps(Exploit()), struct.pack("<I", 0) + pickle.dumps(Exploit())):
        with pytest.raises(BoundaryError):
            decode(body, TO_ACCELERATOR)
    assert not marker.exists()


def test_flipped_bytes_never_escape_as_another_error():
    body = bytearray(wire(ConvForward(1, NoisedResidual(torch.randn(2, 3, 4, 4), 0.25, 0.5), True)))
    rng = torch.Generator().manual_seed(1)
    refused = 0
    for _ in range(400):
        mutated = bytearray(body)
        for i in torch.randint(0, len(body), (3,), generator=rng).tolist():
            mutated[i] = int(torch.randint(0, 256, (1,), generator=rng))
        try:
            message = decode(bytes(mutated), TO_ACCELERATOR)
        except BoundaryError:
            refused += 1
        else:  # a flip inside tensor bytes or a still-valid header: a well-formed message
            assert type(message) in TO_ACCELERATOR
    assert refused > 0
