import pytest
import torch

from legrace.trusted.decompose import (
    channel_entropy, decompose, energy_kept, entropy_rank, rank_for_point, validate_rank,
)


def lowrank_batch(B=4, N=12, h=6, w=5, R=3, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, N, R, generator=g, dtype=torch.float64)
    V = torch.randn(B, R, h * w, generator=g, dtype=torch.float64)
    return ((A @ V) + noise * torch.randn(B, N, h * w, generator=g, dtype=torch.float64)).reshape(B, N, h, w)


@pytest.mark.parametrize("method", ["light", "deflation", "exact"])
@pytest.mark.parametrize("rank", [0, 1, 3, 12, 50, "auto"])
def test_main_plus_residual_is_x(method, rank):
    x = lowrank_batch()
    d = decompose(x, rank, method=method)
    x_main = (d.A @ d.V).reshape_as(x)
    assert d.A.shape[:2] == (4, 12) and d.V.shape[0] == 4 and d.V.shape[2] == 30
    assert d.rank == (min(16 if rank == "auto" else rank, 12))
    assert torch.allclose(x_main + d.X_res, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["light", "deflation", "exact"])
def test_residual_is_small_for_lowrank_data(method):
    x = lowrank_batch(noise=1e-3)
    d = decompose(x, 3, method=method, iters=2)
    ratio = d.X_res.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert ratio.max() < 1e-2
    # and it is close to the optimum that the exact SVD reaches
    best = decompose(x, 3, method="exact").X_res.flatten(1).norm(dim=1)
    assert (d.X_res.flatten(1).norm(dim=1) <= best * 1.05 + 1e-12).all()


def test_exact_keeps_more_energy_with_more_rank():
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    norms = [decompose(x, r, method="exact").X_res.norm() for r in range(0, 9)]
    assert all(a >= b for a, b in zip(norms, norms[1:]))
    assert norms[-1] < 1e-10 * norms[0]


def test_rank_zero_releases_whole_activation():
    x = torch.randn(2, 3, 4, 4)
    d = decompose(x, 0)
    assert d.rank == 0 and torch.equal(d.X_res, x)


@pytest.mark.parametrize("method", ["light", "deflation", "exact"])
def test_each_sample_depends_only_on_itself(method):
    # DESIGN section 7: changing sample 1 must not move sample 0's decomposition.
    x = lowrank_batch(noise=0.3)
    y = x.clone()
    y[1] = torch.randn_like(y[1]) * 5
    for rank in (2, "auto"):
        a, b = decompose(x, rank, method=method), decompose(y, rank, method=method)
        assert torch.allclose(a.X_res[0], b.X_res[0], atol=1e-12)
        assert torch.allclose(a.X_res[2:], b.X_res[2:], atol=1e-12)
        assert not torch.allclose(a.X_res[1], b.X_res[1])


def test_entropy_of_flat_and_peaked_spectra():
    flat = torch.ones(1, 8, dtype=torch.float64)
    assert channel_entropy(flat).item() == pytest.approx(3.0)
    peaked = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    assert channel_entropy(peaked).item() == pytest.approx(0.0)


def test_entropy_rank_keeps_97_percent_for_geometric_spectrum():
    # Theorem 1 of the paper: R = ceil(2^mu) keeps >= 97% of the energy for geometric decay.
    N, hw = 16, 64
    U, _ = torch.linalg.qr(torch.randn(N, N, dtype=torch.float64))
    Vh, _ = torch.linalg.qr(torch.randn(hw, N, dtype=torch.float64))
    for q in (0.3, 0.5, 0.7, 0.85):
        s = q ** torch.arange(N, dtype=torch.float64)
        X = (U * s) @ Vh.T
        R = int(entropy_rank(X[None], max_rank=N))
        assert energy_kept(X.reshape(1, N, 8, 8), R).item() >= 0.97


def test_auto_rank_is_per_sample():
    x = torch.cat([lowrank_batch(B=1, R=1, noise=0), lowrank_batch(B=1, R=6, noise=0, seed=1)])
    d = decompose(x, "auto", method="exact")
    used = (d.A.abs().sum(1) > 0).sum(1)
    assert used[0] < used[1]
    assert torch.allclose((d.A @ d.V).reshape_as(x) + d.X_res, x, atol=1e-12)


def test_rank_policies():
    assert rank_for_point(4, 2, 5) == 4
    assert rank_for_point("auto", 0, 5) == "auto"
    assert rank_for_point([1, 2, 3], 1, 3) == 2
    with pytest.raises(ValueError, match="3 entries but the model has 5"):
        rank_for_point([1, 2, 3], 0, 5)
    for bad in (-1, "big", [1, -2], [], True):
        with pytest.raises(ValueError):
            validate_rank(bad)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown decomposition method"):
        decompose(torch.zeros(1, 2, 2, 2), 1, method="svd")


@pytest.mark.parametrize("rank", [3, 11, "auto"])
def test_bfloat16_basis_is_still_an_exact_split(rank):
    # V kept in bfloat16 for backward: X_res is computed from the rounded V, so the split is
    # exact and the rounding only moves into the residual (where it is tiny).
    x = lowrank_batch()
    d = decompose(x, rank, basis_dtype=torch.bfloat16)
    full = decompose(x, rank)
    assert d.V.dtype == torch.bfloat16 and d.A.dtype == torch.float64
    assert torch.allclose((d.A @ d.V.double()).reshape_as(x) + d.X_res, x, rtol=0, atol=1e-12)
    grew = d.X_res.flatten(1).norm(dim=1) - full.X_res.flatten(1).norm(dim=1)
    assert (grew.abs() <= 1e-2 * x.flatten(1).norm(dim=1)).all()


def test_identity_split_keeps_x_itself_whatever_the_basis_dtype():
    # full rank (a first conv's image): V = X unrounded, X_res = 0, the plain conv bit for bit
    x = lowrank_batch()
    d = decompose(x, 12, basis_dtype=torch.bfloat16)
    assert d.V.dtype == x.dtype and torch.equal(d.V, x.reshape(4, 12, 30)) and not d.X_res.any()


@pytest.mark.parametrize("iters", [1, 2, 4])
def test_light_through_the_gram_matrix_is_the_same_iteration(monkeypatch, iters):
    import legrace.trusted.decompose as dec

    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 24, 1, 300, generator=g, dtype=torch.float64)
    X = X + torch.randn(5, 24, 1, 1, generator=g, dtype=torch.float64) * torch.rand(5, 1, 1, 300, generator=g)
    via_gram = decompose(X, 6, iters=iters)
    monkeypatch.setattr(dec, "GRAM_MAX_CHANNELS", 0)  # every sample through the passes over X
    via_x = decompose(X, 6, iters=iters)
    # orthonormal bases of the same subspace: equal up to a sign per column
    signs = (via_gram.A * via_x.A).sum(1, keepdim=True).sign()
    torch.testing.assert_close(via_gram.A, via_x.A * signs, rtol=0, atol=1e-9)
    torch.testing.assert_close(via_gram.X_res, via_x.X_res, rtol=0, atol=1e-9)


def test_light_takes_the_gram_matrix_only_for_few_channels(monkeypatch):
    import legrace.trusted.decompose as dec

    def no_passes(*args):
        raise AssertionError("iterated on X")

    monkeypatch.setattr(dec, "_own_channels", no_passes)
    decompose(torch.randn(2, dec.GRAM_MAX_CHANNELS, 8, 8), 4)
    with pytest.raises(AssertionError, match="iterated on X"):
        decompose(torch.randn(2, dec.GRAM_MAX_CHANNELS + 1, 8, 8), 4)
