"""legrace.trusted.gaussian: the ziggurat is N(0, 1), its tail reaches past torch's 5.77 sigma, and a
buffer depends on the keys only, not on the thread count."""

import math

import numpy as np
import pytest
import torch

from legrace.trusted import gaussian
from legrace.trusted.mechanism import GaussianStreams

# With numba installed the sampler must work: a kernel that fails its own check would otherwise
# only show as torch's fallback and a warning.
pytestmark = pytest.mark.skipif(gaussian.numba is None, reason="numba is not installed")


def test_the_sampler_builds_and_passes_its_check_for_both_dtypes():
    assert gaussian.usable(np.float32) and gaussian.usable(np.float64)


def _upper_tail(t: float) -> float:
    return 0.5 * math.erfc(t / math.sqrt(2.0))


def _draw(n: int, keys=(1, 2, 3, 4), release: int = 0, dtype=np.float32) -> np.ndarray:
    out = np.empty(n, dtype)
    chunks = -(-n // gaussian.CHUNK)
    gaussian.gaussian_fill(out, 1.0, np.array(keys, np.uint64), release, 0, chunks)
    return out


def test_tables_cut_the_density_into_strips_of_equal_area():
    x, f = gaussian.EDGES, gaussian.DENSITIES
    assert x[1] == gaussian.R and x[-1] == 0.0 and np.all(np.diff(x[1:]) < 0)
    area = x[0] * f[1]  # the base strip: R x f(R) plus the tail, as a rectangle of width x[0]
    tail = math.sqrt(2 * math.pi) * _upper_tail(gaussian.R)
    assert area == pytest.approx(gaussian.R * f[1] + tail, rel=1e-9)
    # every strip above the base has the same area; the top one closes at x = 0 only if R fits
    strips = x[1:-1] * (f[2:] - f[1:-1])
    assert np.allclose(strips, area, rtol=1e-8, atol=0)


def test_draws_follow_the_standard_normal_law():
    n = 1 << 21
    z = _draw(n).astype(np.float64)
    assert abs(z.mean()) < 5 / math.sqrt(n) and z.std() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    # Kolmogorov-Smirnov distance to N(0, 1), against its 0.1% critical value 1.95 / sqrt(n)
    s = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    grid = np.arange(1, n + 1) / n
    assert max(np.abs(grid - cdf).max(), np.abs(grid - 1 / n - cdf).max()) < 1.95 / math.sqrt(n)
    for t in (1.0, 2.0, 3.0, gaussian.R, 4.0):  # both tails, and the rectangle/tail boundary R
        p = 2 * _upper_tail(t)
        count = np.count_nonzero(np.abs(z) > t)
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, t
    assert np.count_nonzero(z > 0) == pytest.approx(n / 2, abs=5 * math.sqrt(n) / 2)


def test_tail_is_the_exact_conditional_law_and_passes_torchs_bound():
    @gaussian.numba.njit
    def tails(n):
        s0, s1, s2, s3 = np.uint64(11), np.uint64(12), np.uint64(13), np.uint64(14)
        out = np.empty(n)
        for k in range(n):
            out[k], s0, s1, s2, s3 = gaussian._tail(s0, s1, s2, s3)
        return out

    n = 2_000_000
    t = tails(n)
    assert t.min() >= gaussian.R
    q = _upper_tail(gaussian.R)
    for edge in (3.6, 4.0, 4.5, 5.0):  # P(Z > edge | Z > R)
        p = _upper_tail(edge) / q
        assert abs(np.count_nonzero(t > edge) - n * p) < 5 * math.sqrt(n * p) + 1, edge
    # torch's float32 CPU Gaussians stop at sqrt(48 ln 2) = 5.77; a Gaussian's tail goes on
    bound = math.sqrt(48 * math.log(2))
    expected = n * _upper_tail(bound) / q
    assert 10 < expected < 50
    assert np.count_nonzero(t > bound) >= 5
    assert t.max() <= gaussian.SUPPORT


def test_the_stated_support_is_the_largest_value_the_tail_can_accept():
    # the tail accepts R + t only while t^2 <= -2 ln(u2), and u2 is at least the smallest open
    # uniform: that, not 53 ln 2 / R (14.1 sigma, the bound once stated), caps the support
    smallest = gaussian._open_unit(np.uint64(0))
    assert smallest == 2.0 ** -53
    assert gaussian.SUPPORT == pytest.approx(gaussian.R + math.sqrt(-2 * math.log(smallest)), rel=1e-12)
    assert 12.0 < gaussian.SUPPORT < 12.02


def test_a_buffer_depends_on_the_keys_not_on_the_thread_count():
    n = 3 * GaussianStreams.MIN_SPLIT + 123
    shape = torch.Size([n])
    one, three = GaussianStreams(1, seed=5), GaussianStreams(3, seed=5)
    a, b = one.normal(shape, torch.float32, 2.0), three.normal(shape, torch.float32, 2.0)
    assert torch.equal(a, b)
    assert torch.equal(one.normal(shape, torch.float32, 2.0), three.normal(shape, torch.float32, 2.0))
    assert not torch.equal(a, one.normal(shape, torch.float32, 2.0))  # the next buffer is fresh
    c = gaussian.CHUNK  # chunks are separate streams: no repeats, no correlation
    assert not torch.equal(a[:1000], a[c:c + 1000])
    assert abs(torch.corrcoef(torch.stack([a[:c], a[c:2 * c]]))[0, 1].item()) < 5 / math.sqrt(c)
    assert not torch.equal(a, GaussianStreams(1, seed=6).normal(shape, torch.float32, 2.0))
    one.close()
    three.close()


def test_dtypes_and_scale():
    streams = GaussianStreams(2, seed=1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z = streams.normal(torch.Size([4, 1000]), dtype, 3.0)
        assert z.dtype == dtype and z.shape == (4, 1000)
        assert z.float().std().item() == pytest.approx(3.0, rel=0.05)
    assert streams.normal(torch.Size([0]), torch.float32, 1.0).numel() == 0
    streams.close()


def test_without_the_sampler_torch_draws_and_says_what_that_costs(monkeypatch):
    assert GaussianStreams(1, seed=3).sampler == "ziggurat"
    assert GaussianStreams(1, seed=3, sampler="torch").sampler == "torch"
    monkeypatch.setattr(gaussian, "usable", lambda dtype: False)
    streams = GaussianStreams(2, seed=3)
    assert streams.sampler == "torch"
    with pytest.warns(RuntimeWarning, match="truncated at 5.77 sigma"):
        z = streams.normal(torch.Size([2 * GaussianStreams.MIN_SPLIT]), torch.float32, 2.0)
    assert z.std().item() == pytest.approx(2.0, rel=0.01)
    streams.close()


def test_new_keys_before_the_buffer_counter_could_repeat_a_stream():
    streams = GaussianStreams(1, seed=9)
    first = streams.normal(torch.Size([100]), torch.float32, 1.0)
    streams._buffers = 1 << 32  # as after 2^32 buffers: buffer 0's stream would come again
    again = streams.normal(torch.Size([100]), torch.float32, 1.0)
    assert streams._buffers == 1 and not torch.equal(first, again)
