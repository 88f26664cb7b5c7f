"""Image-classification data for supernet training, BN recalibration and fitness evaluation.

Data sets, named by the ``--data`` string (:class:`DataSpec`):

- ``embedded`` (default): a stratified Fashion-MNIST subset shipped inside the package
  (``spaceevo/data/fashion_mnist_subset.npz``, 1,000 training and 200 test images per class, built
  by ``scripts/make_embedded_data.py``), so that everything runs offline with no download.
- ``fashion-mnist:DIR``: the full Fashion-MNIST IDX files in DIR, gzipped or not (on Debian:
  ``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``).
- ``imagefolder:DIR``: ImageNet layout, ``DIR/train/<class>/<image>`` and
  ``DIR/val/<class>/<image>``.
- ``cifar10:DIR``: torchvision's CIFAR-10 python batches in ``DIR/cifar-10-batches-py``.

Splits. ``train`` and ``heldout`` are disjoint, stratified, seeded parts of the data set's own
training split: held-out images drive BN recalibration and fitness during search, so the search
never sees ``test``, which is the data set's own test split and is kept for final numbers.
Augmentation (random crop and flip) applies to ``train`` only and can be switched off.

Resolution. Subnets of one supernet run at several input resolutions, so every split produces
images at its ``resolution`` and ``with_resolution(r)`` returns a view at another resolution that
shares the storage and the split indices (nothing is reloaded or re-split). In-memory data
(embedded, Fashion-MNIST, CIFAR-10) keep uint8 pixels and convert whole batches: augment (uint8) ->
float in [0, 1] -> :func:`resize_batch` to ``resolution`` -> normalise. Bilinear resizing and
per-channel normalisation commute, so ``resize_batch(batch, r)`` of a batch loaded at the native
resolution equals the same batch loaded at ``r``: a training loop can load once and resize per
subnet inside one sandwich step. Folder data (ImageNet layout) resize while decoding instead.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.resources
import math
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from spaceevo.errors import ArtifactError, DataError, UsageError

DATA_FORMS = ("embedded", "fashion-mnist:DIR", "imagefolder:DIR", "cifar10:DIR")
"""The accepted forms of the ``--data`` string."""

EMBEDDED_FILE = "fashion_mnist_subset.npz"
"""Name of the embedded subset inside the ``spaceevo.data`` package."""

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four Fashion-MNIST IDX files (each may also be present gzipped, with ``.gz`` appended)."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

# Per-channel mean and standard deviation of pixels in [0, 1] (the data sets' training splits).
_FASHION_MNIST_NORM = ((0.2860,), (0.3530,))
_CIFAR10_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_IMAGENET_CROP_RATIO = 0.875  # evaluation: resize to r / 0.875, then centre-crop r

# IDX element types (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --------------------------------------------------------------------------------------------
# --data strings

_DIR_KINDS = ("fashion-mnist", "imagefolder", "cifar10")


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` string: ``kind`` is one of embedded, fashion-mnist, imagefolder, cifar10;
    ``path`` is the directory for every kind but ``embedded``."""

    kind: str = "embedded"
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """Parse ``embedded`` or ``SCHEME:DIR``; syntax only, files are checked by :meth:`check`."""
        text = text.strip()
        if text == "embedded":
            return cls()
        scheme, sep, rest = text.partition(":")
        if not sep or scheme not in _DIR_KINDS:
            raise DataError(f"unknown data set {text!r}; expected one of: {', '.join(DATA_FORMS)}")
        if not rest.strip():
            raise DataError(f"data set {text!r} names no directory; expected {scheme}:DIR")
        return cls(scheme, Path(rest.strip()).expanduser())

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    def check(self) -> None:
        """Raise :class:`DataError` naming what is missing, without loading anything heavy."""
        if self.kind == "embedded":
            return
        assert self.path is not None
        if self.kind == "fashion-mnist":
            find_idx_files(self.path)
        elif self.kind == "cifar10":
            _check_cifar10(self.path)
        else:
            _imagefolder_classes(self.path)


