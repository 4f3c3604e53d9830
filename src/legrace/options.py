"""argparse types shared by the command line, the study and the benchmark scripts: each parses one
option's text or refuses it at parse time with a one-line message."""

from __future__ import annotations

import argparse
import math


def rank(text: str):
    if text == "auto":
        return "auto"
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an int, a comma-separated list of ints or 'auto', not {text!r}")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("ranks must be >= 0")
    return values[0] if len(values) == 1 else values


def clip(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"clip must be a number > 0, 'auto' or 'none', not {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("clip must be > 0")
    return value


def positive(kind):
    """argparse type: a number of `kind` (int or float) > 0, refused at parse time otherwise.
    Shared by the commands and the benchmark scripts."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message: "invalid int value: 'x'"
    return parse


def seed(text: str) -> int:
    """argparse type: a seed torch and numpy both take, 0 <= seed < 2^63."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2^63 - 1, got {text}")
    return value


def model_name(text: str) -> str:
    return text.strip().lower()  # 'VGG11' and ' cnn' are the same model on --resume


def mebibytes(text: str) -> float:
    """argparse type: a memory budget in MiB, a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of MiB >= 0, got {text}")
    return value
