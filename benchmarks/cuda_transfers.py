"""Host <-> CUDA copy rates for legrace's message sizes: pageable against page-locked (pinned).

The in-process CUDA accelerator receives each noised residual and dL/dY and answers Y_res, dL/dX
and the weight gradient. This measures what page-locked memory gains per byte (LegRace's
pinned_memory), including the copy into a pinned buffer that a pageable tensor (dL/dY) costs.

    python benchmarks/cuda_transfers.py [--repeats 5] [--out transfers.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_common import count

from legrace.trusted.heap import keep_freed_memory

# (name, shape): VGG-16's largest conv input at 224x224 batch 32, and a mid-size one
SHAPES = (("32x64x224x224", (32, 64, 224, 224)), ("32x256x56x56", (32, 256, 56, 56)),
          ("32x512x14x14", (32, 512, 14, 14)))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and the first pinned allocation)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=count, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    keep_freed_memory()  # as the other scripts and `legrace bench` (legrace.trusted.heap)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_transfers.py needs a CUDA GPU")
    rows = []
    for name, shape in SHAPES:
        host = torch.randn(shape)
        pinned = host.pin_memory()
        dev = host.cuda()
        gb = host.numel() * host.element_size() / 1e9
        cases = {
            "h2d_pageable": lambda: host.to("cuda"),
            "h2d_pinned": lambda: pinned.to("cuda", non_blocking=True),
            "h2d_pin_then_copy": lambda: host.pin_memory().to("cuda", non_blocking=True),
            "d2h_pageable": lambda: dev.to("cpu"),
            "d2h_pinned": lambda: torch.empty(shape, pin_memory=True).copy_(dev, non_blocking=True),
        }
        row = {"shape": name, "gigabytes": gb}
        for case, fn in cases.items():
            s = _median_seconds(fn, a.repeats)
            row[case] = {"seconds": s, "gb_per_s": gb / s}
        rows.append(row)
        print(name, f"{gb:.3f} GB", "  ".join(f"{c} {row[c]['gb_per_s']:.1f} GB/s" for c in cases), flush=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeats": a.repeats, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
