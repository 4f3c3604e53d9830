"""Data sets for ``legrace train --data SPEC``.

Accepted specs: ``digits``, ``npz:PATH``, ``cifar10:DIR``, ``imagefolder:DIR``.
Every item is ``(x, y)``: ``x`` a float32 C x H x W tensor normalised with fixed,
data-independent constants, ``y`` an int64 scalar tensor.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

# Normalisation statistics computed from private data would leak it without being
# accounted for, so fixed constants are used: (x/255 - 0.5) / 0.25 per pixel, all
# channels; typical images then have about unit RMS per coordinate.
NORM_MEAN = 0.5
NORM_STD = 0.25

SPEC_FORMS = "digits, npz:PATH, cifar10:DIR, imagefolder:DIR"
MAX_CLASSES = 1 << 16
DEFAULT_FOLDER_SIZE = 32

# What each loader returns: dataset, num_classes, in_channels, image_size, classes, fingerprint
# (or the fingerprint and the forms earlier versions computed, which checkpoints may hold).
_Loaded = tuple[Dataset, int, int, int, list[str], Union[str, tuple[str, ...]]]


def _fingerprint(*parts) -> str:
    """A digest of a data set's content (arrays hashed as bytes, anything else as its repr):
    a run's checkpoint keeps it, so a resume on changed data cannot move trained samples into
    the validation split unnoticed."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            h.update(repr((part.dtype.str, part.shape)).encode())
            h.update(memoryview(part).cast("B"))
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the spec/file and what is wrong."""


@dataclass
class DataSplit:
    """The loaded data: train/val datasets plus what a model needs to know about them."""

    train: Dataset
    val: Dataset | None
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]
    spec: str
    fingerprint: str = ""  # of the whole source, before max_samples and the split (see _fingerprint)
    earlier_fingerprints: tuple[str, ...] = ()  # the same data as earlier versions fingerprinted it

    def matches(self, saved: str) -> bool:
        """Whether a checkpoint's fingerprint `saved` names this data (in any version's form)."""
        return bool(saved) and saved in (self.fingerprint, *self.earlier_fingerprints)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Map pixel intensities in [0, 1] to the fixed normalised scale."""
    return (x - NORM_MEAN) / NORM_STD


class ArrayDataset(Dataset):
    """Images kept compact (uint8, N x C x H x W) and normalised per item.

    Converting all of CIFAR-10 to float up front would cost ~600 MB; per item it is free.
    ``scale`` is the value of a full-intensity pixel (255 for uint8, 16 for sklearn digits).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, scale: float = 255.0, size: int | None = None
    ) -> None:
        self.images = images
        self.labels = labels
        self.scale = float(scale)
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].to(torch.float32) / self.scale
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=False)[0]
        return normalise(x), self.labels[i]


class _PilToNormalised:
    """PIL image -> RGB -> square ``size`` -> normalised float tensor (picklable for workers)."""

    def __init__(self, size: int | None) -> None:
        from torchvision import transforms

        steps = [transforms.Resize((size, size), antialias=True)] if size is not None else []
        self.transform = transforms.Compose([*steps, transforms.ToTensor()])

    def __call__(self, img) -> torch.Tensor:
        return normalise(self.transform(img.convert("RGB")))


def _open_image(path: str):
    """torchvision's image loader, with a DataError naming a file it cannot read."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, Image.DecompressionBombError) as err:  # PIL.UnidentifiedImageError among them
        raise DataError(f"imagefolder: cannot read the image {path} ({type(err).__name__})") from err


def _as_label(y: int) -> torch.Tensor:
    return torch.tensor(y, dtype=torch.int64)


def _load_digits(size: int | None) -> _Loaded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8))[:, None]  # values 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(c) for c in bunch.target_names]
    return (ArrayDataset(images, labels, scale=16.0, size=size), len(classes), 1, size or 8, classes,
            _fingerprint(bunch.images, bunch.target))


