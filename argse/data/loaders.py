"""Source datasets: CIFAR-100 through torchvision, and scikit-learn's bundled digits.

Both loaders return a :class:`SourceData`: uint8 images ``[N, H, W, C]`` for the train pool and the
held-out pool (CIFAR's test set), integer labels, class names and a fingerprint of the bytes.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from argse import ArgseError

log = logging.getLogger(__name__)

CIFAR_FOLDER = "cifar-100-python"
CIFAR_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR_FILES = ("train", "test", "meta")
DIGITS_HELDOUT_FRACTION = 0.5
DIGITS_SOURCE_SEED = 20240501  # fixes digits' train/held-out partition, like CIFAR's official one


@dataclass(frozen=True)
class SourceData:
    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int64 [N]
    heldout_images: np.ndarray  # uint8 [M, H, W, C]
    heldout_labels: np.ndarray  # int64 [M]
    class_names: tuple[str, ...]
    fingerprint: str  # sha256 of images and labels, both pools

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _make(name, train_x, train_y, test_x, test_y, class_names) -> SourceData:
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    return SourceData(
        name=name, train_images=train_x, train_labels=train_y, heldout_images=test_x,
        heldout_labels=test_y, class_names=tuple(class_names),
        fingerprint=fingerprint_arrays(train_x, train_y, test_x, test_y),
    )


def load_digits() -> SourceData:
    """scikit-learn's 1,797 8x8 digits (bundled, offline), scaled from 0..16 to uint8 0..255.

    Half of each class (fixed, seeded partition) is held out for tunev / val / test; the rest is
    the pool the long-tailed train set is drawn from.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SOURCE_SEED)
    heldout = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen = rng.choice(idx, size=int(round(len(idx) * DIGITS_HELDOUT_FRACTION)), replace=False)
        heldout[chosen] = True
    names = [str(c) for c in range(10)]
    return _make("digits-lt", images[~heldout], labels[~heldout], images[heldout], labels[heldout], names)


def load_cifar100(data_dir: str | Path) -> SourceData:
    """CIFAR-100 from ``data_dir`` through ``torchvision.datasets.CIFAR100(download=True)``.

    A ``cifar-100-python/`` folder whose checksums differ from the official release (a reduced or
    re-packed copy) is loaded with a warning after its layout is checked; a wrong layout is refused.
    Offline with nothing in ``data_dir``: one line naming the folder and the file to place there.
    """
    root = Path(data_dir)
    folder = root / CIFAR_FOLDER
    if folder.is_dir():
        return _load_cifar_folder(root)
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(str(root), train=True, download=True)
        test = CIFAR100(str(root), train=False, download=True)
    except Exception as exc:  # urllib / socket / OSError: offline, or an unwritable folder
        raise ArgseError(
            f"CIFAR-100 is not in {root} and could not be downloaded ({type(exc).__name__}): "
            f"place {CIFAR_ARCHIVE} (or its extracted {CIFAR_FOLDER}/ folder) in {root}"
        ) from exc
    return _make("cifar100-lt", train.data, train.targets, test.data, test.targets, train.classes)


def _load_cifar_folder(root: Path) -> SourceData:
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(str(root), train=True, download=False)
        test = CIFAR100(str(root), train=False, download=False)
        return _make("cifar100-lt", train.data, train.targets, test.data, test.targets, train.classes)
    except RuntimeError:
        pass  # torchvision's integrity (MD5) check failed: check the layout ourselves
    folder = root / CIFAR_FOLDER
    train_x, train_y = _read_cifar_batch(folder, "train")
    test_x, test_y = _read_cifar_batch(folder, "test")
    meta = _read_pickle(folder, "meta")
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        raise ArgseError(
            f"{folder / 'meta'} must hold 'fine_label_names' with 100 names; re-extract {CIFAR_ARCHIVE}"
        )
    log.warning(
        "%s does not match the official CIFAR-100 checksums (a reduced or re-packed copy); "
        "its layout is valid, loading it anyway", folder,
    )
    return _make("cifar100-lt", train_x, train_y, test_x, test_y, names)


def _read_pickle(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise ArgseError(f"{path} is missing: place the complete {CIFAR_FOLDER}/ folder in {folder.parent}")
    try:
        with open(path, "rb") as fh:
            raw = pickle.load(fh, encoding="latin1")
    except Exception as exc:
        raise ArgseError(f"{path} is not a CIFAR pickle ({exc}); re-extract {CIFAR_ARCHIVE}") from exc
    if not isinstance(raw, dict):
        raise ArgseError(f"{path} must hold a dict as in the CIFAR-100 python release")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_cifar_batch(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_pickle(folder, name)
    path = folder / name
    for key in ("data", "fine_labels"):
        if key not in raw:
            raise ArgseError(f"{path} has no {key!r} entry; re-extract {CIFAR_ARCHIVE}")
    data = np.asarray(raw["data"])
    labels = np.asarray(raw["fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise ArgseError(
            f"{path}: 'data' must be uint8 of shape [N, 3072], got {data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise ArgseError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 99):
        raise ArgseError(f"{path}: fine labels must lie in 0..99, found {labels.min()}..{labels.max()}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels


def load_source(dataset: str, data_dir: str | Path) -> SourceData:
    """The source pools of a benchmark preset."""
    if dataset == "digits-lt":
        return load_digits()
    if dataset == "cifar100-lt":
        return load_cifar100(data_dir)
    raise ArgseError(f"unknown dataset {dataset!r}: choose cifar100-lt or digits-lt")


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
