"""Which accounted use each release belongs to: private loaders and the passes they make.

A pass over a `PrivateDataLoader` is recorded in the ledger as one use of its data set before the
pass's first release. `PassBook` then decides, release by release, whether the open passes' uses
pay for it or one more use must be charged (a second forward of a batch, data from elsewhere, a
forward outside any pass). The rest are what the engine needs to know about a user's loader
without reading private values: its batch size, its samples' shape, whether it repeats samples.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol

import torch


class _Engine(Protocol):
    """What a private loader asks of its engine (legrace.trusted.engine.TrustedEngine)."""

    passes: "PassBook"
    _lock: Any

    def _before_pass(self, name: str, batch: Any) -> None: ...


class PassBook:
    """The private loaders' open passes, and the releases made beside or outside them.

    While passes are open, the samples they have yielded (`paid_rows`) are what their uses pay
    for: a point that releases more rows than that charges one more use, once per forward.
    Outside all passes every forward is one more use (counted once, at its first point). The
    engine's lock is held around every call.
    """

    BEYOND = ("the model released more samples' residuals than the private loaders' open passes have yielded "
              "(a second forward of a batch, or other data during a pass)")
    OUTSIDE = ("the model released residuals outside a pass over a private loader (make_private's or "
               "private_loader's)")

    def __init__(self) -> None:
        self.open_passes = 0  # private loaders iterating now
        self.paid_rows = 0  # samples the open passes' uses pay for: those yielded, and those charged extra
        self.pass_rows: dict[int, int] = {}  # samples released per point while passes are open
        self.outside: dict[int, int] = {}  # releases per point made outside any pass
        self.outside_uses = 0  # forwards among them (the most releases at one point)

    def opened(self) -> None:
        self.open_passes += 1

    def yielded(self, rows: int) -> None:
        self.paid_rows += rows

    def closed(self) -> None:
        self.open_passes -= 1
        if not self.open_passes:
            self.pass_rows.clear()
            self.paid_rows = 0

    def extra_use(self, point: int, rows: int) -> Optional[str]:
        """None if the uses already recorded pay for releasing `rows` samples at `point`; else
        why one more use must be charged (the caller records it before the release crosses)."""
        if self.open_passes:
            n = self.pass_rows[point] = self.pass_rows.get(point, 0) + rows
            if n <= self.paid_rows:
                return None
            self.paid_rows += rows  # this forward's rows, at every point, paid by the one more use
            return self.BEYOND
        n = self.outside[point] = self.outside.get(point, 0) + 1
        if n <= self.outside_uses:  # not a forward's first release
            return None
        self.outside_uses = n
        return self.OUTSIDE


class PrivateDataLoader:
    """Wraps a DataLoader of private data: records each pass in the ledger, moves batches."""

    def __init__(self, loader: Any, engine: _Engine, name: str, device: Optional[torch.device] = None) -> None:
        self.loader, self.engine, self.name, self.device = loader, engine, name, device

    @property
    def ledger(self):
        return self.engine.ledger

    def __iter__(self) -> Iterator:
        opened = False
        engine, book = self.engine, self.engine.passes
        try:
            for i, batch in enumerate(self.loader):
                with engine._lock:  # another thread may be releasing (see SplitConfig.lock)
                    if i == 0:  # accounted before the first release of the pass
                        engine._before_pass(self.name, batch)
                        book.opened()
                        opened = True
                    book.yielded(rows(batch, self.loader))  # what the pass may release
                yield to_device(batch, self.device) if self.device is not None else batch
        finally:
            if opened:
                with engine._lock:
                    book.closed()

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def sample_shape(data_loader: Any) -> Optional[tuple[int, ...]]:
    """The shape of a batch of one input, from the loader's data set or first batch (None if
    neither tells)."""
    try:
        dataset = getattr(data_loader, "dataset", None)
        if dataset is None:
            shape = input_shape(data_loader[0], batched=True)
            return None if shape is None else (1, *shape[1:])
        return input_shape(dataset[0], batched=False)
    except Exception:  # an iterable-style data set, or samples of another form
        return None


def input_shape(item: Any, batched: bool) -> Optional[tuple[int, ...]]:
    """The shape of a batch of inputs, from one sample (batched=False) or one batch: an image
    tensor, a tuple or list that starts with one, or a dict holding one floating-point image
    tensor ({"image": x, "label": y}); None for anything else."""
    rank = 4 if batched else 3
    if isinstance(item, dict):
        images = [v for v in item.values() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == rank]
        item = images[0] if len(images) == 1 else None
    x = item[0] if isinstance(item, (list, tuple)) and item else item
    if not isinstance(x, torch.Tensor) or x.dim() != rank:
        return None
    return tuple(x.shape) if batched else (1, *x.shape)


def iterable_only(data_loader: Any) -> bool:
    """Whether the loader shows its samples only by iterating (an IterableDataset, or no data set
    and no indexing)."""
    dataset = getattr(data_loader, "dataset", None)
    if dataset is None:
        return not isinstance(data_loader, (list, tuple)) and not hasattr(data_loader, "__getitem__")
    return isinstance(dataset, torch.utils.data.IterableDataset)


def batch_size(data_loader: Any) -> Optional[int]:
    """The most samples a batch of this loader holds: its batch_size (at most its data set's
    length), or a list of batches' longest; None if it cannot tell."""
    size = getattr(data_loader, "batch_size", None)
    if size is None:
        return max((rows(b) for b in data_loader), default=1) if isinstance(data_loader, (list, tuple)) else None
    try:  # a batch never holds more than the data set (an empty one: 1, as for an empty list)
        return min(size, len(data_loader.dataset)) or 1
    except (AttributeError, TypeError):  # no data set, or an iterable-style one (no length)
        return size


def rows(batch: Any, loader: Any = None) -> int:
    """Samples in a batch: the length of its first tensor (of a tuple, list or dict), else the
    loader's batch size."""
    while isinstance(batch, (list, tuple, dict)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    if isinstance(batch, torch.Tensor) and batch.dim():
        return batch.shape[0]
    return getattr(loader, "batch_size", None) or 1


def check_sampling(data_loader: Any) -> None:
    """Refuse loaders that yield a sample more than once per pass: the ledger counts a pass as
    one use of each sample (with replacement, one sample can be drawn many times in a pass)."""
    sampler = getattr(data_loader, "sampler", None)
    dataset = getattr(data_loader, "dataset", None)
    if getattr(sampler, "replacement", False):
        raise ValueError(f"the loader's {type(sampler).__name__} draws with replacement, so a pass can use one sample "
                         "several times; legrace accounts a pass as one use of each sample: sample without replacement")
    num_samples = getattr(sampler, "num_samples", None)
    try:
        if isinstance(num_samples, int) and dataset is not None and num_samples > len(dataset):
            raise ValueError(f"the loader's {type(sampler).__name__} draws {num_samples} samples per pass from "
                             f"{len(dataset)}, so it repeats samples; legrace accounts a pass as one use of each sample")
    except TypeError:  # no length
        pass
    if isinstance(dataset, torch.utils.data.IterableDataset) and getattr(data_loader, "num_workers", 0) > 1:
        raise ValueError("an IterableDataset read by several workers yields every sample once per worker unless it "
                         "shards itself; legrace cannot tell, so use num_workers <= 1 (or a map-style dataset)")
