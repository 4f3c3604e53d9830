"""Recount the trusted-side MACs of stored `legrace bench` runs with today's count.

Runs made before commit 18f30d0 counted the light SVD as passes over X (it goes through the Gram
matrix with <= 64 channels) and charged the first conv a dL/dX that autograd never computes. This
script prints each run's TEE-only ÷ legrace MAC ratio as stored and as counted now: to each mode's
stored MACs it adds the difference between the two counts, each taken on one sample of the run's
model and multiplied by the batch size. That difference does not depend on which conv outputs the
run rebuilt, which bench.json does not record.

    python benchmarks/recount_macs.py docs/bench/cpu/*/ docs/bench/cpu-keep/*/
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from legrace.bench import runner as bench

OLD_COUNT = "ded26e4"  # the last commit with the earlier count


def _old_bench(repo: Path):
    """legrace.bench.runner as of OLD_COUNT, loaded from git next to today's."""
    text = subprocess.run(["git", "-C", str(repo), "show", f"{OLD_COUNT}:src/legrace/bench.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "bench_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("bench_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _per_sample(macs, report: dict, mode: str, with_engine: bool) -> int:
    torch.manual_seed(0)
    size = report["input_size"]
    model = bench.build_model(report["model"], num_classes=10, image_size=size)
    x, y = torch.randn(1, 3, size, size), torch.zeros(1, dtype=torch.long)
    run = bench.ModeRun(mode, model, x, y, train=report["train"], rank=report["rank"], accelerator="cpu",
                        iters=report["power_iters"])
    extra = (run.engine,) if with_engine else ()
    return macs(run.net, run.x, mode, report["rank"], report["power_iters"], report["train"], frozenset(),
                *extra)["trusted_macs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="folders holding a bench.json")
    args = p.parse_args()
    reports = {}
    for folder in args.runs:  # all checked before any work
        path = Path(folder) / "bench.json"
        if not path.is_file():
            raise SystemExit(f"{folder}: no bench.json")
        reports[folder] = json.loads(path.read_text())
        if not {"tee_only", "legrace"} <= {m["mode"] for m in reports[folder]["modes"]}:
            raise SystemExit(f"{folder}: the run has no tee_only and legrace modes to compare")
    old = _old_bench(Path(__file__).resolve().parents[1])  # a frozen copy: its count is still named _macs
    for folder, report in reports.items():
        stored = {m["mode"]: m["trusted_macs"] for m in report["modes"]}
        now = {mode: stored[mode] + report["batch_size"] * (_per_sample(bench.count_macs, report, mode, True)
                                                            - _per_sample(old._macs, report, mode, False))
               for mode in ("tee_only", "legrace")}
        print(f"{folder}: TEE-only ÷ legrace trusted MACs {stored['tee_only'] / stored['legrace']:.2f}x as stored, "
              f"{now['tee_only'] / now['legrace']:.2f}x counted now ({now['tee_only'] / 1e9:.1f} G against "
              f"{now['legrace'] / 1e9:.1f} G)")


if __name__ == "__main__":
    sys.exit(main())
