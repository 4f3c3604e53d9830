"""The trusted side's low-rank conv and weight gradient, by a grouped conv or by im2col and a GEMM.

For every conv that legrace splits in each model (its input shape found by running the plain model
once), times both ways of computing conv(V, W') and its weight gradient at rank --rank, side by
side: the two paths alternate within each repeat, medians of --repeats. It prints which path
`split_conv.lowrank_path` picks per shape, and each model's total with the picked paths against
the grouped conv alone (what legrace did before). Shapes where the direct conv(A·V, W) is picked
(maps with no more pixels than R) are left out: both W' paths cost more there by construction.

    .venv/bin/python benchmarks/lowrank_paths.py --models vgg16:224:32,resnet18:224:32 --out paths.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench_common import add_process_arguments, apply_process_arguments, count, model_specs, write_results

from legrace.models import build_model
from legrace.trusted.split_conv import conv_padding, lowrank_conv, lowrank_path, lowrank_weight_grad

PATHS = ("grouped", "unfold")


def split_conv_shapes(name: str, size: int, rank: int) -> list[dict]:
    """Each distinct conv that legrace splits at this rank, with the input shape it sees."""
    model = build_model(name, num_classes=10, image_size=size)
    shapes: dict[tuple, dict] = {}

    def record(conv: nn.Conv2d, inputs) -> None:
        _, N, h, w = inputs[0].shape
        if N <= rank:  # split exactly: runs whole on the trusted side, no low-rank conv
            return
        shape = dict(N=N, M=conv.out_channels, h=h, w=w, kernel=tuple(conv.kernel_size), stride=tuple(conv.stride),
                     padding=conv_padding(conv), dilation=tuple(conv.dilation))
        key = tuple(shape.values())
        shapes.setdefault(key, {**shape, "count": 0})["count"] += 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return [s for s in shapes.values() if lowrank_path(s["N"], rank, s["M"], s["h"] * s["w"]) != "direct"]


def time_shape(shape: dict, batch: int, rank: int, repeats: int) -> dict[str, float]:
    """Median seconds of each path's forward and weight gradient, the paths alternating."""
    g = torch.Generator().manual_seed(0)
    N, M, h, w = shape["N"], shape["M"], shape["h"], shape["w"]
    kh, kw = shape["kernel"]
    conv_args = (shape["stride"], shape["padding"], shape["dilation"])
    A = torch.randn(batch, N, rank, generator=g)
    V = torch.randn(batch, rank, h * w, generator=g)
    weight = torch.randn(M, N, kh, kw, generator=g)
    y = lowrank_conv(A, V, weight, (h, w), *conv_args)
    grad_y = torch.randn(y.shape, generator=g)
    work = {}
    for path in PATHS:
        work[f"{path} forward"] = lambda p=path: lowrank_conv(A, V, weight, (h, w), *conv_args, path=p)
        work[f"{path} weight grad"] = lambda p=path: lowrank_weight_grad(A, V, grad_y, weight.shape, (h, w),
                                                                        *conv_args, path=p)
    times: dict[str, list[float]] = {k: [] for k in work}
    order = list(work)
    for fn in work.values():  # warm-up
        fn()
    for i in range(repeats):
        for key in order if i % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            work[key]()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg16:224:32,resnet18:224:32", help="NAME:INPUT_SIZE:BATCH, comma-separated")
    p.add_argument("--rank", type=count, default=8)
    p.add_argument("--repeats", type=count, default=5)
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)
    print(f"{torch.get_num_threads()} threads, rank {args.rank}, medians of {args.repeats} (ms)")
    results = []
    for name, size, batch in model_specs(args.models):
        totals = {"picked": 0.0, "grouped": 0.0}
        print(f"\n{name} {size}x{size} batch {batch}")
        print(f"{'N->M':>10} {'map':>7} {'k/s':>5} {'x':>2} {'picked':>7} | {'fwd grouped':>11} {'unfold':>7}"
              f" | {'wgrad grouped':>13} {'unfold':>7}")
        for shape in split_conv_shapes(name, size, args.rank):
            t = time_shape(shape, batch, args.rank, args.repeats)
            picked = lowrank_path(shape["N"], args.rank, shape["M"], shape["h"] * shape["w"])
            n = shape["count"]
            totals["picked"] += n * (t[f"{picked} forward"] + t[f"{picked} weight grad"])
            totals["grouped"] += n * (t["grouped forward"] + t["grouped weight grad"])
            results.append({"model": name, "input_size": size, "batch": batch, "rank": args.rank, **shape,
                            "picked": picked, "seconds": t})
            print(f"{shape['N']:>4}->{shape['M']:<5} {shape['h']:>3}x{shape['w']:<3} {shape['kernel'][0]}/{shape['stride'][0]:<3}"
                  f" {n:>2} {picked:>7} | {t['grouped forward'] * 1e3:11.1f} {t['unfold forward'] * 1e3:7.1f}"
                  f" | {t['grouped weight grad'] * 1e3:13.1f} {t['unfold weight grad'] * 1e3:7.1f}", flush=True)
        print(f"one forward + weight gradient of every split conv: {totals['picked'] * 1e3:.0f} ms with the picked "
              f"paths, {totals['grouped'] * 1e3:.0f} ms with the grouped conv alone "
              f"({totals['grouped'] / max(totals['picked'], 1e-12):.2f}x)")
        results.append({"model": name, "input_size": size, "batch": batch, "rank": args.rank, "totals": totals})
    if args.out:
        write_results(args.out, "cpu", results)


if __name__ == "__main__":
    main()
