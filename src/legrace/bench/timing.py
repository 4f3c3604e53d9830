"""Per-layer timing for `legrace bench`, attached to a model's split convs through their observer hook."""

from __future__ import annotations

from torch import nn

from legrace.trusted.split_conv import ObserverHandle, observe_layers


class LayerTimings:
    """Seconds per (decomposition point, kind): "total_fwd" and "total_bwd" (the layer's trusted
    wall time, waits included), "wait_fwd" and "wait_bwd" (of which the transport took), and
    "rebuilds" (how many times backward rebuilt the layer's output: a count, not seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, str], float] = {}

    def add(self, point: int, kind: str, seconds: float) -> None:
        self.seconds[point, kind] = self.seconds.get((point, kind), 0.0) + seconds

    def layer_event(self, point: int, phase: str, kind: str, seconds: float) -> None:
        """The split convs' observer hook (legrace.trusted.split_conv.LayerObserver)."""
        if kind == "rebuild":
            self.add(point, "rebuilds", 1)
        else:
            self.add(point, f"{kind}_{phase}", seconds)

    def attach(self, model: nn.Module) -> ObserverHandle:
        """Start booking the split convs of `model`; `.remove()` the handle returned to stop."""
        return observe_layers(model, self)
