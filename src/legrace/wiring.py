"""`LegRace`: the trusted engine connected to its accelerator.

This is the one module that imports both sides of the trust boundary. It turns the `accelerator`
setting into a `Transport`: an in-process `legrace.accelerator.compute.Accelerator` for "cpu" or a
torch device, or a socket to a worker process ("process[:DEVICE]", "tcp://HOST:PORT"). Everything
else, what is released and how it is accounted, is `legrace.trusted.engine.TrustedEngine`.
"""

from __future__ import annotations

from typing import Any

import torch

from legrace.accelerator.compute import Accelerator, local_device
from legrace.boundary.gateway import InProcessTransport, Transport
from legrace.boundary.transport import is_worker, open_transport, parse_tcp
from legrace.trusted.engine import TrustedEngine
from legrace.trusted.settings import Settings


def accelerator_device(accelerator: str, mode: str = "legrace") -> torch.device:
    """The device of an in-process accelerator; the trusted side's CPU when it is a worker."""
    if not is_worker(accelerator):
        return local_device(accelerator)
    if mode == "gpu_only":
        raise ValueError("gpu_only trains the plain model on a device of this machine: give accelerator='cpu' "
                         f"or 'cuda', not {accelerator!r}")
    if accelerator.startswith("tcp://"):
        parse_tcp(accelerator)
    return torch.device("cpu")


def connect(accelerator: str, device: torch.device, *, secret: str | None = None, timeout: float = 120.0,
            pinned: bool = False) -> Transport:
    """A transport to the accelerator `accelerator` names: a worker's socket, or one in this process."""
    if is_worker(accelerator):
        return open_transport(accelerator, secret, timeout)
    return InProcessTransport(Accelerator(device, pinned=pinned))


class LegRace(TrustedEngine):
    """The privacy engine: `LegRace(mode, **settings)`, where settings are the fields of
    `legrace.trusted.settings.Settings` (rank, clip, noise_multiplier or target_epsilon, accelerator,
    ...), validated there. The engine's methods are `TrustedEngine`'s; this class only connects it."""

    def __init__(self, mode: str = "legrace", **settings: Any) -> None:
        s = Settings(mode=mode, **settings)
        device = accelerator_device(s.accelerator, s.mode)
        super().__init__(s, device=device, connect=lambda: connect(
            s.accelerator, device, secret=s.secret, timeout=s.accelerator_timeout, pinned=self.pinned_memory))
