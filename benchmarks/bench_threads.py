"""The benchmarks' shared `--threads` option: torch threads for this process and its workers."""

from __future__ import annotations

import argparse
import os

import torch


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (a busy machine: 1 avoids OpenMP oversubscription)")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the worker processes
