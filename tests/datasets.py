"""Dataset folders for the tests: the real on-disk formats the loaders read (CIFAR-100's pickles,
Fashion-MNIST's gzipped IDX files), filled with random images of the sizes asked for, and folders of
image files (class folders or list files) as users bring them."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from argse.data.loaders import CIFAR_FOLDER, FASHION_CLASSES, FASHION_FILES


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


#: A natural long tail over the ten digits: class 0 the head, class 9 the tail.
DIGITS_TAIL = (40, 30, 22, 16, 12, 9, 7, 5, 4, 3)


def write_image_folder(root: str | Path, train_counts: tuple[int, ...] = DIGITS_TAIL, per_class_test: int = 4, *,
                       size: int = 32, suffix: str = ".png", grey: bool | str = False, lists: bool = False,
                       per_class_val: int = 0, class_names: bool = True, seed: int = 0) -> Path:
    """Write scikit-learn's digits as image files under ``root``, as a user's folder holds them: class
    folders ``train/<digit>/`` and ``test/<digit>/`` (and ``val/`` with ``per_class_val``), or with
    ``lists`` the images under ``images/<digit>/`` and ImageNet-LT-style ``train.txt`` / ``test.txt`` /
    ``val.txt`` (with ``class_names`` a ``classes.txt``). Each digit is scaled to ``size`` x ``size``
    and given a random tint (RGB), or kept grey (``grey=True``), or every other image grey
    (``grey="mixed"``); ``suffix`` ``.png`` or ``.jpg``. Returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = [f"digit{c}" for c in range(len(train_counts))]
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(names):
        pool = rng.permutation(np.flatnonzero(digits.target == c))
        take = {"train": train_counts[c], "val": per_class_val, "test": per_class_test}
        start = 0
        for split in ("train", "val", "test"):
            for i in pool[start:start + take[split]]:
                pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
                if grey is False or (grey == "mixed" and i % 2):
                    tint = rng.uniform(0.4, 1.0, 3)
                    image = Image.fromarray((np.asarray(image)[..., None] * tint).astype(np.uint8), "RGB")
                relative = (f"images/{name}/{split}-{i}{suffix}" if lists else f"{split}/{name}/{i}{suffix}")
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / relative)
                lines[split].append(f"{relative} {c}")
            start += take[split]
    if lists:
        for split, rows in lines.items():
            if rows:
                (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
        if class_names:
            (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root
