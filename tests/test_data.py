import os
from pathlib import Path

import numpy as np
import pytest
import torch

import legrace.data as data
from legrace.data import DataError, load_data

CIFAR_NPZ = Path(
    os.environ.get("LEGRACE_CIFAR10_NPZ")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train.npz"
)


def _indices(subset) -> list[int]:
    return list(subset.indices)


def _write_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _one_line_error(excinfo, *fragments: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


# --- digits -----------------------------------------------------------------------------


def test_digits_shapes_and_metadata():
    s = load_data("digits")
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 8)
    assert s.classes == [str(i) for i in range(10)]
    assert s.spec == "digits"
    assert len(s.train) + len(s.val) == 1797
    assert len(s.val) == round(0.1 * 1797) == 180
    x, y = s.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0


def test_digits_normalisation_matches_hand_computed():
    s = load_data("digits", val_fraction=0.0)
    assert s.val is None and len(s.train) == 1797
    x, y = s.train[0]  # no split: original order, sample 0 is a "0"
    assert int(y) == 0
    # first row of sklearn's digit 0 is 0 0 5 13 9 1 0 0 (of 16): (v/16 - 0.5)/0.25 = v/4 - 2
    expected = torch.tensor([0, 0, 5, 13, 9, 1, 0, 0], dtype=torch.float32) / 4 - 2
    torch.testing.assert_close(x[0, 0], expected)
    assert x.min() >= -2.0 and x.max() <= 2.0


def test_split_disjoint_complete_and_deterministic():
    a = load_data("digits", val_fraction=0.25, seed=3)
    b = load_data("digits", val_fraction=0.25, seed=3)
    c = load_data("digits", val_fraction=0.25, seed=4)
    tr, va = set(_indices(a.train)), set(_indices(a.val))
    assert not tr & va
    assert tr | va == set(range(1797))
    assert len(va) == round(0.25 * 1797)
    assert _indices(a.train) == _indices(b.train) and _indices(a.val) == _indices(b.val)
    assert _indices(a.val) != _indices(c.val)
    torch.testing.assert_close(a.val[5][0], b.val[5][0])


def test_tiny_val_fraction_gives_at_least_one_sample():
    s = load_data("digits", val_fraction=1e-6)
    assert len(s.val) == 1 and len(s.train) == 1796


def test_max_samples_seeded_subset():
    a = load_data("digits", max_samples=50, val_fraction=0.2, seed=1)
    b = load_data("digits", max_samples=50, val_fraction=0.2, seed=1)
    c = load_data("digits", max_samples=50, val_fraction=0.2, seed=2)
    assert (len(a.train), len(a.val)) == (40, 10)
    assert [int(y) for _, y in a.train] == [int(y) for _, y in b.train]

    def chosen(s):  # train -> Subset of the max_samples Subset
        return set(s.train.dataset.indices)

    assert len(chosen(a)) == 50 and chosen(a) == chosen(b) and chosen(a) != chosen(c)
    # a shuffle, not just the first 50 samples
    assert chosen(a) != set(range(50))
    # more than available keeps everything
    assert len(load_data("digits", max_samples=10_000, val_fraction=0).train) == 1797


def test_image_size_resizes_array_specs():
    s = load_data("digits", image_size=16, val_fraction=0)
    assert s.image_size == 16
    assert s.train[0][0].shape == (1, 16, 16)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=-0.1), "val_fraction"),
        (dict(max_samples=0), "max_samples"),
        (dict(image_size=0), "image_size"),
        (dict(split="valid"), "split"),
        (dict(max_samples=1, val_fraction=0.5), "too few samples"),
    ],
)
def test_bad_options(kwargs, fragment):
    with pytest.raises(DataError) as ei:
        load_data("digits", **kwargs)
    _one_line_error(ei, fragment)


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "npz:", "cifar10", "imagefolder:", ""])
def test_bad_spec_lists_accepted_forms(spec):
    with pytest.raises(DataError) as ei:
        load_data(spec)
    _one_line_error(ei, "digits", "npz:PATH", "cifar10:DIR", "imagefolder:DIR")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# --- npz --------------------------------------------------------------------------------


def test_npz_rgb_values_and_storage(tmp_path):
    x = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    x[0, :, :, 0] = 255
    x[0, :, :, 1] = 51
    y = np.array([0, 1, 2, 0, 1, 2])
    s = load_data(_write_npz(tmp_path / "d.npz", x=x, y=y), val_fraction=0)
    assert (s.num_classes, s.in_channels, s.image_size) == (3, 3, 4)
    assert s.classes == ["0", "1", "2"]
    img, label = s.train[0]
    assert img.shape == (3, 4, 4) and img.dtype == torch.float32 and int(label) == 0
    # (255/255 - 0.5)/0.25 = 2, (51/255 - 0.5)/0.25 = -1.2, (0 - 0.5)/0.25 = -2
    torch.testing.assert_close(img[:, 1, 2], torch.tensor([2.0, -1.2, -2.0]))
    assert s.train.images.dtype == torch.uint8  # kept compact, normalised per item


