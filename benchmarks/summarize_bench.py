"""One markdown table of every bench.json under a folder (the closing-note table of issue 4), and
a second one checking each run against issue 4's targets.

The ratios against TEE-only are the report's own: against the faster of the TEE-only runs for
time (legrace's tee_only or plain PyTorch in channels_last), the leaner for memory. Where the
folder also holds benchmarks/shared_work.py's JSON for the same model, size, batch and threads
(its top level, as gpu_bench.sh and cpu_bench.sh write it), each time target's row shows the cap
that TEE-only's work outside the split convs puts on that ratio on this host, for any split."""

import argparse
import json
from pathlib import Path
from typing import Optional


# Issue 4's targets (stated for 224x224, batch 32, training): TEE-only step / legrace's trusted time
TIME_TARGETS = {"vgg16": 15.0, "vgg19": 15.0, "resnet18": 10.0, "resnet34": 10.0}
MEMORY_TARGET = 8.0  # TEE-only's trusted memory / legrace's, at least
GPU_STEP_TARGET = 15.0  # with a GPU: TEE-only step / legrace step, at least
GPU_ONLY_TARGET = 5.0  # with a GPU: legrace step / GPU-only step, at most
PAPER_VGG19_INFERENCE = 11.2  # the paper's VGG-19 inference speedup: a reference, not a target


def _cell(ratio: dict, key: str, digits: int) -> str:
    """A ratio for the table, empty where the run has none (no gpu_only mode, inference memory)."""
    return f"{ratio[key]:.{digits}f}" if key in ratio else ""


def _warmup_cell(report: dict) -> str:
    """Untimed rounds before the timed ones, marked where a mode still faulted fresh pages after
    them (empty for runs made before bench counted them)."""
    if "warmup_rounds" not in report:
        return ""
    return f"{report['warmup_rounds']}" + (" (heap still growing)" if report.get("heap_settled") is False else "")


def shared_work_caps(folder: Path) -> dict[tuple, float]:
    """shared_work.py's caps in the folder, by (model, train, input size, batch, threads): against
    the faster TEE-only baseline where the file has it."""
    caps = {}
    for f in sorted(folder.glob("*.json")):
        try:
            results = json.loads(f.read_text()).get("results") or []
            for r in results:
                key = tuple(r.get(k) for k in ("model", "train", "input_size", "batch_size", "threads"))
                cap = r.get("bound_fastest", r.get("bound"))
                if "shared_seconds" in r and None not in key and cap is not None:
                    caps[key] = cap
        except (ValueError, AttributeError, TypeError):  # not JSON, or not shared_work.py's
            continue
    return caps


def target_rows(name: str, report: dict, cap: Optional[float] = None) -> list[list[str]]:
    """[run, target, measured, met, cap] for each of issue 4's targets that this run can be checked
    against; cap: shared_work.py's bound on this run's TEE-only time ratios, if known."""
    ratio, model, train = report["ratios"], report["model"], report["train"]
    rows = []

    def check(target: str, key: str, ok) -> None:
        if key in ratio:
            capped = cap is not None and key.startswith("tee_only_step /")
            rows.append([name, target, f"{ratio[key]:.2f}x", "yes" if ok(ratio[key]) else "no",
                         f"{cap:.1f}x" if capped else ""])

    # a run with a GPU: gpu_only timed on the accelerator's device, a CUDA one (gpu_only on the CPU
    # is only a reference for the split's overhead, not what the GPU targets are about)
    gpu = "legrace_step / gpu_only_step" in ratio and "cuda" in str(report.get("accelerator", ""))
    if train and model in TIME_TARGETS:
        goal = TIME_TARGETS[model]
        check(f"TEE-only step / trusted time >= {goal:g}x", "tee_only_step / legrace_trusted", lambda r: r >= goal)
    if train:
        check(f"TEE-only memory / trusted memory >= {MEMORY_TARGET:g}x", "tee_only_memory / legrace_trusted_memory",
              lambda r: r >= MEMORY_TARGET)
    if train and gpu:
        check(f"TEE-only step / legrace step >= {GPU_STEP_TARGET:g}x", "tee_only_step / legrace_step",
              lambda r: r >= GPU_STEP_TARGET)
        check(f"legrace step / GPU-only step <= {GPU_ONLY_TARGET:g}x", "legrace_step / gpu_only_step",
              lambda r: r <= GPU_ONLY_TARGET)
    if not train and model == "vgg19":  # the paper's number is its whole step, with its GPU
        key = "tee_only_step / legrace_step" if gpu else "tee_only_step / legrace_trusted"
        what = "legrace step" if gpu else "trusted time"
        check(f"inference: TEE-only step / {what} (paper: {PAPER_VGG19_INFERENCE}x)", key,
              lambda r: r >= PAPER_VGG19_INFERENCE)
    return rows


def main(folder: str) -> None:
    rows, checks, sizes = [], [], set()
    found = sorted(Path(folder).glob("*/bench.json"))
    if not found:
        raise SystemExit(f"no bench runs to summarise: {folder!r} holds no */bench.json")
    caps = shared_work_caps(Path(folder))
    for f in found:
        r = json.loads(f.read_text())
        modes = {m["mode"]: m for m in r["modes"]}
        tee, leg, gpu = modes.get("tee_only"), modes.get("legrace"), modes.get("gpu_only")
        tee_cl = modes.get("tee_only_channels_last")
        ratio = r["ratios"]
        rows.append([
            f.parent.name, f"{r['model']} {'train' if r['train'] else 'infer'}", str(r["batch_size"]),
            f"{tee['step_seconds']:.3f}" if tee else "",
            f"{tee_cl['step_seconds']:.3f}" if tee_cl else "",
            f"{leg['step_seconds']:.3f}" if leg else "", f"{leg['trusted_seconds']:.3f}" if leg else "",
            f"{gpu['step_seconds']:.4f}" if gpu else "",
            _cell(ratio, "tee_only_step / legrace_trusted", 2),
            _cell(ratio, "tee_only_step / legrace_step", 2),
            _cell(ratio, "legrace_step / gpu_only_step", 2),
            _cell(ratio, "tee_only_macs / legrace_trusted_macs", 1),
            _cell(ratio, "tee_only_memory / legrace_trusted_memory", 1),
            {True: "on", False: "off"}.get(r.get("overlap"), ""),
            str(r.get("threads", "")),
            _warmup_cell(r),
        ])
        cap = caps.get((r["model"], r["train"], r["input_size"], r["batch_size"], r.get("threads")))
        checks += target_rows(f.parent.name, r, cap)
        sizes.add((r["input_size"], r["batch_size"]))
        machine = f"{r.get('cpu', '?')}, torch {r['torch']}, accelerator {r['accelerator']}"
    head = ["run", "model", "batch", "tee_only step s", "tee_only_channels_last step s", "legrace step s",
            "legrace trusted s", "gpu_only step s",
            "tee / legrace trusted", "tee / legrace step", "legrace / gpu_only step", "tee / legrace trusted MACs",
            "tee / legrace trusted memory", "overlap", "threads", "warm-up rounds"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nmachine: {machine}")
    if checks:
        at = ", ".join(f"{size}x{size} batch {batch}" for size, batch in sorted(sizes))
        print(f"\nIssue 4's targets (stated for 224x224, batch 32; these runs: {at}):\n")
        print("| run | target | measured | met | cap for any split on this host |\n|---|---|---|---|---|")
        for row in checks:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="runs/cpu-bench",
                        help="the folder whose */bench.json runs to summarise (default runs/cpu-bench)")
    main(parser.parse_args().folder)
