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

    def __init__(self) -> None:
        self._offers: dict[int, tuple[weakref.ref, int, Callable[[], Tensor]]] = {}
        self._contexts: list = []
        self.observer: Optional[Callable[[Tensor], None]] = None

    def offer(self, y: Tensor, rebuild: Callable[[], Tensor]) -> None:
        if self._contexts:  # only while a forward of the converted model runs
            self._offers[id(y)] = (weakref.ref(y), y._version, rebuild)

    def _pack(self, t: Tensor):
        entry = self._offers.get(id(t))
        if entry is not None and entry[0]() is t and t._version == entry[1]:
            return _Rebuild(entry[2])
        if self.observer is not None:
            self.observer(t)
        return t

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
