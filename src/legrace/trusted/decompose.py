"""Per-sample asymmetric decomposition X = X_main + X_res, X_main = A·V (DESIGN section 1).

Every function works on a batch but treats each sample on its own: sample i's A, V, start
vectors and rank depend only on sample i's data (DESIGN section 7), so one sample can never move
another sample's released residual.

Correctness never depends on the quality of A and V: X_res is always X - A·V, so
X_main + X_res == X whatever the method; a better A, V only makes X_res smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

METHODS = ("light", "deflation", "exact")

Rank = Union[int, str, Sequence[int]]


@dataclass
class Decomposition:
    """A (B x N x R), V (B x R x hw) and the residual X_res (same shape as the input)."""

    A: Tensor
    V: Tensor
    X_res: Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[-1]


def channel_entropy(singular_values: Tensor) -> Tensor:
    """SVD-channel entropy mu = -log2(sum_j (s_j / sum_p s_p)^2), per sample (last dim = j)."""
    total = singular_values.sum(-1, keepdim=True).clamp_min(torch.finfo(singular_values.dtype).tiny)
    p = singular_values / total
    return -torch.log2(p.square().sum(-1).clamp_min(torch.finfo(singular_values.dtype).tiny))


def entropy_rank(X: Tensor, max_rank: int) -> Tensor:
    """Per-sample R = ceil(2^mu), capped at max_rank (paper, Theorem 1). X is B x N x hw."""
    s = torch.linalg.svdvals(X)
    r = torch.ceil(torch.exp2(channel_entropy(s)) - 1e-6).long()
    return r.clamp(1, max_rank)


def _own_channels(X: Tensor, R: int) -> Tensor:
    """Warm start from the sample itself: its R highest-energy channels (B x R x hw)."""
    idx = torch.linalg.vector_norm(X, dim=-1).topk(R, dim=-1).indices
    return torch.gather(X, 1, idx.unsqueeze(-1).expand(-1, -1, X.shape[-1]))


# Up to this many channels, _light iterates on the Gram matrix X·X^T (N x N) instead of on X: it
# reads X twice instead of 1 + 2·iters times, which pays where each pass over X goes to memory;
# with more channels the Gram matrix's N^2·hw MACs cost more than the passes they save.
GRAM_MAX_CHANNELS = 64


def _light(X: Tensor, R: int, iters: int) -> tuple[Tensor, Tensor]:
    """Batched block power iteration: A = orthonormal(X·V^T), V = A^T·X.

    The block form of the paper's alternating u/v updates: all R components at once in GEMMs
    (a pass over X per half-iteration whatever R is) instead of R sequential rank-1 deflations.
    With few channels the same iteration runs through G = X·X^T: X·V^T = G·A of the previous
    A, and the warm start's X·X[idx]^T = G[:, idx], so X is read twice (G, then the last V)
    instead of 1 + 2·iters times, with the same A and V up to rounding.
    """
    if X.shape[1] <= GRAM_MAX_CHANNELS:
        G = X @ X.transpose(1, 2)
        idx = G.diagonal(dim1=1, dim2=2).topk(R, dim=-1).indices  # the channels' energies
        A = _orthonormal(torch.gather(G, 2, idx.unsqueeze(1).expand(-1, G.shape[1], -1)))
        for _ in range(max(1, iters) - 1):
            A = _orthonormal(G @ A)
        return A, A.transpose(1, 2) @ X
    V = _own_channels(X, R)
    for _ in range(max(1, iters)):
        A = _orthonormal(X @ V.transpose(1, 2))
        V = A.transpose(1, 2) @ X
    return A, V


def _orthonormal(A: Tensor) -> Tensor:
    """Orthonormal columns spanning A's (B x N x R), by Cholesky QR done twice.

    Only R x R factorisations: far faster on CPU than a batched Householder QR of small matrices.
    Orthonormal A keeps A and V well conditioned, so float32 rounding in W' = A·W and in the
    trusted weight gradient stays at the level of a plain conv.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    Q = A
    for _ in range(2):
        G = Q.transpose(1, 2) @ Q
        jitter = G.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(G.dtype).tiny)[:, None, None]
        L, _ = torch.linalg.cholesky_ex(G + eye * (jitter * 10 * torch.finfo(G.dtype).eps))
        Q = Q @ torch.linalg.inv_ex(L)[0].transpose(1, 2)
    # A rank-deficient A (dead channels after a ReLU) defeats Cholesky QR; those samples, and
    # only those, take a Householder QR.
    off = (Q.transpose(1, 2) @ Q - eye).abs().amax((1, 2))
    bad = ~(off < 1e3 * torch.finfo(A.dtype).eps)
    if bad.any():
        Q[bad] = torch.linalg.qr(A[bad])[0]
    return Q


