"""What the accelerator sees under each mode, recorded from a real run of the engine.

A view is named `MODE` or `MODE@EPSILON`:
  gpu_only         the plain model runs on the accelerator: it holds the raw activations;
  legrace@8        the method, noise calibrated for epsilon 8 over the run's epochs;
  dp_only@8        the same mechanism on the whole activation (R = 0);
  legrace@inf      the residual released with no clipping and no noise (what the decomposition
                   alone hides);
  lowrank_only, tee_only   nothing crosses: an attack has only its prior.
The clip C follows a data-independent rule: `auto` (C = 0.05 / z, noise std 0.05), `std:S`
(C = S / z, noise std S) or a fixed number. `RealRun` runs a copy of the target model under the
view's engine with a tap on the boundary, so attacks get exactly what crossed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from torch import Tensor

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from legrace.trusted.engine import AUTO_NOISE_STD, MODES
from legrace.wiring import LegRace
from legrace.trusted.split_conv import SplitConv2d
from legrace.attacks.tap import KINDS, AcceleratorView, ActivationTap, BoundaryTap
from legrace.trusted.convert import conv_modules
from legrace.attacks.target import AttackError, Target

RELEASING = ("legrace", "dp_only")


@dataclass(frozen=True)
class ViewSpec:
    """Which engine the accelerator's view comes from."""

    mode: str
    epsilon: Optional[float] = None  # legrace/dp_only: target epsilon (inf: no clipping, no noise)
    clip: str = "auto"  # clip rule, see parse_clip_rule
    noise_multiplier: Optional[float] = None  # fixed z and C (a checkpoint's own), instead of epsilon
    clip_value: Optional[float] = None

    @property
    def crosses(self) -> bool:
        """Does anything of the activations reach the accelerator?"""
        return self.mode in RELEASING or self.mode == "gpu_only"

    @property
    def label(self) -> str:
        if self.mode not in RELEASING:
            return self.mode
        if self.noise_multiplier is not None:
            return f"{self.mode} z={self.noise_multiplier:.3g}"
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        rule = "" if self.clip == "auto" or math.isinf(self.epsilon) else f" C={self.clip}"
        return f"{self.mode}@{eps}{rule}"


