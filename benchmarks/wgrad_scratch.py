"""The grouped low-rank weight gradient in one call against in chunks of samples, in a crowded heap.

oneDNN's grouped weight gradient allocates a scratch buffer the size of dL/dY at each call (411 MB
for VGG-16's second conv at batch 32). glibc gives a block that large fresh pages at each call
whenever it is not carved from a free block of the main heap: always with glibc's default
tunables (it is mmap'd), on any thread but the main one even with the heap kept (legrace.trusted.heap; a
thread's arena maps anything over 64 MB afresh), and on the main thread when the heap's free
blocks are step-sized holes a few bytes too short (docs/performance.md says how many of a step's
faults that was). `split_conv` runs the call in chunks of a few samples
(`GROUPED_CHUNK_BYTES` of dL/dY each), whose scratch every arena reuses. This script times both
ways, interleaved round after round, on the main thread and on a second thread, for the layers of
VGG-16 that take the grouped path: median time and minor faults per call.

    python benchmarks/wgrad_scratch.py --batch-size 32 --out wgrad_scratch.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from bench_common import add_rounds_arguments, apply_process_arguments, count, write_results

from legrace.trusted import split_conv
from legrace.trusted.heap import how_kept
from legrace.trusted.split_conv import lowrank_weight_grad

# (in channels N, out channels M, side) of VGG-16's convs on the grouped path at rank 8
VGG16_GROUPED = [(64, 64, 224), (64, 128, 112), (128, 128, 112)]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _on_thread(work: Callable[[], object]) -> Callable[[], object]:
    """work, run on a second thread (the same one at each call) with the main thread's torch threads."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="wgrad", initializer=torch.set_num_threads,
                              initargs=(torch.get_num_threads(),))
    return lambda: pool.submit(work).result()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=count, default=32)
    p.add_argument("--rank", type=count, default=8)
    add_rounds_arguments(p, rounds=5)
    args = p.parse_args()
    apply_process_arguments(args)
    chunk_bytes = split_conv.GROUPED_CHUNK_BYTES
    limits = {"one call": 2**62, "chunks": chunk_bytes}
    results = []
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, rank {args.rank}, medians of "
          f"{args.rounds} interleaved rounds, heap kept by {how_kept() or 'nothing (glibc defaults)'}")
    for N, M, side in VGG16_GROUPED:
        torch.manual_seed(0)
        B, R = args.batch_size, args.rank
        A, V = torch.randn(B, N, R), torch.randn(B, R, side * side)
        grad_y = torch.randn(B, M, side, side)
        outputs = {}

        def call(way: str) -> Callable[[], object]:
            def work() -> object:
                split_conv.GROUPED_CHUNK_BYTES = limits[way]
                try:
                    outputs[way] = lowrank_weight_grad(A, V, grad_y, (M, N, 3, 3), (side, side), 1, 1, 1,
                                                       path="grouped")
                finally:
                    split_conv.GROUPED_CHUNK_BYTES = chunk_bytes
            return work

        works = {(way, where): (call(way) if where == "main thread" else _on_thread(call(way)))
                 for where in ("main thread", "second thread") for way in limits}
        times: dict = {key: [] for key in works}
        faults: dict = {key: [] for key in works}
        for round_ in range(args.rounds + 1):  # round 0 warms up: oneDNN builds its primitives
            for key, work in works.items():
                f0, t0 = _faults(), time.perf_counter()
                work()
                if round_:
                    times[key].append(time.perf_counter() - t0)
                    faults[key].append(_faults() - f0)
        row = {"N": N, "M": M, "side": side, "bit_identical": torch.equal(outputs["one call"], outputs["chunks"])}
        for (way, where) in works:
            row[f"{where}, {way} seconds"] = statistics.median(times[way, where])
            row[f"{where}, {way} minor faults"] = statistics.median(faults[way, where])
        results.append(row)
        for where in ("main thread", "second thread"):
            print(f"{N:>4} -> {M:<4} {side}x{side}, {where:<13}: "
                  + ", ".join(f"{way} {row[f'{where}, {way} seconds'] * 1e3:6.1f} ms "
                              f"({row[f'{where}, {way} minor faults']:>7,.0f} faults)" for way in limits)
                  + f", bit-identical {row['bit_identical']}", flush=True)
    if args.out:
        write_results(args.out, "none", [{"batch_size": args.batch_size, "rank": args.rank, "rounds": args.rounds,
                                          "chunk_bytes": chunk_bytes, "rows": results}])


if __name__ == "__main__":
    main()