def test_npz_grey_nhw_is_one_channel_and_resizes(tmp_path):
    x = np.full((5, 6, 6), 51, dtype=np.uint8)
    s = load_data(_write_npz(tmp_path / "g.npz", x=x, y=np.arange(5)), val_fraction=0.2, image_size=12)
    assert (s.in_channels, s.image_size, s.num_classes) == (1, 12, 5)
    img, _ = s.val[0]
    assert img.shape == (1, 12, 12)
    torch.testing.assert_close(img, torch.full((1, 12, 12), -1.2))


def test_npz_classes(tmp_path):
    x = np.zeros((4, 2, 2), dtype=np.uint8)
    names = np.array(["cat", "dog", "emu"])
    spec = _write_npz(tmp_path / "c.npz", x=x, y=np.array([0, 1, 0, 1]), classes=names)
    s = load_data(spec, val_fraction=0)
    assert s.classes == ["cat", "dog", "emu"] and s.num_classes == 3

    spec = _write_npz(tmp_path / "bad.npz", x=x, y=np.array([0, 1, 2, 3]), classes=np.array(["cat"]))
    with pytest.raises(DataError) as ei:
        load_data(spec)
    _one_line_error(ei, "bad.npz", "classes")

    spec = _write_npz(tmp_path / "twice.npz", x=x, y=np.array([0, 1, 2, 0]), classes=np.array(["a", "a", "b"]))
    with pytest.raises(DataError) as ei:  # matched by name at evaluation: 'a' would be one output
        load_data(spec)
    _one_line_error(ei, "twice.npz", "'a' more than once")


def _bad_npz_cases():
    ok_x = np.zeros((4, 3, 3, 1), dtype=np.uint8)
    ok_y = np.array([0, 1, 1, 0])
    return [
        (dict(images=ok_x, y=ok_y), "missing array(s) x"),
        (dict(x=ok_x), "missing array(s) y"),
        (dict(x=ok_x.astype(np.float32), y=ok_y), "uint8"),
        (dict(x=np.zeros((4, 9), dtype=np.uint8), y=ok_y), "shape"),
        (dict(x=ok_x, y=ok_y[:3]), "4 images but y has 3"),
        (dict(x=ok_x, y=np.array([0, -1, 1, 0])), "non-negative"),
        (dict(x=ok_x, y=ok_y.astype(np.float64)), "integer"),
        (dict(x=ok_x[:0], y=ok_y[:0]), "no samples"),
        (dict(x=np.zeros((4, 3, 5), dtype=np.uint8), y=ok_y), "not square"),
    ]


@pytest.mark.parametrize("arrays, fragment", _bad_npz_cases())
def test_npz_validation_errors(tmp_path, arrays, fragment):
    spec = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as ei:
        load_data(spec)
    _one_line_error(ei, "bad.npz", fragment)


def test_npz_missing_and_corrupt_file(tmp_path):
    with pytest.raises(DataError) as ei:
        load_data(f"npz:{tmp_path / 'nope.npz'}")
    _one_line_error(ei, "nope.npz", "not found")

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError) as ei:
        load_data(f"npz:{junk}")
    _one_line_error(ei, "junk.npz", "not an .npz archive")

    with pytest.raises(DataError) as ei:  # object arrays need pickle, which we refuse
        obj_y = np.array([0, 1], dtype=object)
        load_data(_write_npz(tmp_path / "obj.npz", x=np.zeros((2, 2, 2), np.uint8), y=obj_y))
    _one_line_error(ei, "obj.npz")

    np.save(tmp_path / "plain.npy", np.zeros((2, 2, 2), np.uint8))  # one array, not an archive
    with pytest.raises(DataError) as ei:
        load_data(f"npz:{tmp_path / 'plain.npy'}")
    _one_line_error(ei, "plain.npy", "not an .npz archive")


@pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason=f"{CIFAR_NPZ} not present")
def test_real_cifar10_npz():
    s = load_data(f"npz:{CIFAR_NPZ}", val_fraction=0)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 3, 32)
    assert s.classes[:2] == ["airplane", "automobile"]
    assert len(s.train) == 50000
    with np.load(CIFAR_NPZ) as f:
        raw_x, raw_y = f["x"][:200], f["y"][:200]
    x, y = s.train[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == int(raw_y[7])
    expected = (torch.from_numpy(raw_x[7]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    # fixed constants give roughly unit RMS per coordinate on natural images
    batch = torch.stack([s.train[i][0] for i in range(200)])
    assert 0.6 < batch.pow(2).mean().sqrt().item() < 1.6

    small = load_data(f"npz:{CIFAR_NPZ}", max_samples=100, val_fraction=0.1, seed=5)
    assert (len(small.train), len(small.val)) == (90, 10)


# --- cifar10 (torchvision) ----------------------------------------------------------------


def test_cifar10_missing_files_says_download(tmp_path):
    with pytest.raises(DataError) as ei:
        load_data(f"cifar10:{tmp_path}")
    _one_line_error(ei, str(tmp_path), "--download")


def test_cifar10_download_failure_is_data_error(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataError) as ei:
        load_data(f"cifar10:{tmp_path}", download=True)
    _one_line_error(ei, "download", "network is unreachable")


# --- imagefolder ------------------------------------------------------------------------


def _make_folder(root: Path) -> Path:
    from PIL import Image

    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(3):
        Image.new("RGB", (10 + i, 7), (255, 0, 51)).save(root / "cats" / f"{i}.png")
        Image.new("L", (5, 5), 255).save(root / "dogs" / f"{i}.png")  # grey -> RGB
    return root


def test_imagefolder(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    s = load_data(f"imagefolder:{root}", val_fraction=0)
    assert (s.num_classes, s.in_channels, s.image_size) == (2, 3, 32)
    assert s.classes == ["cats", "dogs"]
    cat, y_cat = s.train[0]
    dog, y_dog = s.train[5]
    assert cat.shape == dog.shape == (3, 32, 32) and cat.dtype == torch.float32
    assert (int(y_cat), int(y_dog)) == (0, 1) and y_cat.dtype == torch.int64
    torch.testing.assert_close(cat[:, 16, 16], torch.tensor([2.0, -2.0, -1.2]))
    torch.testing.assert_close(dog, torch.full((3, 32, 32), 2.0))

    s = load_data(f"imagefolder:{root}", image_size=8, val_fraction=0.5, seed=0)
    assert s.image_size == 8 and s.val[0][0].shape == (3, 8, 8)
    assert (len(s.train), len(s.val)) == (3, 3)


def test_imagefolder_fingerprint_ignores_times_and_place_not_listing(tmp_path):
    import os
    import shutil

    root = _make_folder(tmp_path / "imgs")
    before = load_data(f"imagefolder:{root}").fingerprint
    os.utime(root / "cats" / "0.png", ns=(1, 1))  # touched (was: a resume refused as "content changed")
    copy = shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copyfile)  # new place, new times
    assert load_data(f"imagefolder:{root}").fingerprint == load_data(f"imagefolder:{copy}").fingerprint == before
    (copy / "dogs" / "2.png").rename(copy / "cats" / "9.png")  # a sample moved to another class
    assert load_data(f"imagefolder:{copy}").fingerprint != before
    (root / "dogs" / "2.png").write_bytes((root / "dogs" / "2.png").read_bytes() + b"x")  # a changed file
    assert load_data(f"imagefolder:{root}").fingerprint != before


def test_imagefolder_still_matches_the_fingerprint_of_checkpoints_made_with_modification_times(tmp_path):
    import os

    root = _make_folder(tmp_path / "imgs")
    s = load_data(f"imagefolder:{root}")
    listed = sorted(p for p in root.rglob("*.png"))
    old_form = data._fingerprint([(os.path.relpath(p, root), int(p.parent.name == "dogs"), p.stat().st_size,
                                   p.stat().st_mtime_ns) for p in listed])  # as checkpoints before 2026-12-04 hold
    assert s.matches(old_form) and s.matches(s.fingerprint) and not s.matches("0" * 32) and not s.matches("")
    os.utime(listed[0], ns=(1, 1))
    assert not load_data(f"imagefolder:{root}").matches(old_form)  # that form keeps the times it was made with


def test_an_image_too_large_for_pil_is_refused_by_name(tmp_path, monkeypatch):
    from PIL import Image

    root = _make_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # the 10x7 cat images become "decompression bombs"
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{root}")
    _one_line_error(ei, "cats/0.png", "DecompressionBombError")


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{tmp_path / 'absent'}")
    _one_line_error(ei, "absent", "not found")

    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    _one_line_error(ei, "empty", "no images")

    root = _make_folder(tmp_path / "linked")
    (root / "cats" / "zz.png").symlink_to(tmp_path / "nowhere.png")  # a broken symlink
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{root}")
    _one_line_error(ei, "zz.png", "cannot read")


def test_unreadable_images_are_refused_at_load_naming_them(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    (root / "cats" / "broken.png").write_bytes(b"not a png")  # refused at load, not mid-pass by the loader
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{root}", val_fraction=0)
    _one_line_error(ei, "2 file(s)", "broken.png", "empty.jpg", "not readable images")


def test_a_file_that_is_not_an_image_is_refused_by_name_not_skipped(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    (root / "cats" / "notes.txt").write_text("taken on a sunny day")
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{root}", val_fraction=0)
    _one_line_error(ei, "1 file(s)", "cats/notes.txt", "would be left out", "remove them or move them out")
    (root / "cats" / "notes.txt").unlink()
    (root / "dogs" / "2.png").rename(root / "7.png")  # an image in no class folder
    (root / "cats" / "deeper").mkdir()
    (root / "cats" / "deeper" / "labels.csv").write_text("0,1\n")  # ImageFolder reads class folders' subfolders
    with pytest.raises(DataError) as ei:
        load_data(f"imagefolder:{root}")
    _one_line_error(ei, "2 file(s)", "7.png", "cats/deeper/labels.csv")
    (root / "7.png").unlink()
    (root / "cats" / "deeper" / "labels.csv").unlink()
    (root / "cats" / ".DS_Store").write_bytes(b"\0\1")  # a hidden file is no sample: still ignored
    (root / "README").write_text("where these came from")  # nor is a file beside the classes that is no image
    assert len(load_data(f"imagefolder:{root}", val_fraction=0).train) == 5


def test_an_image_cut_short_after_its_header_is_a_data_error_at_load_naming_it(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    from PIL import Image

    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "cats" / "whole.png")
    whole = (root / "cats" / "whole.png").read_bytes()
    (root / "cats" / "cut.png").write_bytes(whole[:len(whole) // 2])  # the header reads, the pixels do not
    s = load_data(f"imagefolder:{root}", val_fraction=0)
    with pytest.raises(DataError, match="cut.png"):
        [s.train[i] for i in range(len(s.train))]


def test_module_constants():
    assert (data.NORM_MEAN, data.NORM_STD) == (0.5, 0.25)


# --- labels and layouts a user gets wrong -----------------------------------------------


def test_npz_labels_that_would_make_a_huge_head_or_leave_classes_out(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(DataError) as e:  # a one-line error, not a MemoryError from deep inside
        load_data(_write_npz(tmp_path / "huge.npz", x=x, y=np.array([0, 1, 2, 10**9])))
    _one_line_error(e, "labels go up to 1000000000")
    with pytest.warns(UserWarning, match="1 of 0..3 never occur"):  # one-based labels: class 0 is never seen
        assert load_data(_write_npz(tmp_path / "one.npz", x=x, y=np.array([1, 2, 3, 3]))).num_classes == 4


def test_npz_in_channel_first_layout_is_named_not_read_as_odd_images(tmp_path):
    spec = _write_npz(tmp_path / "nchw.npz", x=np.zeros((4, 3, 8, 8), np.uint8), y=np.arange(4))
    for size in (None, 8):  # an image size does not make it read as 8-channel 3x8 images
        with pytest.raises(DataError) as e:
            load_data(spec, image_size=size)
        _one_line_error(e, "looks channel-first")


def test_the_fingerprint_follows_the_content_not_the_split(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8)
    y = np.arange(20) % 2
    a = load_data(_write_npz(tmp_path / "a.npz", x=x, y=y), seed=1)
    assert load_data(_write_npz(tmp_path / "b.npz", x=x, y=y), seed=2, max_samples=10).fingerprint == a.fingerprint
    x[3, 0, 0, 0] ^= 1
    assert load_data(_write_npz(tmp_path / "c.npz", x=x, y=y)).fingerprint != a.fingerprint
    assert load_data("digits").fingerprint == load_data("digits", val_fraction=0.5).fingerprint


def test_source_of_knows_a_path_however_it_is_spelled(tmp_path, monkeypatch):
    from legrace.data import source_of

    monkeypatch.chdir(tmp_path)
    assert source_of("digits") == "digits"
    assert source_of(f"npz:{tmp_path}/d.npz") == source_of("npz:./d.npz") == f"npz:{tmp_path.resolve()}/d.npz"
    assert source_of(f"imagefolder:{tmp_path}/f/") == source_of("imagefolder:f")
    assert source_of("npz:./d.npz") != source_of("npz:./e.npz")
    assert source_of("npz:./d") != source_of("imagefolder:./d")  # another loader reads other samples from it
