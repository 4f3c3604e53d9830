"""The Gaussian mechanism that turns a private residual into something that may cross.

X_res~ = clip(X_res, C) + N(0, sigma^2 I), clip(x, C) = x * min(1, C / |x|_2) per sample,
sigma = z * C (DESIGN section 3). Neighbouring data sets differ in one sample's content, so one
release has l2 sensitivity 2C. The noise comes from legrace.trusted.gaussian's sampler (not torch's,
whose float32 Gaussians stop at 5.77 sigma), keyed from the operating system's CSPRNG, and lives
on the trusted side only; a fixed seed is for reproducible experiments, never deployment.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from legrace.trusted import gaussian
from legrace.boundary.messages import NoisedResidual


def derive_seed(seed: int, *tags: Union[int, str]) -> int:
    """A fixed seed for one use of a fixed noise seed (a thread, a resumed run, an evaluation).

    Hashed, not offset: with offsets, one run's seed + k would be another's seed + 0 and replay its
    noise, which cancels in the difference of two releases. Fixed seeds are for experiments only.
    """
    words = [int(seed) % 2**64] + [t % 2**64 if isinstance(t, int)
                                   else int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
                                   for t in tags]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


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
        self._streams = GaussianStreams(torch.get_num_threads(), None if seed is None else int(seed))
        self._seed = None if seed is None else int(seed)
        self._pool: Optional[NoisePool] = None
        # Draw into page-locked memory, set by the engine for an in-process CUDA accelerator: the
        # noised residual then goes to the GPU by DMA, with no copy into a pinned buffer first.
        self.pinned_output = False

    @property
    def sigma(self) -> float:
        """Noise standard deviation z * C (0 when noise is off)."""
        return self.noise_multiplier * self.clip if self.clip is not None else 0.0

    @property
    def sensitivity(self) -> Optional[float]:
        """l2 sensitivity 2C of one release (None without clipping: unbounded)."""
        return 2.0 * self.clip if self.clip is not None else None

    def release(self, x_res: Tensor, wire_dtype: Optional[torch.dtype] = None) -> NoisedResidual:
        """Clip each sample of x_res (B x ...) to l2 norm C and add fresh Gaussian noise.

        wire_dtype: round the noised residual to this dtype for the crossing (e.g. bfloat16,
        half the bytes). Rounding after the noise is post-processing: it costs no privacy.
        A half-precision residual (a model in bfloat16 or float16) is clipped and noised in
        float32, then rounded back: clipped in its own precision, its norm can pass C by ~1%.
        """
        dtype = x_res.dtype
        if dtype not in (torch.float32, torch.float64):
            x_res = x_res.float()
        scale = None
        if self.clip is not None:
            norms = x_res.reshape(x_res.shape[0], -1).norm(dim=1)
            if not bool(torch.isfinite(norms).all()):  # inf * 0 is NaN: clipping would not bound it
                raise ValueError(
                    "a residual holds NaN or inf values (has training diverged?): clipping cannot bound it, "
                    "so it is not released; lower the learning rate or check the inputs")
            scale = (self.clip / norms.clamp_min(torch.finfo(x_res.dtype).tiny)).clamp(max=1.0)
            scale = scale.reshape(-1, *([1] * (x_res.dim() - 1)))
        if self.sigma > 0:
            out = self.draw_noise(x_res.shape, x_res.dtype).to(x_res.device)
            out = out.addcmul_(x_res, scale) if scale is not None else out.add_(x_res)
        else:
            out = x_res * scale if scale is not None else x_res
        if out.dtype != dtype:
            out = out.to(dtype)
        if wire_dtype is not None and wire_dtype != out.dtype:
            out = out.to(wire_dtype)
        return NoisedResidual(out, self.clip, self.sigma)

    def draw_noise(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """A fresh N(0, sigma^2) buffer, used once: from the pool when one is ready. `release`
        draws through it; public so that benchmarks can time the draw alone."""
        if self._pool is not None:
            ready = self._pool.take(shape, dtype)
            if ready is not None:
                return ready
        return self._streams.normal(shape, dtype, self.sigma, self.pinned_output)

    @property
    def sampler(self) -> str:
        """Which sampler draws this mechanism's float32 noise: "ziggurat" (legrace.trusted.gaussian) or
        "torch" (truncated at 5.77 sigma; where numba is missing or cannot build the kernel)."""
        return self._streams.sampler

    @property
    def noise_thread_seconds(self) -> float:
        """Time the background thread has spent drawing noise so far (0 without one)."""
        return self._pool.busy_seconds if self._pool is not None else 0.0

    def start_pool(self, ahead: int = 2) -> None:
        """Generate noise ahead of time in a background thread, off the critical path.

        Noise does not depend on data (DESIGN section 7), so each release's noise can be drawn
        while the trusted side waits for the accelerator. Every buffer is used exactly once.
        """
        if self._pool is None and self.sigma > 0:
            self._pool = NoisePool(self.sigma, ahead, None if self._seed is None else derive_seed(self._seed, "pool"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._streams.close()


class GaussianStreams:
    """N(0, sigma^2) buffers drawn on several threads at once.

    With numba, by legrace.trusted.gaussian's ziggurat: chunks of a buffer are shared between n threads,
    and its values depend only on the keys (drawn from the CSPRNG, or derived from a fixed seed)
    and on how many buffers came before, not on n. Without numba, by torch's `normal_`, whose
    Mersenne Twister is sequential: the buffer is split into n parts, each with its own
    generator, and a warning says that torch's float32 draws are truncated at 5.77 sigma.
    Small buffers are drawn on the calling thread alone.
    """

    MIN_SPLIT = 1 << 18  # below this many values threads cost more than they save

    def __init__(self, n: int, seed: Optional[int], sampler: str = "ziggurat") -> None:
        """sampler="torch" draws with torch even where the ziggurat works: for comparisons only."""
        if sampler not in ("ziggurat", "torch"):
            raise ValueError(f"sampler must be 'ziggurat' or 'torch', got {sampler!r}")
        self._sampler = sampler
        self._n = max(1, n)
        self._seed = seed
        self._epoch = 0  # how many times the keys were renewed
        self._keys = self._new_keys()
        self._buffers = 0
        self._lock = threading.Lock()
        self._generators: list[torch.Generator] = []  # torch's sampler, made on first use
        self._threads: Optional[ThreadPoolExecutor] = None

    @property
    def sampler(self) -> str:
        """The sampler that draws float32 buffers here (the ziggurat unless asked for torch's or
        unusable)."""
        return "ziggurat" if self._ziggurat_draws(torch.float32) else "torch"

    def _ziggurat_draws(self, dtype: torch.dtype) -> bool:
        return self._sampler == "ziggurat" and gaussian.usable(np.float32 if dtype == torch.float32 else np.float64)

    def _new_keys(self) -> np.ndarray:
        if self._seed is None:
            return np.array([secrets.randbits(64) for _ in range(4)], dtype=np.uint64)
        rng = np.random.Generator(np.random.SFC64([self._seed, self._epoch]))  # reproducible experiments only
        return rng.integers(0, 2**64, size=4, dtype=np.uint64)

    def _run(self, jobs: list) -> None:
        """Run the callables in jobs, the first on this thread and the others on helpers."""
        if len(jobs) > 1 and self._threads is None:
            self._threads = ThreadPoolExecutor(self._n - 1, thread_name_prefix="legrace-noise")
        futures = [self._threads.submit(job) for job in jobs[1:]] if len(jobs) > 1 else []
        jobs[0]()
        for f in futures:
            f.result()

    def normal(self, shape: torch.Size, dtype: torch.dtype, sigma: float, pinned: bool = False) -> Tensor:
        direct = dtype in (torch.float32, torch.float64)
        out = torch.empty(shape, dtype=dtype if direct else torch.float32, pin_memory=pinned)
        flat = out.view(-1)
        if self._ziggurat_draws(flat.dtype):
            self._ziggurat(flat.numpy(), float(sigma))
        else:
            self._torch(flat, float(sigma))
        return out if direct else out.to(dtype)

    def _ziggurat(self, flat: np.ndarray, sigma: float) -> None:
        with self._lock:  # a stream is never used twice, even if two threads draw at once
            if self._buffers >= 1 << 32:  # the buffer counter would repeat a stream: new keys
                self._epoch, self._buffers = self._epoch + 1, 0
                self._keys = self._new_keys()
            keys, release, self._buffers = self._keys, self._buffers, self._buffers + 1
        chunks = -(-flat.size // gaussian.CHUNK)
        parts = 1 if flat.size < self.MIN_SPLIT else min(self._n, chunks)
        bounds = [chunks * p // parts for p in range(parts + 1)]
        self._run([functools.partial(gaussian.gaussian_fill, flat, sigma, keys, release, a, b)
                   for a, b in zip(bounds, bounds[1:])])

    def _torch(self, flat: Tensor, sigma: float) -> None:
        if not self._generators:  # made on first use
            if self._sampler == "ziggurat":  # asked for, but it cannot run here
                warnings.warn("legrace.trusted.gaussian's sampler is unavailable (numba missing or broken): drawing noise "
                              "with torch, whose float32 Gaussians are truncated at 5.77 sigma, which adds to "
                              "delta (see legrace.trusted.gaussian)", RuntimeWarning, stacklevel=3)
            for i in range(self._n):
                g = torch.Generator(device="cpu")
                seed = secrets.randbits(63) if self._seed is None else derive_seed(self._seed, "torch", i)
                self._generators.append(g.manual_seed(seed))
        if self._n == 1 or flat.numel() < self.MIN_SPLIT:
            flat.normal_(0.0, sigma, generator=self._generators[0])
            return
        self._run([functools.partial(part.normal_, 0.0, sigma, generator=g)
                   for part, g in zip(flat.tensor_split(self._n), self._generators)])

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None


class NoisePool:
    """Draws the noise of the next `ahead` releases in a daemon thread.

    Releases come in the same order every step (one per conv, forward order), so the pool learns
    which shape follows the last two and prepares the next ones; buffers the plan no longer needs
    are dropped (unused noise is never released), so at most `ahead` buffers wait in memory.
    """

    def __init__(self, sigma: float, ahead: int, seed: Optional[int]) -> None:
        self.sigma, self.ahead = sigma, ahead
        self._streams = GaussianStreams(1, seed)
        self._ready: dict[tuple, list[Tensor]] = {}
        self._follows: dict[tuple, tuple] = {}
        self._recent: tuple = (None, None)
        self._plan: list[tuple] = []
        self._lock = threading.Condition()
        self._stop = False
        self.busy_seconds = 0.0  # time spent drawing noise, for `legrace bench`
        self._thread = threading.Thread(target=self._fill, name="legrace-noise", daemon=True)
        self._thread.start()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> Optional[Tensor]:
        key = (tuple(shape), dtype)
        with self._lock:
            if self._recent[1] is not None:
                self._follows[self._recent] = key
            self._recent = (self._recent[1], key)
            ready = self._ready.get(key)
            buffer = ready.pop() if ready else None
            self._plan, context = [], self._recent
            for _ in range(self.ahead):
                nxt = self._follows.get(context)
                if nxt is None:
                    break
                self._plan.append(nxt)
                context = (context[1], nxt)
            for k in list(self._ready):
                del self._ready[k][self._plan.count(k):]
            self._lock.notify()
        return buffer

    def _missing(self) -> Optional[tuple]:
        for key in set(self._plan):
            if len(self._ready.get(key, [])) < self._plan.count(key):
                return key
        return None

    def _fill(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self._missing() is None:
                    self._lock.wait()
                if self._stop:
                    return
                key = self._missing()
            t0 = time.perf_counter()
            buffer = self._streams.normal(torch.Size(key[0]), key[1], self.sigma)
            with self._lock:
                self._ready.setdefault(key, []).append(buffer)
                self.busy_seconds += time.perf_counter() - t0

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)
