"""What one busy extra thread costs torch's CPU threads: why legrace's helper threads matter.

A plain training step (the trusted side's kind of work) is timed alone and while one more thread
runs a C loop outside the GIL (as the in-process accelerator's copies or a noise thread do), with
torch using every core and with one core left free. OpenMP's parallel regions wait for their
slowest thread, so a thread that loses its core to another holds the whole region back: the step
slows by far more than the share of the machine the extra thread takes.

    python benchmarks/busy_thread.py [--model vgg11] [--input-size 64] [--batch-size 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading

import torch
import torch.nn.functional as F

from bench_common import count, median_seconds

from legrace.trusted.heap import keep_freed_memory
from legrace.models import build_model


def _median_step(model, x, y, steps: int) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return median_seconds(step, steps)


def _with_busy_thread(fn):
    stop = threading.Event()
    data = b"x" * (1 << 20)

    def busy():
        while not stop.is_set():
            hashlib.sha256(data).digest()  # hashlib releases the GIL for large inputs

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        stop.set()
        thread.join()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vgg11")
    p.add_argument("--input-size", type=count, default=64)
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--steps", type=count, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    keep_freed_memory()  # as the other scripts and `legrace bench` (legrace.trusted.heap)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.manual_seed(0)
    model = build_model(a.model, num_classes=10, image_size=a.input_size)
    x, y = torch.randn(a.batch_size, 3, a.input_size, a.input_size), torch.randint(0, 10, (a.batch_size,))
    rows = []
    for threads in sorted({cores, max(1, cores - 1)}, reverse=True):
        torch.set_num_threads(threads)
        alone = _median_step(model, x, y, a.steps)
        busy = _with_busy_thread(lambda: _median_step(model, x, y, a.steps))
        rows.append({"torch_threads": threads, "alone_seconds": alone, "busy_seconds": busy})
        print(f"{threads} torch threads on {cores} cores: step {alone:.3f} s alone, {busy:.3f} s beside one busy "
              f"thread ({busy / alone:.2f}x)", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "input_size": a.input_size, "batch_size": a.batch_size, "cores": cores,
                       "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
