"""Where the trusted side's time goes in a legrace training (or, with --infer, inference) step.

Wraps the functions the trusted side spends its time in (decomposition, the Gaussian mechanism,
the low-rank conv and weight gradient, the compact ReLU and max-pool, reply checks) with timers,
and runs steps with an in-process accelerator: the CPU (default) or, on a GPU host, CUDA. The
trusted side's time is the step less its waits for the accelerator, as `legrace bench` counts it.
"other" is the rest of the trusted step: classifier, loss, BatchNorm, autograd.

With the CPU accelerator, the accelerator's convs run on the same OpenMP threads as the trusted
side, whose spinning after each region slows the passes on legrace's own threads (noise); with
--accelerator cuda they do not, so on a GPU host profile with cuda.

    .venv/bin/python benchmarks/profile_trusted.py --model vgg16 --input-size 224 --batch-size 8
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

import torch

from bench_common import add_model_arguments, add_process_arguments, apply_process_arguments, count, model_and_batch

import legrace.boundary.gateway as gateway
import legrace.trusted.compact as compact
import legrace.trusted.split_conv as split_conv
from legrace.bench.runner import ModeRun, minor_faults
from legrace.trusted.mechanism import GaussianMechanism

seconds: collections.Counter = collections.Counter()
faults: collections.Counter = collections.Counter()  # the process's minor page faults during each call
_originals: list[tuple[object, str, object]] = []
# --replay: the calls of the last profiled step, kept to run again once the steps are over
REPLAYED = ("decomposition", "low-rank conv", "low-rank weight gradient")
recorded: list[tuple[str, object, tuple, dict]] = []
recording = False


def _faults() -> int:
    """The process's minor page faults so far (0 where the OS does not count them)."""
    return minor_faults() or 0


def _timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)
    _originals.append((owner, name, owner.__dict__[name] if name in vars(owner) else None))

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        if recording and label in REPLAYED:
            recorded.append((label, fn, args, kwargs))
        f0, t0 = _faults(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - t0
            faults[label] += _faults() - f0

    setattr(owner, name, staticmethod(timed) if isinstance(owner.__dict__.get(name), staticmethod) else timed)


def instrument() -> None:
    _timed(split_conv, "decompose", "decomposition")
    _timed(split_conv, "lowrank_conv", "low-rank conv")
    _timed(split_conv, "lowrank_weight_grad", "low-rank weight gradient")
    _timed(split_conv, "combine_outputs", "Y_main + Y_res")
    _timed(gateway, "checked_tensor", "checking replies")
    _timed(GaussianMechanism, "release", "noise and clipping")
    _timed(GaussianMechanism, "draw_noise", "  of which drawing noise")
    for cls, label in ((compact.PackedReLUFunction, "ReLU"), (compact.CompactMaxPool2x2Function, "max-pool 2x2"),
                       (compact.CompactMaxPoolFunction, "max-pool")):
        _timed(cls, "forward", f"{label} forward")
        _timed(cls, "backward", f"{label} backward")


def restore() -> None:
    """Put back every function `instrument` wrapped."""
    while _originals:
        owner, name, original = _originals.pop()
        if original is None:
            delattr(owner, name)  # an instance attribute shadowing its class's method
        else:
            setattr(owner, name, original)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, batch_size=8)
    p.add_argument("--steps", type=count, default=3)
    p.add_argument("--infer", action="store_true", help="time inference (no_grad forward) instead of training")
    p.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-overlap", action="store_true", help="the two legs of each conv one after the other")
    p.add_argument("--replay", type=count, default=None, metavar="N",
                   help="after the steps, run the last step's decompositions and low-rank calls again, back to back, "
                        "N times, on the same inputs and on copies of them in fresh memory: whether a call is slower "
                        "inside a step than outside it, and whether its inputs' memory is why")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--accelerator cuda: no CUDA GPU here")
    instrument()
    try:
        profile(args)
    finally:
        restore()


def profile(args: argparse.Namespace) -> None:
    model, x, y = model_and_batch(args)
    run = ModeRun("legrace", model, x, y, train=not args.infer, rank=8, accelerator=args.accelerator, iters=2,
                  overlap=False if args.no_overlap else None)
    for _ in range(2):  # warm-up
        run.step()
    seconds.clear()
    faults.clear()
    f0 = _faults()
    global recording
    for i in range(args.steps):
        recording = args.replay is not None and i == args.steps - 1
        run.timed_step()
    recording = False
    step_faults = (_faults() - f0) / args.steps
    step = sum(run.steps) / args.steps
    trusted = sum(run.trusted) / args.steps
    per_step = {k: v / args.steps for k, v in seconds.items()}
    print(f"{args.model} {'inference' if args.infer else 'training'} {args.input_size}x{args.input_size} "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, {args.accelerator} accelerator: "
          f"step {step:.3f} s, trusted side {trusted:.3f} s (mean of {args.steps} steps; overlap "
          f"{'on' if run.engine.overlap else 'off'})")
    for label, s in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"{s * 1e3:9.1f} ms  {label}")
    counted = sum(s for label, s in per_step.items() if not label.startswith(" "))
    print(f"{(trusted - counted) * 1e3:9.1f} ms  other (classifier, loss, BatchNorm, autograd)")
    top = ", ".join(f"{label.strip()} {n / args.steps:.0f}" for label, n in faults.most_common(4) if n)
    print(f"minor page faults per step: {step_faults:.0f}" + (f" (in {top})" if top else ""))
    if args.replay:
        replay(per_step, {k: v / args.steps for k, v in faults.items()}, args.replay)


def _fresh(value):
    """A tensor copied into fresh memory with the same strides (other values as they are)."""
    return value.clone(memory_format=torch.preserve_format) if isinstance(value, torch.Tensor) else value


def replay(per_step: dict[str, float], step_faults: dict[str, float], repeats: int) -> None:
    """Time the last step's recorded calls again outside the step, back to back: each label's
    total per pass, median of `repeats` passes, on the step's own inputs and on fresh copies (and
    the minor page faults of each, per step and per pass on the step's inputs)."""
    fresh = [(label, fn, tuple(map(_fresh, a)), {k: _fresh(v) for k, v in kw.items()})
             for label, fn, a, kw in recorded]
    print(f"replayed outside the step ({len(recorded)} calls, median of {repeats} passes):")
    print(f"{'in step':>9}  {'replayed':>9}  {'fresh copies':>12}     {'faults in step':>14}  {'replayed':>8}")
    medians, replay_faults = {}, collections.defaultdict(list)
    for name, calls in (("same", recorded), ("fresh", fresh)):
        passes = collections.defaultdict(list)
        for _ in range(repeats):
            totals: collections.Counter = collections.Counter()
            for label, fn, a, kw in calls:
                f0, t0 = _faults(), time.perf_counter()
                fn(*a, **kw)
                totals[label] += time.perf_counter() - t0
                if name == "same":
                    replay_faults[label].append(_faults() - f0)
            for label in REPLAYED:
                passes[label].append(totals[label])
        medians[name] = {label: statistics.median(v) for label, v in passes.items()}
    for label in REPLAYED:
        print(f"{per_step.get(label, 0.0) * 1e3:9.1f}  {medians['same'][label] * 1e3:9.1f}  "
              f"{medians['fresh'][label] * 1e3:12.1f} ms  {step_faults.get(label, 0):14.0f}  "
              f"{sum(replay_faults[label]) / repeats:8.0f}  {label}")
    recorded.clear()


if __name__ == "__main__":
    main()
