"""Membership inference on a trained model: was this sample in the training set?

- Loss threshold (Yeom et al. 2018): members tend to have lower loss; the score is -loss.
- Shadow model (Shokri et al. 2017, scored as the offline likelihood ratio of Carlini et al.
  2022): the adversary trains a model with the same recipe on its own auxiliary data, fits per
  class a Gaussian to the logit-scaled confidence log(p_y / (1 - p_y)) of the shadow's members and
  of its non-members, and scores a sample by the log ratio of the two likelihoods.

The target model is run as it was trained (its mode, noise and clip), on the trusted side in
evaluation mode. Reported: ROC AUC and the true positive rate at 1% false positive rate.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from legrace.wiring import LegRace
from legrace.models import build_model
from legrace.attacks.target import AttackError, Target


def engine_for(target: Target) -> LegRace:
    """The engine of the target's own run (its mode, rank, noise multiplier and clip)."""
    cfg = target.config
    releasing = cfg.mode in ("legrace", "dp_only")
    if releasing and target.noise_multiplier is None:
        raise AttackError("the target run's noise settings are unknown: give a checkpoint")
    return LegRace(cfg.mode, rank=cfg.rank, clip=target.clip if releasing else "auto",
                   noise_multiplier=target.noise_multiplier if releasing else None, decomposition=cfg.decomposition)


@torch.no_grad()
def confidences(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[np.ndarray, ...]:
    """Per sample: cross-entropy loss, logit-scaled confidence in the true class, label, correct?"""
    model.eval()
    losses, phis, labels, correct = [], [], [], []
    device = next(model.parameters()).device
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits = model(x.to(device)).double().cpu()
        logp = F.log_softmax(logits, 1).gather(1, y.reshape(-1, 1)).squeeze(1)
        losses.append(-logp)
        # log(p / (1 - p)) computed stably from log p
        phis.append(logp - torch.log(-torch.expm1(logp.clamp(max=-1e-12))))
        labels.append(y)
        correct.append(logits.argmax(1) == y)
    return tuple(torch.cat(v).numpy() for v in (losses, phis, labels, correct))


def roc(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr_at: float = 0.01) -> dict:
    """ROC AUC, TPR at `fpr_at` FPR, and the curve (higher score = 'member')."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), f"tpr_at_{fpr_at:g}_fpr": float(tpr[fpr <= fpr_at].max()),
            "fpr": fpr, "tpr": tpr}


class ClassGaussians:
    """Per-class Gaussians of a score for members ('in') and non-members ('out')."""

    def __init__(self, phi_in: np.ndarray, y_in: np.ndarray, phi_out: np.ndarray, y_out: np.ndarray,
                 min_per_class: int = 10) -> None:
        self.global_ = (self._fit(phi_in), self._fit(phi_out))
        self.per_class = {}
        for c in np.union1d(y_in, y_out):
            a, b = phi_in[y_in == c], phi_out[y_out == c]
            if len(a) >= min_per_class and len(b) >= min_per_class:
                self.per_class[int(c)] = (self._fit(a), self._fit(b))

    @staticmethod
    def _fit(v: np.ndarray) -> tuple[float, float]:
        return float(np.mean(v)), float(max(np.std(v), 1e-3))

    @staticmethod
    def _logpdf(v: np.ndarray, mean: float, std: float) -> np.ndarray:
        return -0.5 * ((v - mean) / std) ** 2 - math.log(std)

    def score(self, phi: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.empty_like(phi)
        for i, (v, c) in enumerate(zip(phi, y)):
            (mi, si), (mo, so) = self.per_class.get(int(c), self.global_)
            out[i] = self._logpdf(v, mi, si) - self._logpdf(v, mo, so)
        return out


def train_shadow(target: Target, dataset: Dataset, epochs: Optional[int] = None,
                 log=print) -> tuple[nn.Module, LegRace]:
    """A model trained like the target (same architecture, mode, rank, noise, optimizer and
    schedule) on the adversary's own data, and its engine."""
    cfg = target.config
    epochs = epochs or cfg.epochs
    torch.manual_seed(cfg.seed + 1)
    module = build_model(cfg.model, num_classes=target.data.num_classes, in_channels=target.data.in_channels,
                         image_size=target.data.image_size)
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) > cfg.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    engine = engine_for(target)
    model, optimizer, loader = engine.make_private(module=module, optimizer=optimizer, data_loader=loader)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    device = engine.device if cfg.mode == "gpu_only" else torch.device("cpu")
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
        schedule.step()
        log(f"shadow model: epoch {epoch + 1}/{epochs}")
    return model, engine