def parse_clip_rule(text: str) -> str:
    """'auto', 'std:S' (noise std S per coordinate, C = S / z) or a fixed C > 0."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        value = float(text[4:] if text.startswith("std:") else text)
    except ValueError:
        raise AttackError(f"clip rule must be 'auto', 'std:S' or a number, not {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise AttackError(f"clip rule {text!r}: the number must be > 0")
    return text


def clip_from_rule(rule: str, z: float) -> float:
    """C for noise multiplier z under a data-independent rule (never fitted to private data)."""
    if rule == "auto":
        return AUTO_NOISE_STD / z
    if rule.startswith("std:"):
        return float(rule[4:]) / z
    return float(rule)


def parse_view(text: str, clip: str = "auto") -> ViewSpec:
    mode, _, eps = text.strip().partition("@")
    if mode not in MODES:
        raise AttackError(f"unknown view {text!r}: the mode must be one of {', '.join(MODES)}")
    if mode not in RELEASING:
        if eps:
            raise AttackError(f"view {text!r}: {mode} releases nothing noised, so it takes no @epsilon")
        return ViewSpec(mode)
    if not eps:
        raise AttackError(f"view {text!r}: give the epsilon, e.g. {mode}@8 (or {mode}@inf for no noise)")
    try:
        value = float(eps)
    except ValueError:
        raise AttackError(f"view {text!r}: epsilon must be a number or inf") from None
    if not value > 0:
        raise AttackError(f"view {text!r}: epsilon must be > 0")
    return ViewSpec(mode, value, parse_clip_rule(clip))


def parse_views(text: str, clip: str = "auto") -> list[ViewSpec]:
    views = [parse_view(v, clip) for v in text.split(",") if v.strip()]
    if not views:
        raise AttackError("no views given")
    return views


def own_view(target: Target) -> ViewSpec:
    """The view of the target run itself: its mode, noise multiplier and clip."""
    mode = target.config.mode
    if mode in RELEASING:
        if target.noise_multiplier is None:
            raise AttackError("the target has no noise settings: give a checkpoint of a trained run")
        return ViewSpec(mode, None, "auto", target.noise_multiplier, target.clip)
    return ViewSpec(mode)


def calibrated_noise(module, mode: str, rank, epsilon: float, epochs: int, batch_size: int, delta: float,
                     input_shape: tuple[int, int, int]) -> float:
    """z that the engine calibrates for `epsilon` over `epochs` passes of this model at this batch
    size on C x H x W inputs (BatchNorm coupling and the maps R covers count), exactly as training
    would."""
    engine = LegRace(mode, rank=rank, target_epsilon=epsilon, target_delta=delta)
    loader = DataLoader(TensorDataset(torch.zeros(batch_size, *input_shape)), batch_size=batch_size)
    engine.make_private(module=module, optimizer=None, data_loader=loader, epochs=epochs)
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    return engine.noise_multiplier


def noise_for(spec: ViewSpec, target: Target, epochs: int, batch_size: int, delta: float) -> tuple[float, Optional[float]]:
    """(z, C) of a releasing view: z calibrated for spec.epsilon, C from the clip rule."""
    if spec.noise_multiplier is not None:
        return spec.noise_multiplier, spec.clip_value
    if math.isinf(spec.epsilon):
        return 0.0, None
    size = target.data.image_size
    z = calibrated_noise(target.fresh_model(), spec.mode, target.config.rank, spec.epsilon, epochs, batch_size, delta,
                         (target.data.in_channels, size, size))
    return z, clip_from_rule(spec.clip, z)


class RealRun:
    """A copy of the target model running under one view's engine, with a tap on what crosses.

    `layers` / `kinds` limit what is recorded. Batches run in training mode (BatchNorm on batch
    statistics), as during training; `forward` only computes, `steps` also trains with plain SGD.
    """

    def __init__(self, target: Target, spec: ViewSpec, *, epochs: int, batch_size: int, delta: float = 1e-5,
                 device: str = "cpu", layers: Optional[Iterable[int]] = None, kinds: Iterable[str] = KINDS) -> None:
        self.spec, self.batch_size = spec, batch_size
        cfg = target.config
        z = clip = None
        if spec.mode in RELEASING:
            z, clip = noise_for(spec, target, epochs, batch_size, delta)
        self.engine = LegRace(spec.mode, rank=cfg.rank, clip=clip, noise_multiplier=z, target_delta=delta,
                              accelerator=device, decomposition=cfg.decomposition)
        self.model = self.engine.convert(target.fresh_model())
        size = target.data.image_size  # plans each conv's map size (those R covers release nothing)
        self.engine.private_loader(DataLoader(TensorDataset(torch.zeros(1, target.data.in_channels, size, size))),
                                   "attack")
        self.input_device = self.engine.device if spec.mode == "gpu_only" else torch.device("cpu")
        self.sent_weights: dict[int, list[Tensor]] = {}
        self.n_points = n_points = len(conv_modules(target.model))
        layers = None if layers is None else list(layers)
        if layers and max(layers) >= n_points:
            raise AttackError(f"layer {max(layers)} does not exist: {cfg.model} has {n_points} decomposition "
                              f"points (0-{n_points - 1})")
        if spec.mode == "gpu_only":
            self.tap: Union[BoundaryTap, ActivationTap, None] = ActivationTap(self.model, layers, kinds)
        elif self.engine.boundary is not None:
            self.tap = BoundaryTap(self.engine.boundary, layers, kinds)
        else:
            self.tap = None

    def crosses_at(self, layer: int) -> bool:
        """Whether anything of decomposition point `layer` reaches the accelerator in this view
        (not for a conv whose input channels or map R covers: it runs wholly inside)."""
        if self.spec.mode == "gpu_only":
            return True
        split = [m for m in self.model.modules() if isinstance(m, SplitConv2d)][layer]
        return self.tap is not None and split.crosses

    @property
    def z(self) -> float:
        return self.engine.noise_multiplier

    @property
    def clip(self) -> Optional[float]:
        return self.engine.clip

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def _remember(self, view: AcceleratorView) -> AcceleratorView:
        # The adversary keeps every weight it was sent, across passes.
        for layer, ws in view.weights.items():
            self.sent_weights.setdefault(layer, []).extend(ws)
        return view

    def forward(self, dataset: Dataset) -> AcceleratorView:
        """One forward pass over `dataset`; returns what crossed during it."""
        if self.tap is None:
            return AcceleratorView()
        self.tap.view = AcceleratorView()
        self.model.train()
        with self.tap, torch.no_grad(), self.engine.unaccounted():  # the attack simulates the adversary's view
            for x, _ in self._loader(dataset):
                self.model(x.to(self.input_device))
        return self._remember(self.tap.view)

    def steps(self, dataset: Dataset, lr: float) -> tuple[AcceleratorView, dict[int, list[tuple[Tensor, Tensor]]]]:
        """A training step per batch of `dataset` with plain SGD (no momentum, no weight decay;
        lr=0: forward and backward only), then a forward pass that sends the last weights.

        Returns what crossed, and per layer the weights sent before and after each step (empty
        when lr=0): the adversary's view of the weight updates.
        """
        if self.tap is None:
            raise AttackError(f"{self.spec.mode}: nothing crosses to the accelerator, there is no gradient to invert")
        self.tap.view = AcceleratorView()
        self.model.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=lr) if lr > 0 else None
        before = {layer: len(ws) for layer, ws in self.sent_weights.items()}
        n_steps = 0
        with self.tap, self.engine.unaccounted():  # the attack simulates the adversary's view
            for x, y in self._loader(dataset):
                self.model.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(x.to(self.input_device)), y.to(self.input_device)).backward()
                if optimizer is not None:
                    optimizer.step()
                n_steps += 1
            if optimizer is not None:
                with torch.no_grad():
                    self.model(x.to(self.input_device))
        view = self._remember(self.tap.view)
        pairs: dict[int, list[tuple[Tensor, Tensor]]] = {}
        if optimizer is not None:
            for layer, ws in self.sent_weights.items():
                seq = ws[before.get(layer, 0):]  # W crosses before every forward: one per step, one after
                if len(seq) != n_steps + 1:
                    raise AttackError(f"layer {layer}: expected {n_steps + 1} weights around {n_steps} steps, "
                                      f"{len(seq)} crossed")
                pairs[layer] = list(zip(seq[:-1], seq[1:]))
        return view, pairs
