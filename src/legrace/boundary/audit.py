"""The audit log: one JSON line per crossing of the trust boundary, with each tensor's shape,
dtype and l2 norm, and each released residual's clip and sigma."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import IO, Union

from torch import Tensor

from legrace.boundary.messages import Message, NoisedResidual


class AuditLog:
    """One JSON line per crossing: direction, message kind, layer, field, shape, dtype, l2 norm.

    Lines are flushed as they are written, so the log of a run that crashed is complete up to
    the crash.
    """

    def __init__(self, path: Union[str, Path, IO[str]]) -> None:
        self._file = open(path, "w") if isinstance(path, (str, Path)) else path

    def record(self, direction: str, message: Message) -> None:
        base = {"direction": direction, "kind": type(message).__name__, "layer": getattr(message, "layer", None)}
        tensors = tensor_fields(message)
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


def tensor_fields(message: Message) -> list[tuple[str, Tensor]]:
    out = []
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, NoisedResidual):
            out.append((f"{f.name}.tensor", value.tensor))
        elif isinstance(value, Tensor):
            out.append((f.name, value))
    return out

