"""Rebuild conv outputs in backward instead of keeping them on the trusted side.

A BatchNorm after a split conv keeps its input Y for backward: a whole activation, by far the
largest thing the trusted side would hold (ResNets have one after every conv). Y need not be
kept: Y = Y_main + Y_res, where Y_main = conv(V, W') comes from the A and V that the conv keeps
anyway, and Y_res is conv(X_res~, W) of the residual that the accelerator still holds for the
weight gradient; `Boundary.resend_output` asks for it again. That costs one low-rank conv on the
trusted side and one transfer, and no privacy: the accelerator learns nothing it did not have
(DESIGN section 7, post-processing).

Mechanism: while the converted model runs forward, a `saved_tensors_hooks` pair is active. Each
split conv offers its output Y with a function that rebuilds it; when an op saves exactly that
tensor (same object, unmodified), it saves a small `_Rebuild` token instead, and backward gets Y
back from the token. Every other saved tensor is kept as usual.

A memory budget (`keep_bytes`, LegRace's `keep_outputs_mb`) trades some of that memory back for
time: the outputs that cost most to rebuild per byte are kept for real, up to the budget. The
cost is the rebuild's multiply-accumulates per output element, which the split conv gives with
its offer (split_conv.rebuild_cost): forming W' = A·W costs N·R·k² per sample whatever the map's
size, so on a deep layer's small map it dwarfs the low-rank conv. Which outputs a forward
keeps is planned from the previous forward's saves, so the first training step rebuilds them all;
within a forward the budget is never exceeded.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor, nn


class _Rebuild:
    __slots__ = ("rebuild",)

    def __init__(self, rebuild: Callable[[], Tensor]) -> None:
        self.rebuild = rebuild


class ConvOutputs:
    """The conv outputs of the running forward pass that backward may rebuild instead of keep.

    `observer`, when set, sees every tensor that is kept for real (for `legrace bench`'s memory
    count; the hooks of an outer `saved_tensors_hooks` are shadowed while the model runs).
    """

    def __init__(self, keep_bytes: int = 0) -> None:
        self.keep_bytes = keep_bytes  # checked by LegRace (keep_outputs_mb)
        self._offers: dict[int, tuple[weakref.ref, int, Callable[[], Tensor], int, float]] = {}
        self._contexts: list = []
        self.observer: Optional[Callable[[Tensor], None]] = None
        self.planned: frozenset[int] = frozenset()  # the points whose outputs a forward keeps
        self._saved: dict[int, tuple[int, float]] = {}  # this forward's saved outputs: point -> (bytes, cost)
        self._kept: set[int] = set()
        self._kept_bytes = 0

    def offer(self, y: Tensor, rebuild: Callable[[], Tensor], point: int = -1, cost: float = 0.0) -> None:
        """Offer conv `point`'s output y; `cost`: what rebuilding it costs per element (MACs)."""
        if self._contexts:  # only while a forward of the converted model runs (with autograd)
            self._offers[id(y)] = (weakref.ref(y), y._version, rebuild, point, cost)

    def _pack(self, t: Tensor):
        entry = self._offers.get(id(t))
        if entry is not None and entry[0]() is t and t._version == entry[1]:
            if not self.keep_bytes:  # no budget: every offered output is rebuilt
                return _Rebuild(entry[2])
            point, nbytes = entry[3], t.numel() * t.element_size()
            self._saved[point] = (nbytes, entry[4])
            if point not in self._kept:  # (an output saved twice is counted once)
                if point not in self.planned or self._kept_bytes + nbytes > self.keep_bytes:
                    return _Rebuild(entry[2])
                self._kept.add(point)
                self._kept_bytes += nbytes
        if self.observer is not None:
            self.observer(t)
        return t

    def _plan(self) -> None:
        """Keep, next forward, the outputs this one saved that cost most to rebuild per byte."""
        if not self._saved:  # a forward without autograd (evaluation) saved nothing: no new plan
            return
        planned, total = [], 0
        for point, (nbytes, cost) in sorted(self._saved.items(), key=lambda item: (-item[1][1], item[0])):
            if total + nbytes <= self.keep_bytes:
                planned.append(point)
                total += nbytes
        self.planned = frozenset(planned)
        self._saved, self._kept, self._kept_bytes = {}, set(), 0

    @staticmethod
    def _unpack(saved):
        return saved.rebuild() if isinstance(saved, _Rebuild) else saved

    def install(self, model: nn.Module) -> None:
        """Make every forward of `model` save rebuild tokens for the offered conv outputs."""
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit, always_call=True)

    def _enter(self, module, args) -> None:
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        context.__enter__()
        self._contexts.append(context)

    def _exit(self, module, args, output) -> None:
        if self._contexts:
            self._contexts.pop().__exit__(None, None, None)
        if not self._contexts:
            self._offers.clear()
            if self.keep_bytes:
                self._plan()
