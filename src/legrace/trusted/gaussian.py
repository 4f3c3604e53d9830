"""The trusted side's Gaussian sampler: a ziggurat over xoshiro256++ streams, compiled by numba.

Why not torch's `normal_`: on the CPU, torch draws float32 Gaussians by Box-Muller from 24-bit
uniforms, so |z| <= sqrt(-2 ln 2^-24) = 5.77: a Gaussian truncated at 5.77 sigma, and the Gaussian
mechanism's guarantee does not survive truncation (near the edge a neighbour's output can be
impossible; the extra delta this costs is in docs/privacy.md). This sampler draws from 53-bit
uniforms, with the exact tail of Marsaglia's method: R + t is accepted when -2 ln(u2) >= t^2, and
u2 >= 2^-53, so its support reaches R + sqrt(106 ln 2) = 12.0 sigma, where that extra delta is
negligible. It also takes one 64-bit word per value in 97.2% of draws (the mean of RATIOS), with no
logarithm or cosine, and a pass without branches (the rest are completed after it).

What it does not change: the generator is not cryptographic (neither is torch's Mersenne
Twister); its 256-bit keys come from the operating system's CSPRNG, and no raw output ever
leaves the trusted side. The outputs are floats, so like every floating-point DP library
(Mironov 2012) the released values sit on a rounding lattice that an exact analysis would have
to snap; legrace does not.

A buffer is cut into chunks of CHUNK values; chunk c of the r-th buffer is drawn from its own
xoshiro256++ state, set by SplitMix64 from the keys, r and c. So a buffer's values depend on the
keys only, not on how many threads drew it, and no two chunks or buffers share a stream.
The ziggurat is Marsaglia and Tsang's (2000) with 128 strips, tables built as in Doornik (2005).
"""

from __future__ import annotations

import math

import numpy as np

from legrace.trusted.kernels import _jit, numba

