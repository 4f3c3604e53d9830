"""The model and data an attack is aimed at, and who holds which samples.

An attack needs three disjoint groups of samples, all from the same data set:
  members   the training split of the target run (its residuals crossed during training);
  held_out  the run's validation split (seen only by evaluation, never trained on);
  unused    samples `--max-samples` left out: the adversary's public, auxiliary data (with too few,
            the auxiliary data goes on into held_out: see `auxiliary`).
They are recovered from the `DataSplit` that `load_data` returns for the run's settings, so an
attack sees the very split the run trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from legrace.data import NORM_MEAN, NORM_STD, DataSplit, load_data
from legrace.models import build_model
from legrace.train import TrainConfig, TrainError, check_same_data, load_checkpoint


class AttackError(ValueError):
    """An attack or study that cannot run as asked; the message says why."""


@dataclass
class Target:
    """A (trained or freshly initialised) model and the sample groups of its run."""

    model: nn.Module
    config: TrainConfig
    data: DataSplit
    base: Dataset
    members: list[int]
    held_out: list[int]
    unused: list[int]
    trained: bool
    noise_multiplier: Optional[float] = None  # of the run, when it released anything
    clip: Optional[float] = None

    def subset(self, indices: Sequence[int]) -> Subset:
        return Subset(self.base, list(indices))

    def fresh_model(self) -> nn.Module:
        """A copy of the target's weights, safe to convert and train."""
        model = build_model(self.config.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                            image_size=self.data.image_size)
        model.load_state_dict(self.model.state_dict())
        return model


def _flatten(ds: Dataset) -> tuple[Dataset, list[int]]:
    """(innermost dataset, global indices) of a possibly nested Subset."""
    if isinstance(ds, Subset):
        base, idx = _flatten(ds.dataset)
        return base, [idx[i] for i in ds.indices]
    return ds, list(range(len(ds)))


def load_target(checkpoint: Optional[str] = None, config: Optional[TrainConfig] = None) -> Target:
    """The run saved in `checkpoint` (a `legrace train` checkpoint.pt), or, without one, an untrained
    model built from `config` (the weights of a run's first step)."""
    state = None
    if checkpoint is not None:
        try:
            state, config = load_checkpoint(checkpoint)
        except TrainError as err:
            raise AttackError(str(err)) from err
    if config is None:
        raise AttackError("give a checkpoint or the model and data to attack")
    data = load_data(config.data, val_fraction=config.val_fraction, seed=config.seed,
                     max_samples=config.max_samples, image_size=config.image_size)
    if state is not None:
        try:
            check_same_data(state, data, "attack")
        except TrainError as err:
            raise AttackError(str(err)) from err
    base, members = _flatten(data.train)
    held_out = _flatten(data.val)[1] if data.val is not None else []
    used = set(members) | set(held_out)
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(config.seed + 1)).tolist()
    unused = [i for i in order if i not in used]
    if state is None:  # a fresh model: the weights a run with this seed starts from (as run_training seeds)
        torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size)
    noise = clip = None
    if state is not None:
        model.load_state_dict(state["model"])
        noise, clip = state["engine"]["noise_multiplier"], state["engine"]["clip"]
    return Target(model.eval(), config, data, base, members, held_out, unused, state is not None, noise, clip)


def auxiliary(target: Target, n: Optional[int], most: int) -> list[int]:
    """The adversary's auxiliary samples, none of them trained on: the ones --max-samples left out,
    then the run's validation split; `n` of them, or by default all there are, up to `most`."""
    pool = target.unused + target.held_out
    if n is None:
        if not pool:
            raise AttackError("the run trained on every sample of its data, leaving the adversary no auxiliary "
                              "data: attack a run trained with --max-samples below the data's size or a "
                              "--val-fraction above 0")
        n = min(most, len(pool))
    return take(pool, n, "auxiliary samples (left out or held out: not trained on)")


def take(indices: Sequence[int], n: int, what: str) -> list[int]:
    """The first n of `indices`, or a clear error when there are fewer."""
    if n > len(indices):
        raise AttackError(f"asked for {n} {what} but only {len(indices)} are available "
                          "(lower the count, or lower the run's --max-samples to leave data for the adversary)")
    return list(indices[:n])


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Normalised images back to pixel intensities in [0, 1] (the scale SSIM and PSNR use)."""
    return (x * NORM_STD + NORM_MEAN).clamp(0, 1)


def images(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (normalised images, labels) of a small dataset as two tensors."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])