# --------------------------------------------------------------------------------------------
# IDX files and stratified sampling (shared with scripts/make_embedded_data.py)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a native-endian numpy array."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else path.open("rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header of {ndim} dimensions incomplete)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(dims)
    if len(data) != header + count * dtype.itemsize:
        raise DataError(
            f"{path} holds {len(data) - header} data bytes; its header {dims} promises "
            f"{count * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def find_idx_files(directory: str | Path) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files in ``directory`` by base name (plain file preferred over
    ``.gz``); :class:`DataError` names the directory and every missing file."""
    directory = Path(directory)
    expected = ", ".join(f"{name}[.gz]" for name in FASHION_MNIST_FILES)
    if not directory.is_dir():
        raise DataError(
            f"fashion-mnist: directory {directory} does not exist; expected a directory holding "
            f"{expected} (Debian: apt-get install dataset-fashion-mnist, then "
            f"--data fashion-mnist:{FASHION_MNIST_DEBIAN_DIR})"
        )
    found: dict[str, Path] = {}
    missing = []
    for name in FASHION_MNIST_FILES:
        candidates = [directory / name, directory / f"{name}.gz"]
        present = [path for path in candidates if path.is_file()]
        if present:
            found[name] = present[0]
        else:
            missing.append(f"{name} (or {name}.gz)")
    if missing:
        raise DataError(
            f"fashion-mnist: {directory} lacks {', '.join(missing)}; expected {expected}"
        )
    return found


def stratified_sample(labels: np.ndarray, per_class: Sequence[int], seed: int) -> np.ndarray:
    """Indices of ``per_class[c]`` items of each class ``c``, drawn without replacement with a
    seeded generator; grouped by class, ascending within a class."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(per_class) + 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, count in enumerate(per_class):
        members = order[bounds[cls] : bounds[cls + 1]]
        if count > len(members):
            raise UsageError(f"class {cls} has {len(members)} items; {count} were asked for")
        chosen.append(np.sort(members[rng.permutation(len(members))[:count]]))
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def _heldout_split(
    labels: np.ndarray, num_classes: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) indices: ``fraction`` of every class held out (at least one item of each
    class stays in train), the rest for training; disjoint, sorted."""
    counts = np.bincount(labels, minlength=num_classes)
    per_class = [max(0, min(int(n) - 1, math.floor(fraction * n + 0.5))) for n in counts]
    heldout = np.sort(stratified_sample(labels, per_class, seed))
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), heldout, assume_unique=True)
    return train, heldout


# --------------------------------------------------------------------------------------------
# Splits


def resize_batch(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize float images (N, C, H, W) to ``resolution`` x ``resolution``: bilinear, antialiased
    when shrinking; returned unchanged when already that size. The same resize the in-memory
    splits apply, so resizing a loaded batch equals loading it at ``resolution``."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    return TF.resize(
        images,
        [resolution, resolution],
        interpolation=v2.InterpolationMode.BILINEAR,
        antialias=True,
    )


class ImageSplit(Dataset):
    """One split of a data set. Items are ``(image, label)``: image float32 (C, R, R) normalised
    with the data set's mean/std at R = ``resolution``, label an int. ``indices`` are the rows of
    the underlying storage (the data set's own split) that this split holds."""

    indices: np.ndarray
    resolution: int
    augment: bool

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> np.ndarray:
        """Labels of this split's items, in item order."""
        raise NotImplementedError

    def with_resolution(self, resolution: int) -> ImageSplit:
        """The same items at another resolution (shared storage, nothing reloaded)."""
        return self._variant(resolution=_check_resolution(resolution))

    def with_augment(self, augment: bool) -> ImageSplit:
        """The same items with augmentation switched on or off."""
        return self._variant(augment=augment)

    def _variant(self, **changes: Any) -> ImageSplit:
        other = copy.copy(self)
        other.__dict__.update(changes)
        return other


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-image random crop of a zero-padded batch (N, C, H, W) back to H x W, and a horizontal
    flip of each image with probability 1/2; draws from torch's global RNG.

    Vectorised because a torchvision transform draws one set of parameters per call (a whole
    batch would share one crop) and costs about 150 us per 28 px image when called per item,
    more than the rest of the in-memory pipeline.
    """
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1))
    left = torch.randint(0, 2 * padding + 1, (n, 1))
    columns = torch.arange(width)
    flip = torch.rand(n, 1) < 0.5
    rows = (top + torch.arange(height))[:, :, None]
    cols = (left + torch.where(flip, width - 1 - columns, columns))[:, None, :]
    flat = (rows * (width + 2 * padding) + cols).view(n, 1, height * width)
    cropped = padded.flatten(2).gather(2, flat.expand(n, channels, height * width))
    return cropped.view(n, channels, height, width)


class InMemorySplit(ImageSplit):
    """A split of uint8 images held in memory (N, C, H, W), converted batch-wise: augment
    (:func:`random_crop_flip`, zero padding ``crop_padding``) -> float in [0, 1] ->
    :func:`resize_batch` -> normalise. The DataLoader fetches whole batches through
    ``__getitems__``; ``split[i]`` runs the same code on one item."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: np.ndarray,
        *,
        resolution: int,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int,
    ) -> None:
        self.images = images
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.resolution = resolution
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = crop_padding

    @property
    def targets(self) -> np.ndarray:
        return self.labels.numpy()[self.indices]

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        rows = torch.from_numpy(self.indices[np.asarray(items, dtype=np.int64)])
        images = self.images.index_select(0, rows)
        if self.augment:
            images = random_crop_flip(images, self.crop_padding)
        batch = resize_batch(images.to(torch.float32).div_(255.0), self.resolution)
        batch = (batch - self.mean) / self.std
        return list(zip(batch.unbind(0), self.labels.index_select(0, rows).tolist(), strict=True))

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([item])[0]