CHUNK = 1 << 16
STRIPS = 128
R = 3.442619855899  # right edge of the base strip, for 128 strips (Doornik 2005)
_AREA = 9.91256303526217e-3  # area of each strip
# The largest |value| / sigma the sampler can return: the tail's t = -ln(u1) / R could reach
# 53 ln 2 / R, but is accepted only while t^2 <= -2 ln(u2) <= 2 * 53 ln 2.
SUPPORT = R + math.sqrt(106 * math.log(2.0))


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x[i]: strip i's right edge (x[0] = the base strip's equivalent width, x[128] = 0);
    ratio[i] = x[i+1] / x[i]: a draw u * x[i] with |u| < ratio[i] lies inside the density;
    density[i] = exp(-x[i]^2 / 2), the unnormalised density at x[i] (for the wedges, i >= 1)."""
    x = np.zeros(STRIPS + 1)
    f = math.exp(-0.5 * R * R)
    x[0], x[1] = _AREA / f, R
    for i in range(2, STRIPS):
        x[i] = math.sqrt(-2.0 * math.log(_AREA / x[i - 1] + f))
        f = math.exp(-0.5 * x[i] * x[i])
    return x, x[1:] / x[:-1], np.exp(-0.5 * x * x)


EDGES, RATIOS, DENSITIES = _tables()

if numba is not None:
    _U = np.uint64
    _GOLDEN, _MIX1, _MIX2 = _U(0x9E3779B97F4A7C15), _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)
    _S30, _S27, _S31, _S32, _S11 = _U(30), _U(27), _U(31), _U(32), _U(11)
    _S17, _L23, _R41, _L45, _R19, _LOW7 = _U(17), _U(23), _U(41), _U(45), _U(19), _U(0x7F)
    _TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53

    @numba.njit(inline="always")
    def _splitmix(z):  # pragma: no cover - compiled
        z = z + _GOLDEN
        z = (z ^ (z >> _S30)) * _MIX1
        z = (z ^ (z >> _S27)) * _MIX2
        return z ^ (z >> _S31)

    @numba.njit(inline="always")
    def _next(s0, s1, s2, s3):  # pragma: no cover - compiled
        """xoshiro256++ (Blackman and Vigna): one 64-bit word and the next state."""
        a = s0 + s3
        word = ((a << _L23) | (a >> _R41)) + s0
        t = s1 << _S17
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = (s3 << _L45) | (s3 >> _R19)
        return word, s0, s1, s2, s3

    @numba.njit(inline="always")
    def _open_unit(word):  # pragma: no cover - compiled
        """A uniform in (0, 1] from the word's top 53 bits: safe to take the logarithm of."""
        return (np.int64(word >> _S11) + 1) * _TO_UNIT

    @numba.njit(inline="always")
    def _tail(s0, s1, s2, s3):  # pragma: no cover - compiled
        """|N(0, 1)| conditioned on exceeding R, by Marsaglia's exact method: R + t with
        t = -ln(u1) / R, accepted when -2 ln(u2) >= t^2; u1, u2 in (0, 1] with 53 bits."""
        while True:
            w1, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
            w2, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
            t = -math.log(_open_unit(w1)) / R
            if -2.0 * math.log(_open_unit(w2)) >= t * t:
                return R + t, s0, s1, s2, s3

    @numba.njit(nogil=True)
    def _rare(word, s0, s1, s2, s3):  # pragma: no cover - compiled
        """A draw whose first point fell outside its strip's rectangle (2.8% of them): the tail
        beyond R, by Marsaglia's method, or the wedge under the density; a rejected wedge point
        starts the draw again. Returns the value and the generator's new state. The tables are
        module constants, frozen into the compiled code."""
        while True:
            i = np.int64(word & _LOW7)
            u = np.int64(word >> _S11) * (2.0 * _TO_UNIT) - 1.0
            if abs(u) < RATIOS[i]:
                return u * EDGES[i], s0, s1, s2, s3
            if i == 0:  # the base strip's overhang is the tail beyond R
                t, s0, s1, s2, s3 = _tail(s0, s1, s2, s3)
                return (-t if u < 0 else t), s0, s1, s2, s3
            x = u * EDGES[i]  # the wedge between the rectangle and the density
            w1, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
            height = DENSITIES[i + 1] + (np.int64(w1 >> _S11) * _TO_UNIT) * (DENSITIES[i] - DENSITIES[i + 1])
            if height < math.exp(-0.5 * x * x):
                return x, s0, s1, s2, s3
            word, s0, s1, s2, s3 = _next(s0, s1, s2, s3)

    @_jit
    def gaussian_fill(out, sigma, keys, release, c0, c1):  # pragma: no cover - compiled
        """out[c * CHUNK : (c + 1) * CHUNK] = sigma * N(0, 1) draws for chunks c in [c0, c1).

        Each value starts from one word; the 2.8% whose point falls outside its rectangle are
        noted and completed by _rare after the chunk's pass, from the same stream's next words.
        That keeps the pass free of branches (no mispredicted jump, no call holding the
        generator's state) and changes no value's law: each one is still one ziggurat draw.
        """
        n = out.shape[0]
        pending_at = np.empty(min(CHUNK, n), np.int64)  # at most one per value of a chunk
        pending_word = np.empty(min(CHUNK, n), np.uint64)
        for c in range(c0, c1):
            m = _splitmix((np.uint64(release) << _S32) | np.uint64(c))  # distinct per (buffer, chunk)
            s0, s1, s2, s3 = (_splitmix(keys[0] ^ m), _splitmix(keys[1] ^ m),
                              _splitmix(keys[2] ^ m), _splitmix(keys[3] ^ m))
            if (s0 | s1 | s2 | s3) == 0:  # the one state xoshiro cannot leave
                s0 = _GOLDEN
            pending = 0
            for k in range(c * CHUNK, min((c + 1) * CHUNK, n)):
                word, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
                i = np.int64(word & _LOW7)
                u = np.int64(word >> _S11) * (2.0 * _TO_UNIT) - 1.0  # [-1, 1), 53 bits
                out[k] = u * EDGES[i] * sigma  # right when inside strip i's rectangle: 97.2% of draws
                pending_at[pending] = k  # noted always, kept only when outside (no branch)
                pending_word[pending] = word
                pending += abs(u) >= RATIOS[i]
            for j in range(pending):
                v, s0, s1, s2, s3 = _rare(pending_word[j], s0, s1, s2, s3)
                out[pending_at[j]] = v * sigma
        return 0

else:  # pragma: no cover - numba missing
    gaussian_fill = None

_works: dict[np.dtype, bool] = {}


def usable(dtype: np.dtype) -> bool:
    """Whether the compiled sampler runs here for this dtype (checked once per process on a
    small draw); where it does not, legrace.trusted.mechanism falls back to torch's sampler."""
    if gaussian_fill is None:
        return False
    dtype = np.dtype(dtype)
    if dtype not in _works:
        try:
            out = np.empty(4096, dtype)
            gaussian_fill(out, 1.0, np.arange(1, 5, dtype=np.uint64), 0, 0, 1)
            _works[dtype] = bool(np.isfinite(out).all() and 0.8 < out.std() < 1.2)
        except Exception:  # pragma: no cover - depends on the environment
            _works[dtype] = False
    return _works[dtype]
