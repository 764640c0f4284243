"""Source datasets: CIFAR-100 and Fashion-MNIST through torchvision, and scikit-learn's bundled digits.

Every loader returns a :class:`SourceData`: uint8 images ``[N, H, W, C]`` for the train pool and the
held-out pool (the official test set), integer labels, class names and a fingerprint of the pixels
and labels. :data:`LOADERS` holds each source's loader; each dataset preset names its source.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from argse import ArgseError

log = logging.getLogger(__name__)

CIFAR_FOLDER = "cifar-100-python"
CIFAR_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR_FILES = ("train", "test", "meta")
DIGITS_HELDOUT_FRACTION = 0.5
DIGITS_SOURCE_SEED = 20240501  # fixes digits' train/held-out partition, like CIFAR's official one
# Fashion-MNIST's four IDX files (the release ships them gzipped; torchvision also keeps them unpacked).
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")
FASHION_SIZES = (60_000, 10_000)  # train, test images in the official release
# Where Debian's `dataset-fashion-mnist` installs the files; read when --data-dir has none (tests
# point it elsewhere, so they never depend on the package).
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
_FASHION_FIX = f"replace it with the release's file (Debian: `apt-get install --reinstall -y {FASHION_PACKAGE}`)"


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

    train, test = _download(CIFAR100, root, f"CIFAR-100 is not in {root}",
                            f"place {CIFAR_ARCHIVE} (or its extracted {CIFAR_FOLDER}/ folder) in {root}")
    return _make("cifar100-lt", train.data, train.targets, test.data, test.targets, train.classes)


def _download(dataset: type, root: Path, absent: str, remedy: str) -> tuple[Any, Any]:
    """The train and test sets of the torchvision ``dataset`` class, downloaded into ``root``. Offline
    (or an unwritable folder): one line, ``<absent> and could not be downloaded (<error>): <remedy>``."""
    try:
        # torchvision prints each mirror it tries on stdout; a failure is reported once, below.
        with contextlib.redirect_stdout(io.StringIO()):
            return dataset(str(root), train=True, download=True), dataset(str(root), train=False, download=True)
    except Exception as exc:  # urllib / socket / OSError: offline, or an unwritable folder
        raise ArgseError(f"{absent} and could not be downloaded ({type(exc).__name__}): {remedy}") from exc


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


def load_fashion_mnist(data_dir: str | Path) -> SourceData:
    """Fashion-MNIST (60,000 train + 10,000 test 28x28 grey images, 10 classes) as ``[N, 28, 28, 1]``.

    Reads the four IDX files (``.gz`` or unpacked) from the first of ``data_dir``,
    ``data_dir/FashionMNIST/raw`` (torchvision's layout) and :data:`FASHION_SYSTEM_DIR` that holds
    them; when none does, downloads them with ``torchvision.datasets.FashionMNIST(download=True)``.
    Offline with nothing found: one line naming both folders and the ``apt-get`` command. A damaged or
    wrong file is refused with one line naming it; a valid file set of another size (a reduced copy)
    loads with a warning.
    """
    root = Path(data_dir)
    for folder in (root, root / "FashionMNIST" / "raw", FASHION_SYSTEM_DIR):
        paths = _fashion_files(folder)
        if paths is not None:
            return _read_fashion_folder(paths)
    from torchvision.datasets import FashionMNIST

    train, test = _download(FashionMNIST, root, f"Fashion-MNIST is neither in {root} nor in {FASHION_SYSTEM_DIR}",
                            f"run `apt-get install -y {FASHION_PACKAGE}`, or place "
                            f"{', '.join(name + '.gz' for name in FASHION_FILES.values())} in {root}")
    return _make("fashion-mnist-lt", train.data.numpy()[..., None], train.targets.numpy(),
                 test.data.numpy()[..., None], test.targets.numpy(), FASHION_CLASSES)


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (the ``.gz`` preferred), ``None`` when it holds none of them;
    an incomplete set is an error, so a half-copied folder is not silently passed over."""
    found = {}
    for key, name in FASHION_FILES.items():
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                found[key] = candidate
                break
    if not found:
        return None
    if len(found) < len(FASHION_FILES):
        missing = [f"{name}.gz" for key, name in FASHION_FILES.items() if key not in found]
        raise ArgseError(f"{folder} holds only part of Fashion-MNIST (missing {', '.join(missing)}); "
                         "place all four IDX files there")
    return found


def _read_fashion_folder(paths: dict[str, Path]) -> SourceData:
    train_x = _read_idx(paths["train_images"], ndim=3)
    train_y = _read_idx(paths["train_labels"], ndim=1)
    test_x = _read_idx(paths["test_images"], ndim=3)
    test_y = _read_idx(paths["test_labels"], ndim=1)
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        where = f"{paths[split + '_images'].name} and {paths[split + '_labels'].name}"
        if images.shape[1:] != (28, 28):
            raise ArgseError(f"{paths[split + '_images']}: Fashion-MNIST images are 28x28, "
                             f"this file holds {images.shape[1]}x{images.shape[2]}")
        if len(images) != len(labels):
            raise ArgseError(f"{where} do not match: {len(images)} images, {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_CLASSES):
            raise ArgseError(f"{paths[split + '_labels']}: labels must lie in 0..9, found {labels.max()}")
    folder = paths["train_images"].parent
    if (len(train_x), len(test_x)) != FASHION_SIZES:
        log.warning("%s holds %d train and %d test images, not the 60,000 and 10,000 of Fashion-MNIST "
                    "(a reduced copy); its layout is valid, loading it anyway", folder, len(train_x), len(test_x))
    log.info("Fashion-MNIST read from %s", folder)
    return _make("fashion-mnist-lt", train_x[..., None], train_y, test_x[..., None], test_y, FASHION_CLASSES)


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (``.gz`` or not) with ``ndim`` dimensions, as a uint8 array."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ArgseError(f"{path} cannot be read ({type(exc).__name__}: {exc}); {_FASHION_FIX}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ArgseError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) "
                         f"(header {raw[:4].hex() or 'empty'}, expected 000008{ndim:02x}); {_FASHION_FIX}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ArgseError(f"{path} is truncated or padded: its header announces {'x'.join(map(str, dims))} "
                         f"= {int(np.prod(dims))} bytes, it holds {data.size}; {_FASHION_FIX}")
    return data.astype(np.int64) if ndim == 1 else data.reshape(dims).copy()  # copy: writable


LOADERS: dict[str, Callable[[str | Path], SourceData]] = {
    "cifar100": load_cifar100,
    "digits": lambda data_dir: load_digits(),
    "fashion-mnist": load_fashion_mnist,
}


def load_source(source: str, data_dir: str | Path) -> SourceData:
    """The source pools of the images called ``source`` (:data:`LOADERS`; each dataset preset names one)."""
    try:
        loader = LOADERS[source]
    except KeyError:
        raise ArgseError(f"unknown image source {source!r}: choose one of {', '.join(LOADERS)}") from None
    return loader(data_dir)
