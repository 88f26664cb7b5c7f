#!/usr/bin/env python3
"""Build the embedded Fashion-MNIST subset shipped as spaceevo/data/fashion_mnist_subset.npz.

Reads the four Fashion-MNIST IDX files (gzipped or not) with the library's IDX reader, draws a
stratified, seeded subset of the training and test splits (equal count per class) and writes an
.npz atomically: uint8 ``train_images``/``test_images`` (N, 28, 28), uint8 ``train_labels``/
``test_labels``, ``train_source_index``/``test_source_index`` (rows in the source files),
``class_names`` and a ``provenance`` string.

The output is byte-for-byte reproducible: members are written in a fixed order with fixed zip
timestamps and permissions. They are bzip2-compressed (numpy reads any zip method): Fashion-MNIST
pixels compress poorly, and bzip2 keeps 12,000 images under 5 MB where deflate does not.

Example (Debian: apt-get install dataset-fashion-mnist):
    python scripts/make_embedded_data.py --source /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from spaceevo.errors import SpaceEvoError
from spaceevo.io import atomic_write_bytes
from spaceevo.train.data import (
    EMBEDDED_FILE,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEBIAN_DIR,
    FASHION_MNIST_FILES,
    find_idx_files,
    read_idx,
    stratified_sample,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "spaceevo" / "data" / EMBEDDED_FILE
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic .npz (zip of .npy members, bzip2 level 9, fixed timestamps) in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(
                info, member.getvalue(), compress_type=zipfile.ZIP_BZIP2, compresslevel=9
            )
    return buffer.getvalue()


def build_subset(
    source: Path, train_per_class: int, test_per_class: int, seed: int
) -> dict[str, np.ndarray]:
    """The subset's arrays, in the order they are written."""
    files = find_idx_files(source)
    data = {name: read_idx(files[name]) for name in FASHION_MNIST_FILES}
    train_x, train_y, test_x, test_y = (data[name] for name in FASHION_MNIST_FILES)
    classes = len(FASHION_MNIST_CLASSES)
    # Independent streams for the two splits, so changing one count leaves the other split alone.
    train_idx = stratified_sample(train_y, [train_per_class] * classes, seed)
    test_idx = stratified_sample(test_y, [test_per_class] * classes, seed + 1)
    digest = hashlib.sha256()
    for name in FASHION_MNIST_FILES:
        digest.update(np.ascontiguousarray(data[name]).tobytes())
    provenance = (
        "Fashion-MNIST (c) 2017 Zalando SE, MIT licence, "
        "https://github.com/zalandoresearch/fashion-mnist. "
        "Stratified subset built by scripts/make_embedded_data.py: "
        f"{train_per_class} images per class "
        f"from train-images-idx3-ubyte, {test_per_class} per class from t10k-images-idx3-ubyte, "
        f"seed {seed}; grouped by class, ascending source row within a class "
        f"(*_source_index). sha256 of the four decoded IDX arrays: {digest.hexdigest()}"
    )
    return {
        "train_images": train_x[train_idx].astype(np.uint8),
        "train_labels": train_y[train_idx].astype(np.uint8),
        "test_images": test_x[test_idx].astype(np.uint8),
        "test_labels": test_y[test_idx].astype(np.uint8),
        "train_source_index": train_idx.astype(np.uint16),
        "test_source_index": test_idx.astype(np.uint16),
        "class_names": np.array(FASHION_MNIST_CLASSES),
        "provenance": np.array(provenance),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=FASHION_MNIST_DEBIAN_DIR,
        help="directory with the four Fashion-MNIST IDX files, gzipped or not "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=1000,
        help="training images per class (default: %(default)s)",
    )
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=200,
        help="test images per class (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the stratified draw (default: %(default)s)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="the .npz to write (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        arrays = build_subset(args.source, args.train_per_class, args.test_per_class, args.seed)
    except SpaceEvoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    path = atomic_write_bytes(args.output, npz_bytes(arrays))
    path.chmod(0o644)  # a shipped package file, readable by everyone (the temp file was 0600)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): "
        f"{len(arrays['train_images'])} train, {len(arrays['test_images'])} test images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
