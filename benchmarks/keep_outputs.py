"""Trusted time and memory of legrace with its conv outputs rebuilt, partly kept, or all kept.

A BatchNorm after each conv would keep the conv's output for backward; legrace rebuilds it
instead (legrace.trusted.recompute), and `keep_outputs_mb` keeps the outputs costliest to rebuild up to
a budget. This script times legrace training steps with each budget, interleaved so that a change
of machine load hits every setting alike, and reports the median (and least) trusted time and the
memory the trusted side keeps, as `legrace bench` counts them.

    .venv/bin/python benchmarks/keep_outputs.py --model resnet18 --budgets 0,23,all --steps 5
"""

from __future__ import annotations

import argparse

from bench_common import add_model_arguments, add_process_arguments, apply_process_arguments, count, model_and_batch, \
    write_results

from legrace.bench.runner import ModeRun
from legrace.options import mebibytes


def budgets(text: str) -> list[str]:
    """argparse type: comma-separated MiB budgets (finite numbers >= 0) or "all" (keep every output)."""
    parts = [part.strip() for part in text.split(",")]
    for part in parts:
        if part != "all":
            try:
                mebibytes(part)
            except argparse.ArgumentTypeError as err:
                raise argparse.ArgumentTypeError(f"a budget {err} (or 'all')")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--budgets", type=budgets, default=budgets("0,all"),
                   help="MiB of conv outputs to keep per forward, comma-separated; 'all' keeps every one")
    p.add_argument("--steps", type=count, default=5)
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(p)
    args = p.parse_args()
    apply_process_arguments(args)
    model, x, y = model_and_batch(args)
    runs = {b: ModeRun("legrace", model, x, y, train=True, rank=8, accelerator="cpu", iters=2,
                       rebuild_outputs=b != "all", keep_outputs_mb=0.0 if b == "all" else float(b))
            for b in args.budgets}
    for run in runs.values():  # warm-up; it also plans which outputs the next steps keep
        run.step()
    for _ in range(args.steps):
        for run in runs.values():
            run.timed_step()
    results = []
    for b, run in runs.items():
        r = run.result()
        results.append({"budget_mib": b, "trusted_seconds": r["trusted_seconds"], "trusted_seconds_min": min(run.trusted),
                        "trusted_saved_mib": r["trusted_saved_bytes"] / 2**20, "trusted_macs": r["trusted_macs"]})
        print(f"keep {b:>5} MiB: trusted {r['trusted_seconds']:.3f} s (least {min(run.trusted):.3f} s), "
              f"keeps {r['trusted_saved_bytes'] / 2**20:.1f} MiB, trusted MACs {r['trusted_macs'] / 1e9:.2f}G")
    if args.out:
        write_results(args.out, "cpu", [{"model": args.model, "input_size": args.input_size,
                                         "batch_size": args.batch_size, "steps": args.steps, **r} for r in results])


if __name__ == "__main__":
    main()
