import math

import pytest
import torch

from legrace.boundary.messages import NoisedResidual
from legrace.trusted.mechanism import GaussianMechanism, GaussianStreams


def test_clip_bounds_each_sample_and_keeps_small_ones():
    m = GaussianMechanism(clip=1.0, noise_multiplier=0.0)
    x = torch.stack([torch.full((2, 3, 3), 5.0), torch.full((2, 3, 3), 0.01)])
    r = m.release(x)
    assert isinstance(r, NoisedResidual)
    norms = r.tensor.flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(r.tensor[1], x[1])  # under the bound: untouched
    # direction kept
    assert torch.allclose(r.tensor[0] / norms[0], x[0] / x[0].norm())


def test_noise_has_std_z_times_c_and_is_fresh():
    m = GaussianMechanism(clip=0.5, noise_multiplier=3.0)
    assert m.sigma == 1.5 and m.sensitivity == 1.0
    zero = torch.zeros(4, 8, 32, 32)
    a, b = m.release(zero).tensor, m.release(zero).tensor
    assert a.std().item() == pytest.approx(1.5, rel=0.02)
    assert abs(a.mean().item()) < 0.05  # 6 standard errors
    assert not torch.equal(a, b)  # never reused


def test_generators_are_secretly_seeded():
    a = GaussianMechanism(1.0, 1.0).release(torch.zeros(1, 100)).tensor
    b = GaussianMechanism(1.0, 1.0).release(torch.zeros(1, 100)).tensor
    assert not torch.equal(a, b)
    with pytest.warns(UserWarning, match="experiments only"):
        c = GaussianMechanism(1.0, 1.0, seed=7).release(torch.zeros(1, 100)).tensor
    with pytest.warns(UserWarning):
        d = GaussianMechanism(1.0, 1.0, seed=7).release(torch.zeros(1, 100)).tensor
    assert torch.equal(c, d)


def test_noise_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    GaussianMechanism(1.0, 2.0).release(torch.zeros(2, 10))
    assert torch.equal(torch.rand(3), expected)


def test_off_is_identity():
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(GaussianMechanism(None, 0.0).release(x).tensor, x)


@pytest.mark.parametrize("clip,z,msg", [(None, 1.0, "noise needs a clipping bound"), (-1.0, 1.0, "clip must be"),
                                        (1.0, -0.5, "noise_multiplier must be"), (1.0, math.nan, "noise_multiplier")])
def test_bad_settings(clip, z, msg):
    with pytest.raises(ValueError, match=msg):
        GaussianMechanism(clip, z)


def test_noise_pool_prepares_the_next_releases_and_never_reuses():
    import time

    m = GaussianMechanism(clip=1.0, noise_multiplier=2.0)
    m.start_pool(ahead=2)
    shapes = [(4, 3, 8, 8), (4, 16, 4, 4), (4, 16, 4, 4), (4, 32, 2, 2)]
    seen = []
    for _ in range(4):  # four "steps"; the pool learns the order after the first
        for shape in shapes:
            seen.append(m.release(torch.zeros(shape)).tensor)
            time.sleep(0.01)  # the accelerator's turn: the pool fills meanwhile
    pool = m._pool
    assert sum(len(v) for v in pool._ready.values()) <= 2
    assert pool._plan == [(shapes[0], torch.float32), (shapes[1], torch.float32)]  # next step
    flat = torch.cat([t.flatten() for t in seen])
    assert flat.std().item() == pytest.approx(2.0, rel=0.05)
    assert len({t.flatten()[:4].tolist().__repr__() for t in seen}) == len(seen)  # all fresh
    m.close()


def test_large_buffers_are_drawn_by_independent_streams_with_the_right_law():
    # Split across generators, a large buffer is still N(0, sigma^2), its parts are independent
    # (no stream repeats another's values), and a fixed seed reproduces it.
    streams = GaussianStreams(2, seed=11)
    n = 2 * GaussianStreams.MIN_SPLIT
    a = streams.normal(torch.Size([n]), torch.float32, 2.0)
    half = n // 2
    assert a.std().item() == pytest.approx(2.0, rel=0.01) and abs(a.mean().item()) < 0.02
    assert a[:half].std().item() == pytest.approx(a[half:].std().item(), rel=0.02)
    assert abs(torch.corrcoef(torch.stack([a[:half], a[half:]]))[0, 1].item()) < 0.01
    assert not torch.equal(a[:1000], a[half:half + 1000])
    assert torch.equal(a, GaussianStreams(2, seed=11).normal(torch.Size([n]), torch.float32, 2.0))
    assert not torch.equal(a, streams.normal(torch.Size([n]), torch.float32, 2.0))  # fresh each call
    streams.close()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_residual_with_nan_or_inf_is_never_released(bad):
    # inf * (C / inf) = inf * 0 = NaN: the element would cross unclipped as a marker of its place
    x = torch.ones(3, 2, 4, 4)
    x[1, 0, 2, 2] = bad
    for z in (0.0, 1.0):
        with pytest.raises(ValueError, match="NaN or inf"):
            GaussianMechanism(clip=1.0, noise_multiplier=z).release(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_residual_is_clipped_to_c_in_float32(dtype):
    # clipped in its own precision, a bf16 residual's norm passed C by up to 0.8%: more than accounted
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 17, 17, generator=g) * 5).to(dtype)
    m = GaussianMechanism(clip=0.7, noise_multiplier=0.0)
    released = m.release(x).tensor
    assert released.dtype == dtype  # rounded back after clipping: the accelerator's conv runs in dtype
    clipped = x.float() * (0.7 / x.float().flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    assert clipped.flatten(1).norm(dim=1).max() <= 0.7 * (1 + 1e-6)
    assert torch.equal(released, clipped.to(dtype))  # that clip, rounded only after it
    noisy = GaussianMechanism(clip=0.7, noise_multiplier=1.0, seed=1).release(x).tensor
    assert noisy.dtype == dtype and torch.isfinite(noisy).all()
