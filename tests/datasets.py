"""Dataset folders for the tests: the real on-disk formats the loaders read (CIFAR-100's pickles,
Fashion-MNIST's gzipped IDX files), filled with random images of the sizes asked for; folders of image
files (class folders or list files) as users bring them are argse.testing.image_folders's."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from argse.data.loaders import CIFAR_FOLDER, FASHION_CLASSES, FASHION_FILES
from argse.testing.image_folders import DIGITS_TAIL, write_image_folder  # noqa: F401 (the tests take both from here)


def write_cifar100_folder(root: str | Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """Write a small CIFAR-100-format folder (the ``cifar-100-python`` pickles) with random images.

    For tests and offline trials of the real loader; its checksums differ from the official release.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        batch = {"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": name}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    meta = {"fine_label_names": [f"class_{c:02d}" for c in range(100)],
            "coarse_label_names": [f"super_{c:02d}" for c in range(20)]}
    with open(folder / "meta", "wb") as fh:
        pickle.dump(meta, fh)
    return folder


def write_fashion_mnist_folder(root: str | Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """Write the four gzipped Fashion-MNIST IDX files into ``root`` with random 28x28 images.

    For tests and offline trials of the real loader (it warns that the sizes are not the release's).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(len(FASHION_CLASSES), dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        for key, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{FASHION_FILES[key]}.gz", "wb") as fh:
                fh.write(header + array.tobytes())
    return folder