def _deflation(X: Tensor, R: int, iters: int) -> tuple[Tensor, Tensor]:
    """The paper's light SVD: per component, alternate u = X v/|v|^2, v = X^T u/|u|^2, deflate."""
    tiny = torch.finfo(X.dtype).tiny
    Xd = X.clone()
    us, vs = [], []
    for _ in range(R):
        v = _own_channels(Xd, 1)  # B x 1 x hw
        for _ in range(max(1, iters)):
            u = (Xd @ v.transpose(1, 2)) / v.square().sum(-1, keepdim=True).clamp_min(tiny)
            v = (u.transpose(1, 2) @ Xd) / u.square().sum(1, keepdim=True).clamp_min(tiny)
        Xd = Xd - u @ v
        us.append(u)
        vs.append(v)
    return torch.cat(us, 2), torch.cat(vs, 1)


def _exact(X: Tensor, R: int) -> tuple[Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :, :R] * S[:, None, :R], Vh[:, :R]


def decompose(
    x: Tensor, rank: int | str, *, method: str = "light", iters: int = 2, max_rank: int = 16,
    basis_dtype: Optional[torch.dtype] = None,
) -> Decomposition:
    """Split a batch of conv inputs x (B x N x h x w) into A, V and X_res.

    rank: an int R (capped at min(N, hw)), or "auto" for the per-sample entropy rule
    R_i = ceil(2^mu_i) <= max_rank. For "auto" the decomposition is computed at the
    data-independent cap and each sample keeps only its own first R_i components.
    basis_dtype: store V in this (smaller) dtype. The split stays exact: X_res is computed
    from the rounded V, so A·V + X_res == X and the rounding only moves into the residual.
    V is what the trusted side keeps for backward, so this halves that memory with bfloat16.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; choose one of {METHODS}")
    B, N, h, w = x.shape
    X = x.reshape(B, N, h * w)
    auto = rank == "auto"
    R = min(max_rank if auto else int(rank), N, h * w)
    if R <= 0:
        return Decomposition(X.new_zeros(B, N, 0), X.new_zeros(B, 0, h * w), x)
    if R == N and not auto:  # full rank: the identity split is exact, free, and adds no rounding
        # (V = X is kept as is, not in basis_dtype: the layer's conv then equals the plain one bit
        # for bit; that is the input image of a first conv, small)
        eye = torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N)
        return Decomposition(eye, X, torch.zeros_like(x))
    if R == h * w and not auto:  # full rank the other way: A = X, V = I
        eye = torch.eye(R, dtype=x.dtype, device=x.device).expand(B, R, R)
        return Decomposition(X, eye, torch.zeros_like(x))
    if method == "exact":
        A, V = _exact(X, R)
    elif method == "deflation":
        A, V = _deflation(X, R, iters)
    else:
        A, V = _light(X, R, iters)
    if auto:
        keep = torch.arange(R, device=x.device) < entropy_rank(X, max_rank).unsqueeze(1)
        A = A * keep.unsqueeze(1).to(A.dtype)
    if basis_dtype is not None and basis_dtype != V.dtype:
        V = V.to(basis_dtype)
    X_res = torch.baddbmm(X, A, V.to(X.dtype), alpha=-1).reshape_as(x)
    return Decomposition(A, V, X_res)


def validate_rank(rank: Rank) -> Rank:
    """Check a rank policy early, with a message a user can act on."""
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"rank must be an int, a list of ints or 'auto', not {rank!r}")
        return rank
    if isinstance(rank, bool):
        raise ValueError("rank must be an int, a list of ints or 'auto', not a bool")
    if isinstance(rank, int):
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return rank
    ranks = list(rank)
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        raise ValueError(f"a per-layer rank list must hold ints >= 0, got {rank!r}")
    return ranks


def rank_for_point(rank: Rank, point: int, n_points: int) -> int | str:
    """The rank policy's value at decomposition point `point` (0-based, forward order)."""
    if isinstance(rank, (int, str)):
        return rank
    ranks = list(rank)
    if len(ranks) != n_points:
        raise ValueError(
            f"the per-layer rank list has {len(ranks)} entries but the model has "
            f"{n_points} decomposition points (one per Conv2d, in forward order)"
        )
    return ranks[point]


def energy_kept(x: Tensor, R: int) -> Tensor:
    """Fraction of each sample's energy |X|^2 held by its best rank-R part (for choosing R)."""
    s2 = torch.linalg.svdvals(x.reshape(x.shape[0], x.shape[1], -1)).square()
    return s2[:, :R].sum(-1) / s2.sum(-1).clamp_min(torch.finfo(s2.dtype).tiny)


__all__ = [
    "Decomposition",
    "METHODS",
    "channel_entropy",
    "decompose",
    "energy_kept",
    "entropy_rank",
    "rank_for_point",
    "validate_rank",
]
