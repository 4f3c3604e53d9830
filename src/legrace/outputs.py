"""Where legrace's commands write their results: a folder, made before the work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Union


def output_folder(path: Union[str, Path]) -> Path:
    """Make (or reuse) the folder `path` and return it.

    Commands call this before they train, time or attack, so a path that is a file or cannot be
    made fails at once with a message, not with a traceback after minutes of work whose results
    would then be lost.
    """
    if not str(path).strip():  # Path("") is ".": results would land where the command ran
        raise ValueError("the output folder is empty; give one with --out (e.g. --out runs/x)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {str(path)!r} is a file; choose a folder with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".legrace-write-check-"):  # a folder that exists but cannot be written to
            pass
    except OSError as err:
        raise ValueError(f"cannot write in the output folder {str(path)!r}: {err.strerror or err}") from None
    return out
