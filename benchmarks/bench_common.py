"""What the benchmark scripts share: `--threads` and `--keep-heap`, `--models` specs, the JSON they write."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from legrace.options import positive
from legrace.trusted.heap import how_kept, keep_freed_memory
from legrace.models import build_model


# steps, repeats and sizes: at least 1, so that a run never ends in an empty median or a division
# by zero after its model was built (legrace's own commands use the same argparse type)
count = positive(int)


def counts(text: str) -> list[int]:
    """argparse type: comma-separated counts, each at least 1 (e.g. sizes or micro-batch counts)."""
    return [count(part) for part in text.split(",")]


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """--threads and --keep-heap/--no-keep-heap: how the script's process runs (apply_process_arguments)."""
    parser.add_argument("--threads", type=count, default=None,
                        help="torch threads per process (a busy machine: 1 avoids OpenMP oversubscription)")
    parser.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                        help="keep freed memory for reuse, as an enclave's fixed heap and `legrace bench` do "
                             "(legrace.trusted.heap; default: on). --no-keep-heap times glibc's default, which "
                             "page-faults every large block afresh")


def apply_process_arguments(args: argparse.Namespace) -> None:
    if args.keep_heap:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the worker processes


def add_rounds_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """--rounds (interleaved timed rounds), --out and the process arguments, for the scripts that
    time several ways of one computation side by side."""
    parser.add_argument("--rounds", type=count, default=rounds, help="interleaved timed rounds (after one warm-up)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    """--model, --input-size and --batch-size: the synthetic batch of `model_and_batch`."""
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--input-size", type=count, default=224)
    parser.add_argument("--batch-size", type=count, default=batch_size)


def model_and_batch(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model and a synthetic batch (images and labels, 10 classes) that args name, seeded."""
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, image_size=args.input_size)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    return model, x, torch.randint(0, 10, (args.batch_size,))


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of work, after one untimed warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_run_arguments(parser: argparse.ArgumentParser, models: str) -> None:
    """The options of the scripts that compare engines through a worker: --models, --accelerator,
    --steps, --out, --threads and --keep-heap."""
    parser.add_argument("--models", default=models, help="NAME:INPUT_SIZE:BATCH, comma-separated")
    parser.add_argument("--accelerator", default="process")
    parser.add_argument("--steps", type=count, default=5)
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    add_process_arguments(parser)


def model_specs(text: str) -> list[tuple[str, int, int]]:
    """'vgg16:112:8,resnet18:112:16' as (model, input size, batch size) triples."""
    specs = []
    for spec in text.split(","):
        parts = spec.split(":")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()) or min(int(parts[1]), int(parts[2])) < 1:
            raise SystemExit(f"--models: {spec!r} is not NAME:INPUT_SIZE:BATCH (e.g. vgg16:112:8)")
        specs.append((parts[0], int(parts[1]), int(parts[2])))
    return specs


def write_results(path: str, accelerator: str, results: list[dict], heap_kept: Optional[str] = None) -> None:
    """The results as JSON at `path`, with the torch version, threads and heap they were measured with.

    heap_kept: how the timed processes kept the heap, when they were not this one (default: how
    this process keeps it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "heap_kept": heap_kept or how_kept(),
              "accelerator": accelerator, "results": results}
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
