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


def _shown(value) -> str:
    """A default as one would type it: 1e-05, 0.05, 1,8,64 (a tuple), on/off (a bool)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that ends each option's line with the default the parser holds, so the text cannot
    drift from what runs: a flag reads on or off; an option whose default is None either says in its
    own help what happens without it ('default: ...') or reads 'default: none'. Descriptions keep
    their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
                or "%(default)" in help:
            return help
        if action.default is None and (action.nargs != 0 or action.const is None):
            return help if "default" in help else help + " (default: none)"
        shown = _shown(action.default == action.const) if action.nargs == 0 and action.const is not None \
            else _shown(action.default)  # store_true/false: on when the flag's value is the default
        return f"{help} (default: {shown.replace('%', '%%')})"


def add_threads(p: argparse.ArgumentParser, more: str = "") -> None:
    """--threads N, torch's CPU threads; the command line sets them (use_threads) before the
    command starts any work, so every thread pool the command builds is sized by them."""
    p.add_argument("--threads", type=positive(int), default=None, help=f"torch CPU threads{more} (default: torch's)")


def use_threads(args: argparse.Namespace) -> None:
    """Apply --threads, if the command has it and it was given, to the calling thread."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        import torch  # here, so `legrace --help` stays quick

        torch.set_num_threads(threads)