class FolderSplit(ImageSplit):
    """A split of an ImageNet-layout folder, decoded per item. Augmentation: RandomResizedCrop +
    horizontal flip; without it: resize to R / 0.875 and centre-crop R."""

    def __init__(
        self,
        folder: ImageFolder,
        indices: np.ndarray,
        *,
        resolution: int,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.folder = folder
        self.indices = np.asarray(indices, dtype=np.int64)
        self.resolution = resolution
        self.augment = augment
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._build_transforms()

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.folder.targets, dtype=np.int64)[self.indices]

    def _variant(self, **changes: Any) -> ImageSplit:
        other = super()._variant(**changes)
        other._build_transforms()
        return other

    def _build_transforms(self) -> None:
        r = self.resolution
        if self.augment:
            geometry = [v2.RandomResizedCrop(r, antialias=True), v2.RandomHorizontalFlip()]
        else:
            geometry = [
                v2.Resize(round(r / _IMAGENET_CROP_RATIO), antialias=True),
                v2.CenterCrop(r),
            ]
        self._transform = v2.Compose(
            [
                v2.ToImage(),
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        image, label = self.folder[int(self.indices[item])]
        return self._transform(image), int(label)


@dataclass(frozen=True)
class Datasets:
    """The three splits of one data set and what a network needs to know about it."""

    train: ImageSplit
    heldout: ImageSplit
    test: ImageSplit
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    name: str
    spec: DataSpec

    @property
    def resolution(self) -> int:
        return self.train.resolution

    def with_resolution(self, resolution: int) -> Datasets:
        """All three splits at another resolution (same items, shared storage)."""
        return replace(
            self,
            train=self.train.with_resolution(resolution),
            heldout=self.heldout.with_resolution(resolution),
            test=self.test.with_resolution(resolution),
        )


# --------------------------------------------------------------------------------------------
# Loading


def load_data(
    spec: str | DataSpec,
    resolution: int,
    *,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
) -> Datasets:
    """Load a data set as train / held-out / test splits at ``resolution``.

    ``heldout_fraction`` of every class of the training split is held out (seeded by ``seed``;
    1,000 images for ``embedded``); ``augment`` switches the train split's augmentation.
    """
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    resolution = _check_resolution(resolution)
    if not 0.0 < heldout_fraction < 1.0:
        raise UsageError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    spec.check()
    if spec.kind == "imagefolder":
        return _load_imagefolder(spec, resolution, heldout_fraction, seed, augment)
    if spec.kind == "embedded":
        arrays = _embedded_arrays()
        source = _InMemorySource(
            "fashion-mnist-subset", *arrays, FASHION_MNIST_CLASSES, _FASHION_MNIST_NORM, 2
        )
    elif spec.kind == "fashion-mnist":
        source = _read_fashion_mnist(spec.path)
    else:
        source = _read_cifar10(spec.path)

    labels = source.train_labels.numpy()
    train_idx, heldout_idx = _heldout_split(labels, len(source.class_names), heldout_fraction, seed)

    def split(
        images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray, aug: bool
    ) -> InMemorySplit:
        return InMemorySplit(
            images,
            labels,
            indices,
            resolution=resolution,
            augment=aug,
            mean=source.norm[0],
            std=source.norm[1],
            crop_padding=source.crop_padding,
        )

    test_idx = np.arange(len(source.test_labels), dtype=np.int64)
    return Datasets(
        train=split(source.train_images, source.train_labels, train_idx, augment),
        heldout=split(source.train_images, source.train_labels, heldout_idx, False),
        test=split(source.test_images, source.test_labels, test_idx, False),
        num_classes=len(source.class_names),
        in_channels=int(source.train_images.shape[1]),
        class_names=tuple(source.class_names),
        name=source.name,
        spec=spec,
    )


@dataclass(frozen=True)
class _InMemorySource:
    name: str
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: Sequence[str]
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    crop_padding: int


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UsageError(f"resolution must be a positive integer, got {resolution!r}")
    return resolution


def _images_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> contiguous uint8 tensor (N, C, H, W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
    return tensor.contiguous()


def _labels_tensor(labels: np.ndarray | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded subset as (train images, train labels, test images, test labels); read once
    per process (decompressing takes most of a second)."""
    resource = importlib.resources.files("spaceevo.data").joinpath(EMBEDDED_FILE)
    try:
        with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {
                key: npz[key]
                for key in ("train_images", "train_labels", "test_images", "test_labels")
            }
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(
            f"the embedded data file spaceevo/data/{EMBEDDED_FILE} is missing or unreadable "
            f"({exc}); reinstall spaceevo or rebuild it with scripts/make_embedded_data.py"
        ) from exc
    return (
        _images_tensor(arrays["train_images"]),
        _labels_tensor(arrays["train_labels"]),
        _images_tensor(arrays["test_images"]),
        _labels_tensor(arrays["test_labels"]),
    )


def _read_fashion_mnist(directory: Path | None) -> _InMemorySource:
    assert directory is not None
    files = find_idx_files(directory)
    arrays = {name: read_idx(path) for name, path in files.items()}
    train_x, train_y, test_x, test_y = (arrays[name] for name in FASHION_MNIST_FILES)
    for images, labels, stem in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"fashion-mnist: {directory}: {stem} images {images.shape} and labels "
                f"{labels.shape} do not match (expected (N, 28, 28) and (N,))"
            )
    return _InMemorySource(
        "fashion-mnist",
        _images_tensor(train_x.astype(np.uint8)),
        _labels_tensor(train_y),
        _images_tensor(test_x.astype(np.uint8)),
        _labels_tensor(test_y),
        FASHION_MNIST_CLASSES,
        _FASHION_MNIST_NORM,
        2,
    )


def _check_cifar10(root: Path) -> None:
    folder = root / CIFAR10_FOLDER
    expected = f"{folder}/{{{','.join(CIFAR10_FILES)}}} (the CIFAR-10 python version, extracted)"
    if not root.is_dir():
        raise DataError(f"cifar10: directory {root} does not exist; expected {expected}")
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"cifar10: {folder} lacks {', '.join(missing)}; expected {expected}")


def _read_cifar10(root: Path | None) -> _InMemorySource:
    assert root is not None
    try:
        train = CIFAR10(root=str(root), train=True, download=False)
        test = CIFAR10(root=str(root), train=False, download=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as exc:
        raise DataError(f"cifar10: cannot read {root / CIFAR10_FOLDER}: {exc}") from exc
    return _InMemorySource(
        "cifar10",
        _images_tensor(train.data),
        _labels_tensor(train.targets),
        _images_tensor(test.data),
        _labels_tensor(test.targets),
        tuple(train.classes),
        _CIFAR10_NORM,
        4,
    )


def _imagefolder_classes(root: Path) -> list[str]:
    """Class folders shared by ``root/train`` and ``root/val``; :class:`DataError` otherwise."""
    expected = f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not root.is_dir():
        raise DataError(f"imagefolder: directory {root} does not exist; expected {expected}")
    classes = {}
    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"imagefolder: {root} lacks the subfolder {sub}/; expected {expected}")
        classes[sub] = sorted(entry.name for entry in os.scandir(root / sub) if entry.is_dir())
        if not classes[sub]:
            raise DataError(
                f"imagefolder: {root / sub} holds no class folders; expected {expected}"
            )
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DataError(
            f"imagefolder: {root}/train and {root}/val must hold the same class folders; "
            f"only in train: {only_train[:5]}, only in val: {only_val[:5]}"
        )
    return classes["train"]


def _load_imagefolder(
    spec: DataSpec, resolution: int, heldout_fraction: float, seed: int, augment: bool
) -> Datasets:
    assert spec.path is not None
    try:
        train = ImageFolder(str(spec.path / "train"))
        val = ImageFolder(str(spec.path / "val"))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagefolder: {spec.path}: {exc}") from exc
    mean, std = _IMAGENET_NORM
    labels = np.asarray(train.targets, dtype=np.int64)
    train_idx, heldout_idx = _heldout_split(labels, len(train.classes), heldout_fraction, seed)

    def split(folder: ImageFolder, indices: np.ndarray, aug: bool) -> FolderSplit:
        return FolderSplit(folder, indices, resolution=resolution, augment=aug, mean=mean, std=std)

    return Datasets(
        train=split(train, train_idx, augment),
        heldout=split(train, heldout_idx, False),
        test=split(val, np.arange(len(val), dtype=np.int64), False),
        num_classes=len(train.classes),
        in_channels=3,
        class_names=tuple(train.classes),
        name="imagefolder",
        spec=spec,
    )


# --------------------------------------------------------------------------------------------
# Loaders


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    *,
    workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` whose shuffling is seeded by ``seed``.

    ``workers=None`` picks 0 worker processes for in-memory splits (the pixels are already in
    memory and a batch costs well under a millisecond per image, less than starting and feeding
    worker processes), and ``min(8, CPUs - 1)`` for data decoded from files. Memory is pinned only
    when CUDA is available. When ``torch.distributed`` is initialised (and ``distributed`` is not
    False), a ``DistributedSampler`` (seeded, shuffling as asked) gives each rank its shard; call
    ``loader.sampler.set_epoch(e)`` every epoch for a new order. ``distributed=False`` gives every
    rank the whole data set (BN recalibration and evaluation, which must see the same images on
    every rank). Augmentation draws from torch's global RNG in the main process
    (seed it with ``torch.manual_seed`` for reproducible training); worker processes are seeded
    from ``seed``.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if workers is None:
        workers = (
            0 if isinstance(dataset, InMemorySplit) else max(1, min(8, (os.cpu_count() or 2) - 1))
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
    )
