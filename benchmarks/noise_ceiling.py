"""How far below TEE-only the trusted side can get while it draws its Gaussian noise on this CPU.

Every released residual needs fresh N(0, sigma^2) noise of its own size, drawn inside the TEE
(DESIGN section 3). This times, in one run: TEE-only training steps, and drawing the noise of one
legrace step (the residual shapes that step releases, through the mechanism's own sampler and
threads, and, for comparison, through torch's `normal_` with one generator per thread). TEE-only
step ÷ noise time bounds the trusted-time ratio from above on this machine: it is what legrace
would reach if all its other trusted work (decomposition, low-rank convs, ReLU, pooling, the
classifier) took no time at all.

    python benchmarks/noise_ceiling.py --model vgg16 --input-size 224 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_common import (add_model_arguments, add_process_arguments, apply_process_arguments, count, model_and_batch,
                          write_results)

from legrace.bench.runner import ModeRun
from legrace.trusted.mechanism import GaussianMechanism, GaussianStreams


def released_shapes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Size]:
    """The shape of every residual one legrace training step releases, for a batch like x."""
    run = ModeRun("legrace", model, x[:1], y[:1], train=True, rank=8, accelerator="cpu", iters=2)
    shapes = []
    release = run.mechanism.release
    run.mechanism.release = lambda x_res, *a, **k: shapes.append(x_res.shape[1:]) or release(x_res, *a, **k)
    run.step()
    run.mechanism.close()
    return [torch.Size((len(x), *s)) for s in shapes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=count, default=3, help="timed TEE-only steps and noise draws (after one warm-up)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)

    model, x, y = model_and_batch(args)
    shapes = released_shapes(model, x, y)

    mechanism = GaussianMechanism(clip=1.0, noise_multiplier=1.0)
    torch_sampler = GaussianStreams(torch.get_num_threads(), None, sampler="torch")  # for comparison
    draws = {"ziggurat": lambda shape: mechanism.draw_noise(shape, torch.float32),
             "torch": lambda shape: torch_sampler.normal(shape, torch.float32, 1.0)}
    tee = ModeRun("tee_only", model, x, y, train=True, rank=8, accelerator="cpu", iters=2)
    tee_times, noise_times = [], {name: [] for name in draws}
    for i in range(args.steps + 1):  # interleaved, the first of each a warm-up
        t0 = time.perf_counter()
        tee.step()
        t1 = time.perf_counter()
        if i:
            tee_times.append(t1 - t0)
        for name in sorted(draws, reverse=i % 2 == 1):  # each sampler first after a step half the time
            t1 = time.perf_counter()
            for shape in shapes:
                draws[name](shape)
            if i:
                noise_times[name].append(time.perf_counter() - t1)
    mechanism.close()
    torch_sampler.close()

    tee_s, noise_s = statistics.median(tee_times), statistics.median(noise_times["ziggurat"])
    torch_s = statistics.median(noise_times["torch"])
    values = sum(s.numel() for s in shapes)
    result = {"model": args.model, "input_size": args.input_size, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "releases": len(shapes), "noise_values": values,
              "tee_only_step_seconds": tee_s, "noise_seconds": noise_s,
              "noise_ns_per_value": noise_s / values * 1e9, "ceiling": tee_s / noise_s,
              "torch_sampler_noise_seconds": torch_s, "torch_sampler_ceiling": tee_s / torch_s}
    print(f"{args.model} {args.input_size}x{args.input_size} batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: TEE-only step {tee_s:.3f} s; the noise of one legrace step "
          f"({len(shapes)} releases, {values / 1e6:.1f} M values) {noise_s:.3f} s "
          f"({result['noise_ns_per_value']:.2f} ns per value; torch's sampler {torch_s:.3f} s); "
          f"ceiling on TEE-only ÷ trusted time: {result['ceiling']:.1f}x "
          f"({result['torch_sampler_ceiling']:.1f}x with torch's sampler; medians of {args.steps})")
    if args.out:
        write_results(args.out, "none", [result])


if __name__ == "__main__":
    main()
