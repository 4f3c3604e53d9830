"""Step time with the two legs run one after the other against concurrently (`overlap`).

Same model, batch, accelerator and noise; only `overlap` changes, and the steps of the two
engines are interleaved so that a change of machine load hits both alike. For each it reports
the median training step, the trusted side's working time (the step minus the time it was
blocked on the accelerator) and that blocked time. With overlap, a conv's request goes out
before the trusted side computes its own part of the layer, so the step can shrink towards
max(trusted time, accelerator time) from their sum.

On a CPU-only machine the accelerator must be a separate process ("process"), with the cores
split between the two sides (--threads 1 on 2 cores); an in-process CPU accelerator would
only compete with the trusted side for the same cores.

    .venv/bin/python benchmarks/overlap.py --threads 1 [--models vgg11:64:16,resnet18:112:8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from bench_common import add_run_arguments, apply_process_arguments, model_specs, write_results

from legrace import LegRace
from legrace.models import build_model


def compare(name: str, image_size: int, batch_size: int, accelerator: str, steps: int, warmup: int = 1) -> dict:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_size=image_size)
    x, y = torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, 10, (batch_size,))
    engines = {k: LegRace(rank=8, noise_multiplier=1.0, clip=1.0, accelerator=accelerator, overlap=k == "overlap")
               for k in ("sequential", "overlap")}
    nets = {k: e.convert(copy.deepcopy(model)) for k, e in engines.items()}
    step_s = {k: [] for k in engines}
    wait_s = {k: [] for k in engines}
    for i in range(warmup + steps):
        for k, engine in engines.items():
            waited = engine.boundary.seconds_waiting
            t0 = time.perf_counter()
            nets[k].zero_grad(set_to_none=True)
            with engine.unaccounted():  # synthetic inputs
                F.cross_entropy(nets[k](x), y).backward()
            if i >= warmup:
                step_s[k].append(time.perf_counter() - t0)
                wait_s[k].append(engine.boundary.seconds_waiting - waited)
    for engine in engines.values():
        engine.close()
    out = {"model": name, "input_size": image_size, "batch_size": batch_size}
    for k in engines:
        out[k] = {"step_seconds": statistics.median(step_s[k]), "wait_seconds": statistics.median(wait_s[k]),
                  "trusted_seconds": statistics.median(s - w for s, w in zip(step_s[k], wait_s[k]))}
    out["speedup"] = out["sequential"]["step_seconds"] / out["overlap"]["step_seconds"]
    # the best overlap can do: the longer of the two legs, each as measured one after the other
    out["bound_seconds"] = max(out["sequential"]["trusted_seconds"], out["sequential"]["wait_seconds"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, models="vgg11:64:16,resnet18:112:8")
    args = p.parse_args()
    apply_process_arguments(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads per process, accelerator {args.accelerator}; "
          f"median of {args.steps} training steps")
    print(f"{'model':<10}{'size':>5}{'batch':>6}{'sequential s':>14}{'overlap s':>11}{'speedup':>9}"
          f"{'bound s':>9}{'trusted s (seq/ovl)':>21}")
    results = []
    for name, size, batch in model_specs(args.models):
        r = compare(name, size, batch, args.accelerator, args.steps)
        results.append(r)
        seq, ovl = r["sequential"], r["overlap"]
        print(f"{name:<10}{size:>5}{batch:>6}{seq['step_seconds']:>14.3f}{ovl['step_seconds']:>11.3f}"
              f"{r['speedup']:>8.2f}x{r['bound_seconds']:>9.3f}"
              f"{seq['trusted_seconds']:>11.3f} / {ovl['trusted_seconds']:.3f}")
    if args.out:
        write_results(args.out, args.accelerator, results)


if __name__ == "__main__":
    main()
