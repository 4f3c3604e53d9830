"""How far below TEE-only a trusted side can get while it does TEE-only's work outside the convs.

legrace's trusted side runs the same ReLU, pooling, BatchNorm, classifier and loss as TEE-only
(the same layers), and the first conv whole (R covers its input channels). Only the other convs
are split. So even if decomposition, noise and the low-rank convs took no time at all, the
trusted side would still spend TEE-only's time outside its split convs: TEE-only's step ÷ that
time bounds TEE-only ÷ trusted time from above, on this machine, for any split. It is taken from
the loosest of --steps profiled steps: one profile can be disturbed, and a disturbed one would
tighten it. Where the plain channels_last model (`legrace bench`'s second TEE-only baseline)
trains faster, the ratios of record are against it, and so is the tighter bound
("bound_fastest": its step ÷ the same shared time).

This profiles TEE-only training (or, with --infer, inference) steps with torch.profiler (self
CPU time per operator) and splits each into the convolutions legrace splits and the rest
("shared": the rest includes the first conv, recognised by the image batch among its
operators' inputs).

    python benchmarks/shared_work.py --model vgg16 --input-size 224 --batch-size 32
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import (add_model_arguments, add_process_arguments, apply_process_arguments, count, median_seconds,
                          model_and_batch, write_results)

from legrace.bench.runner import TEE_CHANNELS_LAST, ModeRun


def is_split_conv(event, image_shape: list[int]) -> bool:
    """A conv operator of a conv legrace splits: any but the first, whose input is the image."""
    return "conv" in event.key.lower() and image_shape not in event.input_shapes


def split_step(events, image_shape: list[int]) -> dict[str, float]:
    """Self CPU seconds of one profiled step: the convs legrace splits, and the rest."""
    split = sum(e.self_cpu_time_total for e in events if is_split_conv(e, image_shape)) / 1e6
    shared = sum(e.self_cpu_time_total for e in events if not is_split_conv(e, image_shape)) / 1e6
    return {"split_conv_seconds": split, "shared_seconds": shared}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=count, default=3,
                   help="timed steps of each TEE-only baseline (after one warm-up), and profiled steps")
    p.add_argument("--infer", action="store_true", help="inference (no_grad forward) instead of training")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)

    model, x, y = model_and_batch(args)
    # the channels_last model first: the profiled step follows tee_only's own timed steps, so
    # finds its memory as they left it (after the other model, VGG-19 inference profiled 1.4x
    # slower than its timed steps, its passes outside the convs 2.9x)
    plain = ModeRun(TEE_CHANNELS_LAST, model, x, y, train=not args.infer, rank=8, accelerator="cpu", iters=2)
    plain_step = median_seconds(plain.step, args.steps)
    del plain
    tee = ModeRun("tee_only", model, x, y, train=not args.infer, rank=8, accelerator="cpu", iters=2)
    step = median_seconds(tee.step, args.steps)
    profiled_steps = []
    for _ in range(args.steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            tee.step()
        events = prof.key_averages(group_by_input_shape=True)
        profiled_steps.append((split_step(events, list(x.shape)), events))
    # of the profiled steps, the one with the smallest share outside the split convs: the loosest
    # cap, so that noise in one profile never makes a target look further out of reach than it is
    parts, events = max(profiled_steps, key=lambda pe: pe[0]["split_conv_seconds"] / pe[0]["shared_seconds"])
    profiled = parts["split_conv_seconds"] + parts["shared_seconds"]
    result = {"model": args.model, "input_size": args.input_size, "batch_size": args.batch_size,
              "train": not args.infer, "threads": torch.get_num_threads(), "tee_only_step_seconds": step,
              "tee_only_channels_last_step_seconds": plain_step, "profiled_steps": args.steps,
              "profiled_step_seconds": profiled, **parts, "bound": profiled / parts["shared_seconds"]}
    # the shared work in wall seconds of a step (the profiler's self times sum to a little less)
    shared_wall = parts["shared_seconds"] * step / profiled
    result["bound_fastest"] = min(step, plain_step) / shared_wall
    print(f"{args.model} {'inference' if args.infer else 'training'} {args.input_size}x{args.input_size} "
          f"batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: TEE-only step {step:.3f} s (median of {args.steps}); the loosest "
          f"of {args.steps} profiled steps: "
          f"{profiled:.3f} s, of which split convs {parts['split_conv_seconds']:.3f} s and the rest "
          f"{parts['shared_seconds']:.3f} s: TEE-only ÷ trusted time cannot pass {result['bound']:.1f}x; "
          f"channels_last TEE-only step {plain_step:.3f} s, so against the faster TEE-only it cannot pass "
          f"{result['bound_fastest']:.1f}x")
    shared = {}
    for e in events:
        if not is_split_conv(e, list(x.shape)):
            shared[e.key] = shared.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    for key, seconds in sorted(shared.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {seconds * 1e3:8.1f} ms  {key}")
    if args.out:
        write_results(args.out, "none", [result])


if __name__ == "__main__":
    main()
