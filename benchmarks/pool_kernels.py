"""The compact max-pools' fused kernels against their torch path and torch's own max-pool.

For each pool input shape (by default the five 2x2 pools of VGG-16 and ResNet's 3x3 stride-2
stem, at 224x224 and --batch-size), times the forward and the forward plus backward of
legrace.trusted.compact's CompactMaxPool2d with legrace.trusted.kernels (fused), with the kernels turned off (the
torch path: several torch passes), and nn.MaxPool2d (int64 indices; what plain PyTorch runs).
The three run interleaved, round after round, and each reports the median of --rounds.

    python benchmarks/pool_kernels.py --batch-size 32 --out pool_kernels.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from bench_common import add_rounds_arguments, apply_process_arguments, count, write_results

import legrace.trusted.kernels as kernels
from legrace.trusted.compact import CompactMaxPool2d

VGG16_POOLS = [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)]  # channels, side of each 2x2 pool's input
RESNET_STEM_POOL = (64, 112)


def _with_kernels(on: bool, work: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        before = kernels.enabled
        kernels.enabled = on
        try:
            return work()
        finally:
            kernels.enabled = before
    return run


def _forward(pool: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A training forward: the input needs a gradient, so the pool keeps what backward needs
    (without one, CompactMaxPool2d keeps nothing and takes neither path)."""
    leaf = x.clone().requires_grad_()

    def run() -> object:
        return pool(leaf)
    return run


def _forward_backward(pool: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    leaf = x.clone().requires_grad_()

    def run() -> object:
        y = pool(leaf)
        y.backward(torch.ones_like(y))
        leaf.grad = None
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=count, default=32)
    add_rounds_arguments(p, rounds=7)
    args = p.parse_args()
    apply_process_arguments(args)
    if not kernels.usable(np.float32):
        raise SystemExit("legrace.trusted.kernels cannot run here (numba missing, or LEGRACE_FUSED_KERNELS=0)")
    cases = [("2x2", c, s, dict(kernel_size=2)) for c, s in VGG16_POOLS]
    cases.append(("3x3 stride 2 padding 1", *RESNET_STEM_POOL, dict(kernel_size=3, stride=2, padding=1)))
    results = []
    print(f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds, ms")
    print(f"{'window':<24}{'input':<22}{'':<18}{'fused':>8}{'torch path':>12}{'nn.MaxPool2d':>14}")
    for window, channels, side, options in cases:
        torch.manual_seed(0)
        x = torch.randn(args.batch_size, channels, side, side)
        compact, plain = CompactMaxPool2d(**options), nn.MaxPool2d(**options)
        for direction, make in (("forward", _forward), ("forward+backward", _forward_backward)):
            works = {"fused": _with_kernels(True, make(compact, x)), "torch path": _with_kernels(False, make(compact, x)),
                     "nn.MaxPool2d": make(plain, x)}
            times: dict[str, list[float]] = {name: [] for name in works}
            for name, work in works.items():  # warm-up: compiles, fills the allocator's caches
                work()
            for _ in range(args.rounds):
                for name, work in works.items():
                    t0 = time.perf_counter()
                    work()
                    times[name].append(time.perf_counter() - t0)
            medians = {name: statistics.median(t) for name, t in times.items()}
            results.append({"window": window, "shape": list(x.shape), "direction": direction,
                            **{f"{name} seconds": s for name, s in medians.items()}})
            print(f"{window:<24}{str(tuple(x.shape)):<22}{direction:<18}"
                  + "".join(f"{medians[n] * 1e3:{w}.1f}" for n, w in (("fused", 8), ("torch path", 12),
                                                                          ("nn.MaxPool2d", 14))), flush=True)
    if args.out:
        write_results(args.out, "none", [{"batch_size": args.batch_size, "rounds": args.rounds, "rows": results}])


if __name__ == "__main__":
    main()
