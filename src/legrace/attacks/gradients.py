"""Gradient inversion with what the accelerator holds in the paper's mode: the weights, dL/dY and
the noised residuals (DESIGN section 3 puts the first two outside the formal guarantee).

Two attacks on a training step of a batch of victims, both fed only by what crossed:

- Gradient matching, in the manner of "Deep Leakage from Gradients" / "Inverting Gradients".
  The weights cross before every step (SetWeight), so plain SGD's update reveals the full weight
  gradient G = (W_k - W_k+1) / lr of each conv. The accelerator computed its own part,
  X_res~ (*) dL/dY, from the residual and dL/dY it was sent, so it knows the trusted part
  G_main = G - X_res~ (*) dL/dY = X_main (*) dL/dY, linear in the private X_main, with the
  per-sample dL/dY also in hand. It optimises a dummy X' so that X' (*) dL/dY matches G_main in
  squared distance, with a total-variation prior, and reports X' + X_res~. At the first conv X is
  the image itself; the known lr and plain SGD (no momentum, no weight decay) are assumptions.
- A learned decoder from the victims' dL/dY at a layer back to the image, trained on the dL/dY
  the adversary's auxiliary images produce (the adversary of `legrace.attacks.inversion`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.grad import conv2d_weight

from legrace.attacks.target import AttackError


def observed_gradient(weights: list[Tensor], step: int, lr: float) -> Tensor:
    """The full weight gradient of step `step`, from the weights sent before and after it."""
    if step + 1 >= len(weights):
        raise AttackError(f"step {step} needs the weights sent after it; only {len(weights)} crossed "
                          "(did the weights change? lr must be > 0)")
    return (weights[step] - weights[step + 1]) / lr


def total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def match_gradient(grad_y: Tensor, target: Tensor, x_shape: tuple[int, ...], *, stride, padding, dilation,
                   iters: int = 400, tv: float = 0.2, lr: float = 0.1, box: float | None = 2.0,
                   seed: int = 0) -> Tensor:
    """argmin_X' |X' (*) grad_y - target|^2 / |target|^2 + tv * TV(X'), for the batch X' of shape x_shape.

    The squared distance, not the cosine of "Inverting Gradients": the gradient is linear in X',
    so a cosine would leave the scale of X' free. box bounds |X'| (normalised pixels lie in
    [-2, 2]); None leaves X' free (deeper layers).
    """
    if target.norm() == 0:
        return torch.zeros(x_shape)  # nothing of the private part reached the gradient
    g = torch.Generator().manual_seed(seed)
    z = (0.1 * torch.randn(x_shape, generator=g)).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters)
    scale = target.square().sum()

    def image(z: Tensor) -> Tensor:
        return box * torch.tanh(z / box) if box is not None else z

    for _ in range(iters):
        x = image(z)
        dw = conv2d_weight(x, tuple(target.shape), grad_y, stride, padding, dilation)
        loss = (dw - target).square().sum() / scale + tv * total_variation(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return image(z)


def trusted_gradient_part(full: Tensor, residual: Tensor | None, grad_y: Tensor, *, stride, padding,
                          dilation) -> Tensor:
    """G minus the accelerator's own part X_res~ (*) dL/dY (none in gpu_only: it was all on the GPU)."""
    if residual is None:
        return full
    return full - conv2d_weight(residual, tuple(full.shape), grad_y, stride, padding, dilation)
