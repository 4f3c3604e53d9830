"""`Settings`: what a LegRace engine does, validated once, frozen for the engine's life."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Union

import torch

from legrace.privacy.accountant import ACCOUNTANTS
from legrace.trusted.decompose import METHODS, Rank, validate_rank

MODES = ("legrace", "dp_only", "lowrank_only", "tee_only", "gpu_only")

# clip="auto": C = AUTO_NOISE_STD / z, so the noise std per coordinate is AUTO_NOISE_STD whatever
# epsilon is. Activations normalised to about unit RMS per coordinate (inputs scaled with fixed
# constants, conv inputs after BatchNorm) keep noise small beside the signal; the default uses no
# private data, so it costs no privacy (DESIGN section 9).
AUTO_NOISE_STD = 0.05

BASIS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32,  # not float16: V could overflow it
                "float64": torch.float64}


@dataclass(frozen=True)
class Settings:
    """The settings of a LegRace engine (`LegRace(**fields)` takes them as keyword arguments).

    mode: "legrace" (the method), "dp_only" (the same mechanism on the whole activation),
    "lowrank_only" (residual dropped, nothing released), "tee_only" (all on the trusted side),
    "gpu_only" (plain training on the accelerator, no privacy).
    rank: R per decomposition point: an int, a list (one per Conv2d in forward order) or "auto".
    clip: C, the per-sample l2 bound of a residual; "auto" for the data-independent default
    (AUTO_NOISE_STD / z); None for no clipping (only with noise_multiplier=0: epsilon infinite).
    noise_multiplier: z (noise std = z*C), or None to calibrate z from target_epsilon/target_delta.
    accelerator: "cpu" or a torch device such as "cuda" for an accelerator in this process;
    "process" (or "process:cuda") for a private worker process on this host (unix socket);
    "tcp://HOST:PORT" for a `legrace worker` elsewhere, which needs `secret` (default
    $LEGRACE_SECRET). accelerator_timeout: seconds to wait for one of its answers.
    verify: check every answer of the accelerator with a Freivalds test (legrace.trusted.freivalds).
    decomposition, power_iters, max_rank: how A and V are found (legrace.trusted.decompose).
    accountant: "rdp" or "prv" (Opacus). noise_seed: a fixed noise stream (tests, replays); by
    default the generator is seeded from the OS's CSPRNG and never leaves the trusted side.
    basis_dtype: the dtype V is kept in for backward ("bfloat16" halves that memory and the split
    stays exact, since the rounding moves into the residual; None: the activations' dtype).
    rebuild_outputs: keep no conv output for backward (what a BatchNorm after a conv would keep):
    rebuild it from A, V and the accelerator's stored residual. keep_outputs_mb: keep conv outputs
    up to this many MiB per forward after all, those costliest to rebuild per byte first
    (legrace.trusted.recompute).
    wire_dtype: "bfloat16" sends the noised residuals (and gets Y_res back) in half the bytes:
    rounding after the noise is post-processing, so it costs no privacy (accuracy: docs/performance.md).
    noise_ahead: draw the noise of this many upcoming releases in a background thread (0: inline).
    overlap: run the two legs of each conv concurrently (default: on, except with the in-process
    CPU accelerator, which would only take the trusted side's cores).
    pinned_memory: with an in-process CUDA accelerator, move requests and answers through
    page-locked memory (default: on there; no effect elsewhere).
    audit: a file (or open text stream) for a JSON line per crossing (legrace.boundary.audit).
    ledger_path: where the privacy ledger is kept (legrace.privacy.accountant.PrivacyLedger).
    """

    mode: str = "legrace"
    rank: Rank = 8
    clip: Union[float, str, None] = "auto"
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    target_delta: float = 1e-5
    accelerator: str = "cpu"
    secret: Optional[str] = field(default=None, repr=False)  # never printed
    accelerator_timeout: float = 120.0
    verify: bool = False
    decomposition: str = "light"
    power_iters: int = 2
    max_rank: int = 16
    accountant: str = "rdp"
    noise_seed: Optional[int] = None
    noise_ahead: Optional[int] = 0
    overlap: Optional[bool] = None
    pinned_memory: Optional[bool] = None
    basis_dtype: Optional[str] = "bfloat16"
    rebuild_outputs: bool = True
    keep_outputs_mb: float = 0.0
    wire_dtype: Optional[str] = None
    audit: Union[str, Path, IO[str], None] = None
    ledger_path: Union[str, Path, None] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.decomposition not in METHODS:
            raise ValueError(f"unknown decomposition {self.decomposition!r}; choose one of {', '.join(METHODS)}")
        if not (0 < self.target_delta < 1):
            raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta}")
        clip = self.clip
        if clip is not None and clip != "auto" and not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be a number > 0, 'auto' or None, got {clip!r}")
        if self.releases:
            z = self.noise_multiplier
            if (z is None) == (self.target_epsilon is None):
                raise ValueError("give exactly one of noise_multiplier and target_epsilon")
            if z is not None and not (z >= 0 and math.isfinite(z)):
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z}")
            if clip is None and z != 0:
                raise ValueError("clip=None (no clipping) is only allowed with noise_multiplier=0")
        mb = self.keep_outputs_mb
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not (mb >= 0 and math.isfinite(mb)):
            raise ValueError(f"keep_outputs_mb must be a finite number of MiB >= 0, got {mb!r}")
        if mb and not self.rebuild_outputs:
            raise ValueError("keep_outputs_mb is a budget for outputs that would be rebuilt; with "
                             "rebuild_outputs=False every conv output is kept already")
        timeout = self.accelerator_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"accelerator_timeout must be a finite number of seconds > 0, got {timeout!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        for name, value, least in (("power_iters", self.power_iters, 1), ("max_rank", self.max_rank, 1),
                                   ("noise_ahead", 0 if self.noise_ahead is None else self.noise_ahead, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if self.basis_dtype is not None and self.basis_dtype not in BASIS_DTYPES:
            raise ValueError(f"basis_dtype must be one of {', '.join(BASIS_DTYPES)} or None, got {self.basis_dtype!r}")
        if self.wire_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"wire_dtype must be 'bfloat16', 'float32' or None, got {self.wire_dtype!r}")
        # normalised forms, so equal settings compare equal
        object.__setattr__(self, "rank", validate_rank(self.rank))
        object.__setattr__(self, "noise_ahead", self.noise_ahead or 0)
        object.__setattr__(self, "keep_outputs_mb", float(mb))
        if self.overlap is None:
            object.__setattr__(self, "overlap", self.accelerator != "cpu")

    @property
    def releases(self) -> bool:
        """Whether this mode releases noised residuals to the accelerator (and so is accounted)."""
        return self.mode in ("legrace", "dp_only")

    @property
    def basis_torch_dtype(self) -> Optional[torch.dtype]:
        return None if self.basis_dtype is None else BASIS_DTYPES[self.basis_dtype]

    @property
    def wire_torch_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if self.wire_dtype == "bfloat16" else None

    def clip_for(self, z: float) -> Optional[float]:
        """C at noise multiplier z: the given clip, or AUTO_NOISE_STD / z for "auto"."""
        if self.clip == "auto":
            return AUTO_NOISE_STD / z if z > 0 else None
        return self.clip
