"""Model inversion: from what the accelerator saw at one layer back to the input image.

The adversary of DESIGN section 3 controls the accelerator and has prior knowledge: a public,
auxiliary set of images from the same distribution (samples the run never used). It observes
the crossings that its own auxiliary images cause (it can submit them as public training data,
or emulate the trusted side: an upper bound on its power), trains a decoder from the view at a
layer back to the image, and applies it to the victims' views. Nothing that crosses (lowrank_only)
leaves it its prior: the mean auxiliary image.

Quality is SSIM and PSNR (torchmetrics) on pixel intensities in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legrace.attacks.target import AttackError


class Decoder(nn.Module):
    """A small conv net from a view (N x h x w) to an image (C x H x W) in [0, 1]: convs at the
    view's resolution, then x2 upsampling steps, each followed by a conv, up to the image size."""

    def __init__(self, in_channels: int, in_hw: int, out_channels: int, out_hw: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        hw = in_hw
        while hw < out_hw:
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            hw *= 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)
        self.out_hw = out_hw

    def forward(self, v: Tensor) -> Tensor:
        h = self.body(v)
        if h.shape[-1] != self.out_hw:
            h = F.interpolate(h, size=(self.out_hw, self.out_hw), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(h))


@dataclass
class Standardiser:
    """Scales views with statistics of the adversary's own (auxiliary) views only."""

    mean: Tensor
    std: Tensor
    per_sample: bool

    @classmethod
    def fit(cls, views: Tensor, per_sample: bool = False) -> "Standardiser":
        v = _rms_normalised(views) if per_sample else views
        mean = v.mean(dim=(0, 2, 3), keepdim=True)
        std = v.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
        return cls(mean, std, per_sample)

    def __call__(self, views: Tensor) -> Tensor:
        v = _rms_normalised(views) if self.per_sample else views
        return (v - self.mean) / self.std


def _rms_normalised(v: Tensor) -> Tensor:
    rms = v.flatten(1).square().mean(1).sqrt().clamp_min(1e-30)
    return v / rms.reshape(-1, 1, 1, 1)


def train_decoder(aux_views: Tensor, aux_images: Tensor, *, epochs: int = 15, width: int = 32, lr: float = 2e-3,
                  batch_size: int = 64, per_sample: bool = False, seed: int = 0, device: str = "cpu",
                  ) -> tuple[Decoder, Standardiser]:
    """Fit a decoder view -> image (intensities in [0, 1]) on the adversary's auxiliary pairs."""
    if aux_views.dim() != 4 or aux_images.dim() != 4 or len(aux_views) != len(aux_images):
        raise AttackError(f"need N x C x H x W views and images of the same N, got {tuple(aux_views.shape)} "
                          f"and {tuple(aux_images.shape)}")
    torch.manual_seed(seed)
    scale = Standardiser.fit(aux_views, per_sample)
    v, x = scale(aux_views).to(device), aux_images.to(device)
    decoder = Decoder(v.shape[1], v.shape[-1], x.shape[1], x.shape[-1], width).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    steps = epochs * math.ceil(len(v) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    decoder.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(v), generator=g).split(batch_size):
            idx = idx.to(device)
            loss = F.mse_loss(decoder(v[idx]), x[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return decoder.eval(), scale


@torch.no_grad()
def reconstruct(decoder: Decoder, scale: Standardiser, views: Tensor, device: str = "cpu") -> Tensor:
    out = [decoder(scale(v).to(device)).cpu() for v in views.split(256)]
    return torch.cat(out)


def invert(aux_views: Optional[Tensor], aux_images: Tensor, victim_views: Optional[Tensor], n_victims: int,
           **decoder_args) -> Tensor:
    """The adversary's reconstructions of the victims (in [0, 1]); with no view (nothing crossed)
    its best guess under squared error, the mean auxiliary image."""
    if aux_views is None or victim_views is None:
        return aux_images.mean(0, keepdim=True).expand(n_victims, -1, -1, -1).clone()
    decoder, scale = train_decoder(aux_views, aux_images, **decoder_args)
    return reconstruct(decoder, scale, victim_views, decoder_args.get("device", "cpu"))


def quality(reconstructions: Tensor, originals: Tensor) -> dict[str, float]:
    """Mean SSIM and PSNR (dB) of reconstructions against originals, both in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if reconstructions.shape != originals.shape:
        raise AttackError(f"reconstructions {tuple(reconstructions.shape)} and originals "
                          f"{tuple(originals.shape)} differ in shape")
    side = min(originals.shape[-2:])
    kernel = 11 if side >= 11 else max(3, side - 1 if side % 2 == 0 else side)
    pred, truth = reconstructions.float().clamp(0, 1), originals.float()
    ssim = structural_similarity_index_measure(pred, truth, data_range=1.0, kernel_size=kernel,
                                               reduction="none")
    psnr = peak_signal_noise_ratio(pred, truth, data_range=1.0, dim=(1, 2, 3), reduction="none")
    return {"ssim": float(ssim.mean()), "ssim_std": float(ssim.std()) if len(ssim) > 1 else 0.0,
            "psnr": float(psnr.mean())}
