"""Experiment: does cutting each conv's batch into micro-batches help the overlapped legs?

With `overlap`, a conv's request goes out after the whole batch is decomposed and noised, so that
work never overlaps the accelerator. Cut into k micro-batches, the decomposition and noise of
micro-batch i+1 (and the low-rank conv of micro-batch i) can run while the accelerator convolves
micro-batch i. This script measures whether that pays, on inference (forward only) steps, by
swapping in a micro-batched forward for the split conv; it is an experiment, not a feature:
legrace itself sends whole batches (on this project's 2-core CPU it was slower; see docs/performance.md).

    .venv/bin/python benchmarks/micro_batches.py --threads 1 [--models vgg16:112:8,resnet18:112:16] [--k 1,2,4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import contextmanager

import torch

from bench_common import add_run_arguments, apply_process_arguments, counts, model_specs, write_results

import legrace.trusted.split_conv as split_conv
from legrace import LegRace
from legrace.trusted.decompose import decompose, rank_for_point
from legrace.models import build_model


def micro_batched_forward(k: int, whole_batch):
    """An inference forward for SplitConvFunction that sends k requests per conv, interleaved
    (a conv that sends nothing, SplitConv2d.silent, keeps `whole_batch`, the real forward)."""

    def forward(ctx, x, weight, bias, layer, sends, grad):
        if not sends:
            return whole_batch(ctx, x, weight, bias, layer, sends, grad)
        cfg = layer.config
        rank = rank_for_point(cfg.rank, layer.point, cfg.n_points)
        hw = tuple(x.shape[2:])
        conv_args = (layer.stride, layer.padding, layer.dilation)
        y = x.new_empty(x.shape[0], weight.shape[0], *layer.output_hw(hw))
        pending, mains, decs = [], [], []
        for i, xc in enumerate(x.tensor_split(k)):
            dec = decompose(xc, rank, method=cfg.method, iters=cfg.iters, basis_dtype=cfg.basis_dtype)
            released = cfg.mechanism.release(dec.X_res, cfg.wire_dtype)
            if i:  # the previous micro-batch's low-rank conv, while the accelerator works on it
                mains.append(split_conv.lowrank_conv(decs[-1].A, decs[-1].V, weight, hw, *conv_args, bias))
            pending.append(cfg.boundary.conv_forward(layer.point, released, False, (len(xc), *y.shape[1:]),
                                                     wait=False))
            decs.append(dec)
        mains.append(split_conv.lowrank_conv(decs[-1].A, decs[-1].V, weight, hw, *conv_args, bias))
        start = 0
        for y_main, p in zip(mains, pending):
            y_res, _ = p.result()
            torch.add(y_main, y_res, out=y[start:start + len(y_main)])
            start += len(y_main)
        return y

    return staticmethod(forward)


@contextmanager
def micro_batches(k: int):
    real = split_conv.SplitConvFunction.forward
    split_conv.SplitConvFunction.forward = micro_batched_forward(k, real)
    try:
        yield
    finally:
        split_conv.SplitConvFunction.forward = real


def compare(name: str, image_size: int, batch_size: int, ks: list[int], accelerator: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_size=image_size)
    x = torch.randn(batch_size, 3, image_size, image_size)
    engine = LegRace(rank=8, noise_multiplier=1.0, clip=1.0, accelerator=accelerator, overlap=True, noise_ahead=0)
    net = engine.convert(copy.deepcopy(model)).eval()
    times: dict[int, list[float]] = {k: [] for k in ks}
    try:
        with torch.no_grad(), engine.unaccounted():  # synthetic inputs
            for i in range(1 + steps):  # interleaved, the first round a warm-up
                for k in ks:
                    with micro_batches(k):
                        t0 = time.perf_counter()
                        net(x)
                        if i:
                            times[k].append(time.perf_counter() - t0)
    finally:
        engine.close()
    return {"model": name, "input_size": image_size, "batch_size": batch_size,
            "step_seconds": {str(k): statistics.median(v) for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, models="vgg16:112:8,resnet18:112:16")
    p.add_argument("--k", type=counts, default=[1, 2, 4], help="micro-batches per conv to compare, comma-separated")
    args = p.parse_args()
    apply_process_arguments(args)
    ks = args.k
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads per process, accelerator {args.accelerator}; "
          f"median of {args.steps} inference steps, seconds")
    results = []
    for name, size, batch in model_specs(args.models):
        r = compare(name, size, batch, ks, args.accelerator, args.steps)
        results.append(r)
        print(f"{name:<10}{size:>5}{batch:>6}  " + "  ".join(f"k={k}: {s:.3f}" for k, s in r["step_seconds"].items()))
    if args.out:
        write_results(args.out, args.accelerator, results)


if __name__ == "__main__":
    main()
