"""Convolutions in full float32 on CUDA (no TF32): the accelerator's answers and the gpu_only
baseline then round like the trusted side's float32. Neither side of the boundary: both use it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions without TF32 on a CUDA accelerator: its answers then match the trusted
    side's float32 to about 1e-6, which verify=True checks (TF32 rounds inputs to 10 bits)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before
