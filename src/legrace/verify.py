"""Check that a model converts exactly: with noise and clipping off, the split model must give the
same logits and parameter gradients as the unconverted model (DESIGN section 2)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legrace.wiring import LegRace


@dataclass
class Exactness:
    logits: float        # |split - plain| / |plain| of the logits
    grads: dict          # the same per parameter gradient (see grad_errors)

    @property
    def worst_grad(self) -> float:
        return max(self.grads.values(), default=0.0)


def grad_errors(split: nn.Module, ref: nn.Module) -> dict:
    """Relative error per parameter gradient. A gradient that is mathematically zero (a conv bias
    followed by BatchNorm in training mode) holds only rounding noise, so each error is taken
    relative to max(|ref grad|, 1e-3 x the largest gradient norm in the model)."""
    ref_grads = {n: p.grad.double() for n, p in ref.named_parameters() if p.grad is not None}
    scale = max((float(g.norm()) for g in ref_grads.values()), default=0.0)
    errs = {}
    for name, p in split.named_parameters():
        if name in ref_grads:
            g = ref_grads[name]
            errs[name] = float((p.grad.double() - g).norm()) / max(float(g.norm()), 1e-3 * scale, 1e-300)
    return errs


def split_vs_plain(model: nn.Module, x: Tensor, y: Tensor, *, rank=8, train: bool = True,
                   mode: str = "legrace", decomposition: str = "light", seed: int = 1234,
                   basis_dtype: Optional[str] = "bfloat16") -> Exactness:
    """Run one forward/backward of `model` (left untouched) and of its split copy; compare."""
    ref, mine = copy.deepcopy(model), copy.deepcopy(model)
    engine = LegRace(mode=mode, rank=rank, clip=None, noise_multiplier=0, decomposition=decomposition,
                     basis_dtype=basis_dtype)
    split = engine.convert(mine)
    split.train(train)
    ref.train(train)
    outs = []
    for m in (split, ref):
        torch.manual_seed(seed)  # the same dropout masks in both
        with engine.unaccounted():  # a check of the arithmetic, noise off
            out = m(x)
            F.cross_entropy(out, y).backward()
        outs.append(out.detach().double())
    return Exactness(float((outs[0] - outs[1]).norm() / outs[1].norm()), grad_errors(split, ref))


def float32_vs_float64(model: nn.Module, x: Tensor, y: Tensor, *, rank=8, train: bool = True,
                       seed: int = 1234, basis_dtype: Optional[str] = "bfloat16") -> tuple[Exactness, Exactness]:
    """(split float32, plain float32), each against the plain model in float64.

    Where a gradient is ill-conditioned (BatchNorm over tiny maps, a small batch) the plain
    float32 model itself is far from float64; the split can only be judged against that floor.
    """
    def run(net: nn.Module, dtype: torch.dtype):
        net.train(train)
        torch.manual_seed(seed)
        out = net(x.to(dtype))
        F.cross_entropy(out, y).backward()
        return out.detach().double()

    ref = copy.deepcopy(model).double()
    plain = copy.deepcopy(model).float()
    engine = LegRace(rank=rank, clip=None, noise_multiplier=0, basis_dtype=basis_dtype)
    split = engine.convert(copy.deepcopy(model).float())
    truth = run(ref, torch.float64)
    results = []
    for net in (split, plain):
        with engine.unaccounted():  # a check of the arithmetic, noise off
            out = run(net, torch.float32)
        results.append(Exactness(float((out - truth).norm() / truth.norm()), grad_errors(net, ref)))
    return results[0], results[1]
