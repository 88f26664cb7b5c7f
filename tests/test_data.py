"""Tests of the training data layer (spaceevo.train.data) and the embedded Fashion-MNIST subset."""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spaceevo.errors import DataError, UsageError
from spaceevo.train import data as D

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_embedded_data.py"
EMBEDDED = Path(str(importlib.resources.files("spaceevo.data").joinpath(D.EMBEDDED_FILE)))
TRAIN_PER_CLASS, TEST_PER_CLASS = 1000, 200


@pytest.fixture(scope="module")
def embedded() -> D.Datasets:
    return D.load_data("embedded", 28)


def stack(split: D.ImageSplit, count: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    items = split.__getitems__(list(range(count or len(split))))
    return torch.stack([x for x, _ in items]), np.array([y for _, y in items])


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """The IDX format, written independently of the reader under test."""
    codes = {
        np.dtype("u1"): 0x08,
        np.dtype("i1"): 0x09,
        np.dtype(">i2"): 0x0B,
        np.dtype(">i4"): 0x0C,
        np.dtype(">f4"): 0x0D,
        np.dtype(">f8"): 0x0E,
    }
    big = array.astype(array.dtype.newbyteorder(">"))
    payload = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload += big.tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def fake_fashion_mnist(directory: Path, *, per_class: int = 3, gz: bool = True) -> Path:
    """A tiny data set in the Fashion-MNIST file layout (random pixels)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", 10 * per_class), ("t10k", 10)):
        suffix = ".gz" if gz else ""
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(directory / f"{stem}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(
            directory / f"{stem}-labels-idx1-ubyte{suffix}",
            np.arange(n, dtype=np.uint8) % 10,
            gz=gz,
        )
    return directory


# ---------------------------------------------------------------------------------------------
# The embedded file


def test_embedded_file_is_small_stratified_and_licensed() -> None:
    assert EMBEDDED.is_file()
    assert EMBEDDED.stat().st_size <= 5_000_000
    with np.load(EMBEDDED, allow_pickle=False) as npz:
        for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            assert images.dtype == np.uint8 and images.shape == (10 * per_class, 28, 28)
            assert labels.dtype == np.uint8
            assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
            assert len(np.unique(npz[f"{split}_source_index"])) == 10 * per_class
        assert tuple(npz["class_names"]) == D.FASHION_MNIST_CLASSES
        provenance = str(npz["provenance"])
    assert "Zalando SE" in provenance and "scripts/make_embedded_data.py" in provenance
    licence = (EMBEDDED.parent / "LICENSE-fashion-mnist.txt").read_text()
    assert "Copyright (c) 2017 Zalando SE" in licence and "scripts/make_embedded_data.py" in licence


@pytest.mark.skipif(
    not D.FASHION_MNIST_DEBIAN_DIR.is_dir(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_script_reproduces_the_shipped_file_byte_for_byte(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_embedded_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "x.npz"
    assert module.main(["--output", str(out)]) == 0
    assert out.read_bytes() == EMBEDDED.read_bytes()


def test_script_reports_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("make_embedded_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (
        module.main(["--source", str(tmp_path / "none"), "--output", str(tmp_path / "x.npz")]) == 2
    )
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


# ---------------------------------------------------------------------------------------------
# Splits


def test_embedded_splits_are_disjoint_stratified_and_seeded(embedded: D.Datasets) -> None:
    train, heldout = embedded.train.indices, embedded.heldout.indices
    assert len(np.intersect1d(train, heldout)) == 0
    assert np.array_equal(np.union1d(train, heldout), np.arange(10 * TRAIN_PER_CLASS))
    assert np.bincount(embedded.heldout.targets).tolist() == [TRAIN_PER_CLASS // 10] * 10
    assert np.bincount(embedded.train.targets).tolist() == [TRAIN_PER_CLASS * 9 // 10] * 10
    assert np.bincount(embedded.test.targets).tolist() == [TEST_PER_CLASS] * 10
    assert embedded.train.images is embedded.heldout.images  # held-out is carved from train
    assert np.array_equal(D.load_data("embedded", 28, seed=0).heldout.indices, heldout)
    assert not np.array_equal(D.load_data("embedded", 28, seed=1).heldout.indices, heldout)
    assert len(D.load_data("embedded", 28, heldout_fraction=0.2).heldout) == 2 * TRAIN_PER_CLASS


def test_items_are_normalised_float_images(embedded: D.Datasets) -> None:
    assert (embedded.num_classes, embedded.in_channels, embedded.name) == (
        10,
        1,
        "fashion-mnist-subset",
    )
    assert embedded.class_names == D.FASHION_MNIST_CLASSES and str(embedded.spec) == "embedded"
    image, label = embedded.heldout[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert isinstance(label, int) and label == embedded.heldout.targets[0]
    images, _ = stack(embedded.heldout)
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    raw = embedded.heldout.images[int(embedded.heldout.indices[0])].float() / 255
    torch.testing.assert_close(image, (raw - 0.2860) / 0.3530)


def test_resolution_views_share_storage_and_match_resize_batch(embedded: D.Datasets) -> None:
    at32 = D.load_data("embedded", 32)
    assert at32.train[0][0].shape == (1, 32, 32) and at32.resolution == 32
    view = embedded.with_resolution(32)
    assert view.heldout.images is embedded.heldout.images
    assert np.array_equal(view.heldout.indices, embedded.heldout.indices)
    native, labels = stack(embedded.heldout, 16)
    for resolution in (24, 32):
        resized, labels_r = stack(embedded.heldout.with_resolution(resolution), 16)
        assert resized.shape == (16, 1, resolution, resolution)
        torch.testing.assert_close(D.resize_batch(native, resolution), resized)
        assert np.array_equal(labels, labels_r)
    assert D.resize_batch(native, 28) is native
    with pytest.raises(UsageError):
        embedded.with_resolution(0)


def test_augmentation_on_train_only_and_switchable(embedded: D.Datasets) -> None:
    assert embedded.train.augment and not embedded.heldout.augment and not embedded.test.augment
    torch.manual_seed(0)
    draws = torch.stack([embedded.train[0][0] for _ in range(12)])
    assert len(torch.unique(draws, dim=0)) > 1
    for split in (
        embedded.heldout,
        embedded.test,
        embedded.train.with_augment(False),
        D.load_data("embedded", 28, augment=False).train,
    ):
        assert not split.augment
        torch.testing.assert_close(split[3][0], split[3][0], rtol=0, atol=0)
    assert embedded.with_resolution(24).train.augment


def test_random_crop_flip_takes_windows_of_the_padded_image() -> None:
    images = torch.arange(2 * 36, dtype=torch.uint8).view(1, 2, 6, 6).repeat(64, 1, 1, 1)
    padded = torch.nn.functional.pad(images[0], (2, 2, 2, 2))
    windows = [padded[:, y : y + 6, x : x + 6] for y in range(5) for x in range(5)]
    windows += [w.flip(-1) for w in windows]
    torch.manual_seed(0)
    out = D.random_crop_flip(images, 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for crop in out:
        assert any(torch.equal(crop, w) for w in windows)
    assert len(torch.unique(out, dim=0)) > 10


# ---------------------------------------------------------------------------------------------
# IDX files and --data strings


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path: Path, gz: bool, dtype: str) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    read = D.read_idx(write_idx(tmp_path / "a-idx3-ubyte", array, gz=gz))
    assert read.dtype == np.dtype(dtype) and read.dtype.isnative
    assert np.array_equal(read, array)


def test_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="bad magic"):
        D.read_idx(tmp_path / "bad")
    good = write_idx(tmp_path / "good", np.zeros((4, 2), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(DataError, match="short"):
        D.read_idx(tmp_path / "short")


def test_data_spec_parsing() -> None:
    assert D.DataSpec.parse("embedded") == D.DataSpec()
    spec = D.DataSpec.parse("cifar10:/data/c")
    assert (spec.kind, spec.path, str(spec)) == ("cifar10", Path("/data/c"), "cifar10:/data/c")
    for text in ("mnist:/x", "embedded:/x", "/some/dir"):
        with pytest.raises(DataError) as info:
            D.DataSpec.parse(text)
        assert all(form in str(info.value) for form in D.DATA_FORMS)
    with pytest.raises(DataError, match="imagefolder:DIR"):
        D.DataSpec.parse("imagefolder:")


def test_fashion_mnist_dir_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        D.load_data("fashion-mnist:/nonexistent", 28)
    message = str(info.value)
    assert "/nonexistent" in message and all(name in message for name in D.FASHION_MNIST_FILES)
    directory = fake_fashion_mnist(tmp_path / "fm")
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        D.load_data(f"fashion-mnist:{directory}", 28)
    assert "lacks t10k-labels-idx1-ubyte" in str(info.value) and str(directory) in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_dir_loads(tmp_path: Path, gz: bool) -> None:
    data = D.load_data(f"fashion-mnist:{fake_fashion_mnist(tmp_path, per_class=10, gz=gz)}", 28)
    assert (len(data.train), len(data.heldout), len(data.test)) == (90, 10, 10)
    assert np.bincount(data.heldout.targets).tolist() == [1] * 10
    assert data.name == "fashion-mnist" and data.train[0][0].shape == (1, 28, 28)


def test_cifar10_missing_or_corrupt_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        D.load_data(f"cifar10:{tmp_path}", 32)
    assert "cifar-10-batches-py" in str(info.value) and "data_batch_1" in str(info.value)
    folder = tmp_path / D.CIFAR10_FOLDER
    folder.mkdir()
    for name in D.CIFAR10_FILES:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cifar10: cannot read"):
        D.load_data(f"cifar10:{tmp_path}", 32)


def test_imagefolder_loads_and_checks_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = D.load_data(f"imagefolder:{tmp_path}", 16)
    assert (data.num_classes, data.in_channels, data.class_names) == (2, 3, ("a", "b"))
    assert (len(data.train), len(data.heldout), len(data.test)) == (18, 2, 2)
    assert np.bincount(data.heldout.targets).tolist() == [1, 1]
    assert len(np.intersect1d(data.train.indices, data.heldout.indices)) == 0
    image, label = data.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label in (0, 1)
    assert data.with_resolution(24).test[1][0].shape == (3, 24, 24)
    assert data.test[1][1] == 1
    (tmp_path / "val" / "b" / "0.png").unlink()
    (tmp_path / "val" / "b").rmdir()
    with pytest.raises(DataError, match="same class folders"):
        D.load_data(f"imagefolder:{tmp_path}", 16)
    with pytest.raises(DataError, match="val/"):
        D.load_data(f"imagefolder:{tmp_path / 'train'}", 16)


# ---------------------------------------------------------------------------------------------
# Loaders


def test_make_loader_is_seeded_and_in_process(embedded: D.Datasets) -> None:
    def loader(seed: int) -> torch.utils.data.DataLoader:
        return D.make_loader(embedded.heldout, 64, True, seed=seed)

    first = next(iter(loader(0)))
    assert first[0].shape == (64, 1, 28, 28) and first[1].dtype == torch.int64
    assert loader(0).num_workers == 0 and loader(0).pin_memory == torch.cuda.is_available()
    orders = [torch.cat([y for _, y in loader(seed)]) for seed in (0, 0, 1)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    sequential = D.make_loader(embedded.test, 500, False, drop_last=True)
    assert [len(y) for _, y in sequential] == [500] * 4
    with pytest.raises(UsageError):
        D.make_loader(embedded.test, 0, False)


def test_make_loader_shards_under_torch_distributed(embedded: D.Datasets, tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        loader = D.make_loader(embedded.heldout, 100, True, seed=3)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert loader.sampler.seed == 3 and loader.sampler.shuffle
        assert sum(len(y) for _, y in loader) == len(embedded.heldout)
    finally:
        dist.destroy_process_group()