def _load_npz(path: Path, size: int | None) -> _Loaded:
    if not path.is_file():
        raise DataError(f"npz:{path}: file not found")
    if not zipfile.is_zipfile(path):  # numpy's own message for a .npy or another file misleads
        raise DataError(f"npz:{path}: not an .npz archive (numpy.savez writes one, with arrays x and y)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                have = ", ".join(f.files) or "none"
                raise DataError(f"npz:{path}: missing array(s) {', '.join(missing)} (has: {have})")
            x, y = f["x"], f["y"]
            names = f["classes"] if "classes" in f.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as err:
        # (TypeError: a .npy file loads as one array, not an archive of named ones)
        raise DataError(f"npz:{path}: cannot read as .npz ({type(err).__name__}: {err})") from err

    if x.dtype != np.uint8:
        raise DataError(f"npz:{path}: x must be uint8 images in 0..255, got dtype {x.dtype}")
    if x.ndim not in (3, 4):
        raise DataError(f"npz:{path}: x must be N x H x W x C or N x H x W, got shape {x.shape}")
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        raise DataError(f"npz:{path}: x of shape {x.shape} looks channel-first (N x C x H x W); store it as "
                        "N x H x W x C, e.g. x.transpose(0, 2, 3, 1)")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"npz:{path}: y must be a 1-d integer array, got dtype {y.dtype} shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"npz:{path}: x has {len(x)} images but y has {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"npz:{path}: contains no samples")
    if y.min() < 0:
        raise DataError(f"npz:{path}: labels must be non-negative, found {y.min()}")
    n, h, w, c = x.shape
    if h != w and size is None:
        raise DataError(f"npz:{path}: images are {h}x{w}, not square; pass an image size to resize them")

    num_classes = int(y.max()) + 1
    if names is None:
        if num_classes > MAX_CLASSES:  # a label of 10^9 would make a head of 10^9 outputs
            raise DataError(f"npz:{path}: labels go up to {num_classes - 1}; labels must be 0..K-1 for K classes "
                            f"(at most {MAX_CLASSES})")
        absent = num_classes - len(np.unique(y))
        if absent:
            warnings.warn(f"npz:{path}: labels go up to {num_classes - 1} but {absent} of 0..{num_classes - 1} never "
                          f"occur; the model gets {num_classes} outputs (relabel 0..K-1, or give a classes array)")
        classes = [str(i) for i in range(num_classes)]
    else:
        if names.ndim != 1 or len(names) < num_classes:
            raise DataError(f"npz:{path}: classes has {names.size} names "
                            f"but labels go up to {num_classes - 1}")
        classes = [v.decode() if isinstance(v, bytes) else str(v) for v in names.tolist()]
        twice = sorted({c for c in classes if classes.count(c) > 1})
        if twice:  # evaluation matches classes by name: two outputs of one name cannot be told apart
            raise DataError(f"npz:{path}: classes names {', '.join(map(repr, twice))} more than once; names must differ")
        num_classes = len(classes)

    images = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view, no copy
    labels = torch.from_numpy(y.astype(np.int64, copy=False))
    return ArrayDataset(images, labels, size=size), num_classes, c, size or h, classes, _fingerprint(x, y, classes)


def _load_cifar10(root: Path, size: int | None, download: bool, split: str) -> _Loaded:
    from torchvision.datasets import CIFAR10

    kwargs = dict(root=str(root), train=(split == "train"), transform=_PilToNormalised(size),
                  target_transform=_as_label)
    if not download:
        try:
            ds = CIFAR10(download=False, **kwargs)
        except (RuntimeError, OSError) as err:
            raise DataError(f"cifar10:{root}: CIFAR-10 data is not in {root}; pass --download to fetch it "
                            "(needs network)") from err
    else:
        try:
            ds = CIFAR10(download=True, **kwargs)
        except Exception as err:  # URLError, HTTPError, checksum RuntimeError, ...
            raise DataError(f"cifar10:{root}: could not download CIFAR-10 into {root} (offline?): "
                            f"{type(err).__name__}: {err}") from err
    return ds, len(ds.classes), 3, size or 32, list(ds.classes), _fingerprint(ds.data, np.asarray(ds.targets))


def _load_imagefolder(root: Path, size: int | None) -> _Loaded:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: directory not found")
    size = size or DEFAULT_FOLDER_SIZE
    try:
        ds = ImageFolder(str(root), transform=_PilToNormalised(size), target_transform=_as_label, loader=_open_image)
    except (OSError, RuntimeError) as err:  # FileNotFoundError: no class folders / no images
        raise DataError(f"imagefolder:{root}: no images found; "
                        f"expected DIR/CLASS/IMAGE files ({err})") from err
    _check_listing(root, [path for path, _ in ds.samples], ds.classes)
    # Names, classes and sizes, not every image's bytes (cheaper) and not modification times: the
    # split follows the sorted listing, so these pin it, while a copy, a checkout or `touch` of the
    # same files (new times, same content) must still resume. An edit that keeps a file's exact
    # size goes unnoticed.
    files, timed = [], []
    for path, label in ds.samples:
        try:
            st = os.stat(path)
        except OSError as err:  # a broken symlink, a file removed since the listing
            raise DataError(f"imagefolder:{root}: cannot read {path} ({err.strerror})") from None
        files.append((os.path.relpath(path, root), label, st.st_size))
        timed.append((*files[-1], st.st_mtime_ns))  # the fingerprint's older form, with times, as old checkpoints hold it
    _check_headers(root, [path for path, _ in ds.samples])
    return ds, len(ds.classes), 3, size, list(ds.classes), (_fingerprint(files), _fingerprint(timed))


def _check_listing(root: Path, listed: list[str], classes: list[str]) -> None:
    """Refuse, by name, the files ImageFolder would skip without a word: in a class folder, one
    whose name does not end as an image's (notes.txt, data.csv); beside the class folders, an
    image in none of them. Hidden files (.DS_Store) are not data and stay ignored."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    base = os.path.expanduser(str(root))  # as ImageFolder lists it
    taken = {os.path.abspath(p) for p in listed}
    skipped = []
    for cls in classes:
        for folder, _, names in os.walk(os.path.join(base, cls), followlinks=True):
            skipped += [os.path.join(folder, n) for n in sorted(names)
                        if not n.startswith(".") and os.path.abspath(os.path.join(folder, n)) not in taken]
    with os.scandir(base) as entries:
        skipped += sorted(e.path for e in entries
                          if not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS) and not e.is_dir())
    if skipped:
        named = ", ".join(os.path.relpath(p, base) for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise DataError(f"imagefolder:{root}: {len(skipped)} file(s) are not images in a class folder, so they "
                        f"would be left out: {named}{more} (the layout is DIR/CLASS/IMAGE, an image's name ending "
                        f"in {', '.join(IMG_EXTENSIONS)}); remove them or move them out of {root} before training")


def _check_headers(root: Path, paths: list[str]) -> None:
    """Refuse, before training, files whose header PIL cannot read (a text file named .jpg, an
    empty or cut-off download). Found mid-run instead, such a file would stop a pass that has
    already spent privacy, and deleting it changes the data, which a resume then refuses. Only
    headers are read (PIL opens lazily): pixel data cut short is still found at load."""
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 (the header is parsed by open)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            bad.append(f"{os.path.relpath(path, root)} ({type(err).__name__})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"imagefolder:{root}: {len(bad)} file(s) are not readable images: "
                        f"{', '.join(bad[:3])}{more}; remove or replace them before training")


def _check_options(val_fraction: float, max_samples: int | None, image_size: int | None, split: str) -> None:
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_samples is not None and (not isinstance(max_samples, numbers.Integral) or max_samples < 1):
        raise DataError(f"max_samples must be a positive integer, got {max_samples!r}")
    if image_size is not None and (not isinstance(image_size, numbers.Integral) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")


def source_of(spec: str) -> str:
    """The data set, file or folder a spec names, its path made absolute from the working directory:
    the same for every spelling of one path (whatever the content there now)."""
    kind, sep, arg = spec.partition(":")
    if not (sep and arg):
        return spec
    try:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    except (OSError, RuntimeError):  # an unresolvable path (a symlink loop): as written
        return spec


def load_data(
    spec: str = "digits",
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_samples: int | None = None,
    image_size: int | None = None,
    download: bool = False,
    split: str = "train",
) -> DataSplit:
    """Load the data set named by ``spec`` and split it into train/val deterministically.

    ``max_samples`` keeps the first samples of a seeded shuffle (quick CPU runs); the
    validation split is a seeded permutation so runs are reproducible. ``split`` picks
    the CIFAR-10 train or test set and is ignored by the other specs.
    """
    _check_options(val_fraction, max_samples, image_size, split)
    if not isinstance(spec, str):
        raise DataError(f"data spec must be a string, got {type(spec).__name__}")
    kind, sep, arg = spec.partition(":")
    if kind == "digits" and not sep:
        loaded = _load_digits(image_size)
    elif kind in ("npz", "cifar10", "imagefolder") and arg:
        path = Path(arg).expanduser()
        if kind == "npz":
            loaded = _load_npz(path, image_size)
        elif kind == "cifar10":
            loaded = _load_cifar10(path, image_size, download, split)
        else:
            loaded = _load_imagefolder(path, image_size)
    else:
        raise DataError(f"unknown data spec {spec!r}; accepted forms: {SPEC_FORMS}")
    dataset, num_classes, in_channels, size, classes, fingerprints = loaded
    fingerprint, *earlier = (fingerprints,) if isinstance(fingerprints, str) else fingerprints

    gen = torch.Generator().manual_seed(seed)
    if max_samples is not None and max_samples < len(dataset):
        keep = torch.randperm(len(dataset), generator=gen)[:max_samples]
        dataset = Subset(dataset, keep.tolist())

    n = len(dataset)
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise DataError(f"{spec}: too few samples ({n}) for val_fraction={val_fraction}")
    if n_val:
        perm = torch.randperm(n, generator=gen).tolist()
        train, val = Subset(dataset, perm[n_val:]), Subset(dataset, perm[:n_val])
    else:
        train, val = dataset, None
    return DataSplit(train=train, val=val, num_classes=num_classes, in_channels=in_channels,
                     image_size=size, classes=classes, spec=spec, fingerprint=fingerprint,
                     earlier_fingerprints=tuple(earlier))
