"""The Gaussian mechanism that turns a private residual into something that may cross.

X_res~ = clip(X_res, C) + N(0, sigma^2 I), clip(x, C) = x * min(1, C / |x|_2) per sample,
sigma = z * C (DESIGN section 3). Neighbouring data sets differ in one sample's content, so one
release has l2 sensitivity 2C. The generator is seeded from the operating system's CSPRNG and
lives on the trusted side only; a fixed seed is for reproducible experiments, never deployment.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Optional

import torch
from torch import Tensor

from legrace.boundary import NoisedResidual


class GaussianMechanism:
    """Per-sample l2 clipping to `clip` and Gaussian noise with std `noise_multiplier * clip`."""

    def __init__(self, clip: Optional[float], noise_multiplier: float, seed: Optional[int] = None) -> None:
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be a finite number > 0 (or None for no clipping), got {clip}")
        if clip is None and noise_multiplier > 0:
            raise ValueError("noise needs a clipping bound: set clip, or noise_multiplier=0 to turn noise off")
        self.clip = clip
        self.noise_multiplier = float(noise_multiplier)
        if seed is not None:
            warnings.warn("a fixed noise seed makes the noise predictable: use it for experiments only", stacklevel=2)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))
        self.releases = 0

    @property
    def sigma(self) -> float:
        """Noise standard deviation z * C (0 when noise is off)."""
        return self.noise_multiplier * self.clip if self.clip is not None else 0.0

    @property
    def sensitivity(self) -> Optional[float]:
        """l2 sensitivity 2C of one release (None without clipping: unbounded)."""
        return 2.0 * self.clip if self.clip is not None else None

    def release(self, x_res: Tensor) -> NoisedResidual:
        """Clip each sample of x_res (B x ...) to l2 norm C and add fresh Gaussian noise."""
        x = x_res
        if self.clip is not None:
            norms = x.reshape(x.shape[0], -1).norm(dim=1)
            scale = (self.clip / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp(max=1.0)
            x = x * scale.reshape(-1, *([1] * (x.dim() - 1)))
        if self.sigma > 0:
            noise = torch.randn(x.shape, generator=self._generator, dtype=x.dtype, device="cpu")
            x = x + noise.to(x.device).mul_(self.sigma)
        self.releases += 1
        return NoisedResidual(x.contiguous(), self.clip, self.sigma)
