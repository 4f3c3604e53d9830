"""Page faults and step times of `legrace bench`'s modes under each way of keeping (or not) the heap.

An enclave commits its heap once, so a fair CPU benchmark must not page-fault each step's
activations afresh. How glibc is told to keep freed memory matters: each setting below runs the
same modes (round robin, as `legrace bench` does) in its own process, since malloc's settings are
process-wide and a heap's history carries over from mode to mode:

    default     glibc as it comes: blocks over 32 MiB are mapped afresh and unmapped on free
    kept        legrace.trusted.heap.keep_freed_memory() (what `legrace bench` and `legrace train` do)
    trim-2gib   mallopt with both thresholds at its largest int (what legrace.trusted.heap did before):
                a free that leaves over 2 GiB at the heap's top gives it back to the OS
    tunables    GLIBC_TUNABLES with 4 GiB thresholds (what the scripts were run with before)

The settings run one after another, --rounds times (alternating their order), and each reports
the median over rounds of each mode's median step time, trusted time and minor faults per step.

    python benchmarks/heap_settings.py --model vgg16 --input-size 224 --batch-size 32 --out heap.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import add_model_arguments, count, write_results

SETTINGS = ("default", "kept", "trim-2gib", "tunables")
TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"

# one setting's run, in a fresh process: argv = setting, model, input size, batch size, modes, repeats, accelerator
_CHILD = """
import json, resource, sys
setting, model, size, batch, modes, repeats, accelerator = sys.argv[1:]
from legrace.trusted import heap
if setting == "kept":
    heap.keep_freed_memory()
elif setting == "trim-2gib":
    assert heap.set_malloc_thresholds(heap.LARGEST, heap.LARGEST)
from legrace.bench.runner import run_bench
# one warm-up round and no settling: under a setting that faults every step, the bench's settle
# rounds would only add steps (up to 4 rounds each), and these faults are what is compared
report = run_bench(model, int(size), int(batch), modes.split(","), warmup=1, repeats=int(repeats), settle_rounds=0,
                   accelerator=accelerator, log=lambda *a: None)
how = "mallopt, 2 GiB trim threshold" if setting == "trim-2gib" else heap.how_kept()
print(json.dumps({"how_kept": how, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "warmup_rounds": report["warmup_rounds"],
                  "modes": [{k: m[k] for k in ("mode", "step_seconds", "trusted_seconds", "minor_page_faults")}
                            for m in report["modes"]]}))
"""


def settings(text: str) -> list[str]:
    """argparse type: comma-separated names from SETTINGS."""
    parts = [part.strip() for part in text.split(",")]
    unknown = [part for part in parts if part not in SETTINGS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    return parts


def run_setting(setting: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if setting == "tunables":
        env["GLIBC_TUNABLES"] = TUNABLES
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    done = subprocess.run([sys.executable, "-c", _CHILD, setting, args.model, str(args.input_size),
                           str(args.batch_size), args.modes, str(args.repeats), args.accelerator],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"setting {setting} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--modes", default="tee_only,tee_only_channels_last,legrace")
    p.add_argument("--settings", type=settings, default=list(SETTINGS))
    p.add_argument("--repeats", type=count, default=3, help="timed steps per mode in each run")
    p.add_argument("--accelerator", default="cpu", help="legrace's accelerator, as `legrace bench --accelerator`")
    p.add_argument("--rounds", type=count, default=1, help="runs of each setting, in alternating order")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        raise SystemExit("heap_settings.py compares glibc's malloc settings: it needs Linux with glibc")
    runs: dict[str, list[dict]] = {s: [] for s in args.settings}
    for r in range(args.rounds):
        for setting in args.settings if r % 2 == 0 else reversed(args.settings):
            runs[setting].append(run_setting(setting, args))
            print(f"round {r + 1}: {setting} done", file=sys.stderr, flush=True)
    results = []
    for setting, done in runs.items():
        row = {"setting": setting, "how_kept": done[0]["how_kept"], "warmup_rounds": done[0]["warmup_rounds"],
               "peak_rss_mib": statistics.median(d["peak_rss_mib"] for d in done)}
        for i, mode in enumerate(m["mode"] for m in done[0]["modes"]):
            for key in ("step_seconds", "trusted_seconds", "minor_page_faults"):
                row[f"{mode} {key}"] = statistics.median(d["modes"][i][key] or 0 for d in done)
        results.append(row)
        print(f"{setting:10s} (kept by {row['how_kept'] or 'nothing'}, peak RSS {row['peak_rss_mib']:.0f} MiB): "
              + "; ".join(f"{m['mode']} step {row[m['mode'] + ' step_seconds']:.3f} s, trusted "
                          f"{row[m['mode'] + ' trusted_seconds']:.3f} s, {row[m['mode'] + ' minor_page_faults']:,.0f} faults"
                          for m in done[0]["modes"]), flush=True)
    if args.out:
        write_results(args.out, args.accelerator, [{"model": args.model, "input_size": args.input_size,
                                         "batch_size": args.batch_size, "rounds": args.rounds, "rows": results}],
                      heap_kept="per row (how_kept): each setting ran in its own process")


if __name__ == "__main__":
    main()
