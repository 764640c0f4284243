"""A dataset given by where its images are: a folder of class subfolders, or list files over one.

Two layouts of a folder ``DIR`` are read (the list files win where both are present):

* **Class folders**, as torchvision's ``ImageFolder`` reads them: ``DIR/train/<class>/...`` and
  ``DIR/test/<class>/...`` (and optionally ``DIR/val/<class>/...``). A class is a folder name; the
  classes are sorted by name (label 0 first); images are found at any depth under their class
  folder by extension (:data:`IMAGE_EXTENSIONS`, any case), in sorted path order. Hidden files and
  other files are passed over and counted.
* **List files**, ImageNet-LT's format: ``DIR/train.txt`` and ``DIR/test.txt`` (optionally
  ``DIR/val.txt``), one ``relative/path label`` line per image, the path relative to ``DIR`` and the
  label an integer from 0. Class names come from ``DIR/classes.txt`` (one per line, line i naming
  label i) when present, else from the folder that holds each label's training images where that is
  one folder per label (``train/n01440764/...``), else the label itself.

``train`` is the pool the training set is taken from (the natural tail kept, or drawn long-tailed by
an imbalance factor, :func:`argse.data.splits.make_splits`); ``test`` the held-out pool that tunev,
val and test are drawn from; a ``val`` pool, where the folder brings one (ImageNet-LT's
``val.txt``), can be the pool tunev and val are drawn from, and ``test`` is then the test split as it
is (:meth:`FolderScan.source`).

:func:`scan_folder` reads the layout and every image's header (its size and mode, not its pixels)
and returns a :class:`FolderScan`: the classes, the images of each pool, the sizes and modes seen,
the files it could not read, the files passed over, and a digest of the file list. Every problem
of the layout is an :class:`~argse.ArgseUsageError` of one line that says what is wrong and what to
do. Reading the pixels is :mod:`argse.data.stream`'s.

**Unreadable images fail the scan by default**, naming the first such file and how many there are.
Skipping them silently would change the class counts, and with them the head/tail groups and the
long-tail prior this project measures, and would make the dataset depend on what the installed
image library can read; the digest would then name "this folder minus whatever failed here". A
folder that holds a few broken files on purpose (a scraped collection) says so in its dataset card
(``skip_unreadable: true``): they are then left out, counted, named in the dry run and recorded in
the digest. An image whose header reads but whose pixels do not (a truncated JPEG) is found when it
is decoded (before training on the in-memory path, in the first epoch when streamed) and always
fails, naming the file.

**Grey and colour**: the images are converted to one mode, grey (one channel) when every image is
grey, else RGB (grey images repeated over three channels); 16-bit grey images are scaled to 8 bits.
The scan says what it converts.

**Held in memory or streamed** (:meth:`FolderScan.storage`): the images decoded at the training size
(uint8, ``N x S x S x C``, every pool) are held in memory when they take at most
:data:`MEMORY_SHARE` of the memory available to them (times the number of processes that each hold a
copy), and streamed from the folder otherwise.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from argse import ArgseUsageError

#: The extensions torchvision's ``ImageFolder`` reads, compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
POOLS = ("train", "val", "test")  # val is optional
LIST_SUFFIX = ".txt"
CLASSES_FILE = "classes.txt"
LAYOUTS = ("folders", "lists")
STORAGE = ("auto", "memory", "stream")
#: Share of the available memory the decoded images may take to be held in memory (all copies).
MEMORY_SHARE = 0.5
#: Pillow modes of grey images; every other mode is colour.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
SHOWN = 3  # files named in a one-line error before "and N more"


@dataclass(frozen=True)
class FolderOptions:
    """How a folder is read, beyond what a dataset preset holds (keys of the dataset card)."""

    storage: str = "auto"  # auto: by decoded size against free memory (FolderScan.storage); memory; stream
    skip_unreadable: bool = False  # leave out (and count) files that cannot be read, rather than fail
    val_pool: bool = True  # where the folder has a val pool, draw tunev and val from it, test as it is


@dataclass(frozen=True)
class ImageFiles:
    """Labelled image files under one root: what a reader needs, and cheap to send to worker processes
    (numpy arrays, no Python object per file)."""

    root: str
    paths: np.ndarray  # bytes (os.fsencode), relative to root
    labels: np.ndarray  # int64
    sizes: np.ndarray  # int64 [N, 2]: width, height from the header

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def subset(self, indices: np.ndarray) -> "ImageFiles":
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFiles(self.root, self.paths[indices], self.labels[indices], self.sizes[indices])

    @staticmethod
    def concat(*parts: "ImageFiles") -> "ImageFiles":
        return ImageFiles(parts[0].root, np.concatenate([p.paths for p in parts]),
                          np.concatenate([p.labels for p in parts]), np.concatenate([p.sizes for p in parts]))


@dataclass(frozen=True)
class Unreadable:
    path: str  # relative to the folder
    reason: str


@dataclass(frozen=True)
class FolderSource:
    """A folder's pools in the shape :func:`argse.data.splits.make_splits` draws from: the train pool
    and the held-out pool (the val pool's images first where it is used, then the test pool's),
    their labels and a fingerprint (the scan's digest)."""

    name: str
    train: ImageFiles
    heldout: ImageFiles
    class_names: tuple[str, ...]
    fingerprint: str
    #: held-out rows that form the test split as they are (the test pool, where a val pool is the pool
    #: of tunev and val); None: tunev, val and test are all drawn from the held-out pool.
    heldout_test: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels

    @property
    def heldout_labels(self) -> np.ndarray:
        return self.heldout.labels

    def files(self, split: str, indices: np.ndarray) -> ImageFiles:
        """The files of a split given its indices (``train`` into the train pool, the others into the
        held-out pool), as :class:`argse.data.splits.Splits` keeps them."""
        return (self.train if split == "train" else self.heldout).subset(indices)


@dataclass(frozen=True)
class Storage:
    kind: str  # "memory" or "stream"
    reason: str


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_folder` found in a folder (see the module's description)."""

    root: Path
    layout: str  # "folders" or "lists"
    class_names: tuple[str, ...]
    pools: Mapping[str, ImageFiles]  # train, test, and val where the folder has one
    modes: Mapping[str, int]  # Pillow mode -> images
    unreadable: tuple[Unreadable, ...]  # left out (skip_unreadable); empty otherwise
    ignored: Mapping[str, int]  # extension (or "hidden") -> files passed over
    digest: str  # sha256 of the class names, every kept file (pool, path, label, bytes, mtime) and the skipped
    nbytes: int = 0  # bytes of the image files read

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """1 when every image is grey, else 3 (grey images are then converted to RGB)."""
        return 1 if set(self.modes) <= GREY_MODES else 3

    @property
    def num_images(self) -> int:
        return sum(len(p) for p in self.pools.values())

    def files(self, pool: str) -> ImageFiles:
        return self.pools[pool]

    def counts(self, pool: str = "train") -> np.ndarray:
        """Images per class in ``pool``."""
        return np.bincount(self.pools[pool].labels, minlength=self.num_classes)

    def conversions(self) -> list[str]:
        """What reading converts, in words (empty when the images are read as they are)."""
        out = []
        grey = {m: n for m, n in self.modes.items() if m in GREY_MODES}
        colour = {m: n for m, n in self.modes.items() if m not in GREY_MODES}
        target = "L" if self.channels == 1 else "RGB"
        if grey and colour:
            out.append(f"grey and colour are mixed: {sum(grey.values()):,} grey images are converted to RGB")
        others = sorted(m for m in self.modes if m not in (target, "I;16", "I;16L", "I;16B", "I;16N")
                        and not (grey and colour and m in grey))
        if others:
            out.append(f"{', '.join(f'{m} ({self.modes[m]:,})' for m in others)} converted to {target}")
        sixteen = sum(n for m, n in self.modes.items() if m.startswith("I;16"))
        if sixteen:
            out.append(f"{sixteen:,} 16-bit grey images scaled to 8 bits")
        return out

    def decoded_bytes(self, image_size: int) -> int:
        """Bytes of every pool's images decoded at ``image_size`` x ``image_size`` (uint8)."""
        return self.num_images * image_size * image_size * self.channels

    def storage(self, image_size: int, *, choice: str = "auto", available: int | None = None,
                copies: int = 1) -> Storage:
        """Held in memory or streamed: ``choice`` (``auto``, ``memory``, ``stream``); ``auto`` holds
        them in memory when ``copies`` copies of the decoded images take at most :data:`MEMORY_SHARE`
        of ``available`` bytes (default: the host's available memory; pass the device's free memory
        where the images are held on a GPU)."""
        if choice not in STORAGE:
            raise ArgseUsageError(f"storage {choice!r}: choose one of {', '.join(STORAGE)}")
        need = self.decoded_bytes(image_size) * copies
        size = f"{_size(need)} decoded at {image_size}x{image_size}x{self.channels}" + (
            f" x {copies} copies" if copies > 1 else "")
        if choice != "auto":
            return Storage(choice, f"storage: {choice} in the dataset card ({size})")
        if available is None:
            from argse.training.utils import memory_available

            available = memory_available()
        if available is None:
            return Storage("stream", f"{size}; the available memory is unknown")
        if need <= MEMORY_SHARE * available:
            return Storage("memory", f"{size} fit in {MEMORY_SHARE:.0%} of the {_size(available)} available")
        return Storage("stream", f"{size} exceed {MEMORY_SHARE:.0%} of the {_size(available)} available")

    def source(self, name: str, *, val_pool: bool = True) -> FolderSource:
        """The pools as :func:`~argse.data.splits.make_splits` takes them: with a val pool (and
        ``val_pool``), tunev and val are drawn from it and the test pool is the test split as it is;
        otherwise all three are drawn from the test pool (a val pool is then not used)."""
        test = self.pools["test"]
        if val_pool and "val" in self.pools:
            val = self.pools["val"]
            mask = np.concatenate([np.zeros(len(val), dtype=bool), np.ones(len(test), dtype=bool)])
            return FolderSource(name, self.pools["train"], ImageFiles.concat(val, test), self.class_names,
                                self.digest, mask)
        return FolderSource(name, self.pools["train"], test, self.class_names, self.digest)

    def write_file_list(self, path: str | Path) -> Path:
        """Every kept file as a tab-separated table (pool, path relative to the folder, label, class,
        width, height): the file list a run records beside the digest."""
        path = Path(path)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("pool\tpath\tlabel\tclass\twidth\theight\n")
            for pool, files in self.pools.items():
                for relative, label, (width, height) in zip(files.paths, files.labels, files.sizes):
                    fh.write(f"{pool}\t{os.fsdecode(relative)}\t{label}\t{self.class_names[label]}\t{width}\t{height}\n")
        return path

    def describe(self) -> list[str]:
        """What the dry run prints about the folder: layout, classes, images per class, sizes and
        modes, conversions, files left out and passed over, the digest."""
        kind = "class folders" if self.layout == "folders" else "list files"
        pools = ", ".join(f"{name} {len(files):,}" for name, files in self.pools.items())
        counts = self.counts("train")
        order = np.argsort(-counts, kind="stable")
        shown = [f"{self.class_names[c]} {counts[c]:,}" for c in order[:3]]
        if len(order) > 6:
            shown.append("...")
        shown += [f"{self.class_names[c]} {counts[c]:,}" for c in order[max(3, len(order) - 3):]]
        lines = [f"folder {self.root} ({kind}): {self.num_classes} classes; images {pools}",
                 f"  train images per class, most to fewest: {', '.join(shown)} (median {np.median(counts):,g})"]
        widths = np.concatenate([p.sizes[:, 0] for p in self.pools.values()])
        heights = np.concatenate([p.sizes[:, 1] for p in self.pools.values()])
        common = Counter(zip(widths.tolist(), heights.tolist())).most_common(3)
        lines.append("  sizes (width x height): " + ", ".join(f"{w}x{h} ({n:,})" for (w, h), n in common)
                     + (f"; from {widths.min()}x{heights.min()} to {widths.max()}x{heights.max()}"
                        if len(common) > 1 else "")
                     + f"; modes: {', '.join(f'{m} ({n:,})' for m, n in sorted(self.modes.items()))}")
        lines.append("  read as " + ("grey, 1 channel" if self.channels == 1 else "RGB, 3 channels")
                     + "".join(f"; {c}" for c in self.conversions()))
        if self.unreadable:
            lines.append(f"  left out (skip_unreadable): {len(self.unreadable)} unreadable file(s): "
                         + _listing([f"{u.path} ({u.reason})" for u in self.unreadable]))
        else:
            lines.append("  unreadable files: none (a file that cannot be read fails the scan)")
        if self.ignored:
            lines.append(f"  passed over: {sum(self.ignored.values()):,} file(s) that are not images ("
                         + ", ".join(f"{k} {n:,}" for k, n in sorted(self.ignored.items())) + ")")
        lines.append(f"  digest {self.digest[:16]} (sha256 of the file list, sizes and times; {_size(self.nbytes)})")
        return lines


def scan_folder(root: str | Path, *, skip_unreadable: bool = False) -> FolderScan:
    """Read the layout of ``root`` and every image's header (see the module's description); one
    :class:`~argse.ArgseUsageError` line for the first problem found."""
    root = Path(root)
    if not root.is_dir():
        raise ArgseUsageError(f"{root} is not a folder: give the folder that holds train/ and test/ "
                              "(or train.txt and test.txt)")
    lists = {pool: root / f"{pool}{LIST_SUFFIX}" for pool in POOLS}
    has_lists = {pool: path.is_file() for pool, path in lists.items()}
    if has_lists["train"] or has_lists["test"]:
        if not (has_lists["train"] and has_lists["test"]):
            have, lack = ("train", "test") if has_lists["train"] else ("test", "train")
            raise ArgseUsageError(f"{root} has {have}.txt but no {lack}.txt: write {lack}.txt (one `relative/path "
                                  f"label` line per image) or remove {have}.txt to read the {have}/ and {lack}/ folders")
        layout = "lists"
        class_names, entries, ignored = _read_lists(root, lists, has_lists)
    elif (root / "train").is_dir() and (root / "test").is_dir():
        layout = "folders"
        class_names, entries, ignored = _read_class_folders(root)
    else:
        raise ArgseUsageError(
            f"{root} holds neither train/ and test/ class folders nor train.txt and test.txt list files: put "
            f"each class's images in {root}/train/<class>/ and {root}/test/<class>/, or write the list files "
            "(one `relative/path label` line per image)")
    _check_shared_files(root, entries)
    return _read_headers(root, layout, class_names, entries, ignored, skip_unreadable)


# -- the two layouts --------------------------------------------------------------------------------

Entries = dict[str, list[tuple[str, int]]]  # pool -> [(relative path, label)]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _read_class_folders(root: Path) -> tuple[tuple[str, ...], Entries, Counter]:
    ignored: Counter = Counter()
    found: dict[str, dict[str, list[str]]] = {}
    for pool in POOLS:
        folder = root / pool
        if not folder.is_dir():
            continue
        classes = {}
        loose = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                ignored["hidden"] += 1
            elif entry.is_dir():
                classes[entry.name] = _images_under(folder, entry.name, ignored)
            elif _is_image(entry.name):
                loose.append(entry.name)
            else:
                ignored[_kind(entry.name)] += 1
        if loose:
            raise ArgseUsageError(f"{folder} holds images outside class folders ({_listing(loose)}): move each "
                                  f"into {folder}/<its class>/")
        if not classes:
            raise ArgseUsageError(f"{folder} has no class folders: put each class's images in {folder}/<class>/")
        for name, files in classes.items():
            if not files:
                raise ArgseUsageError(f"{folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): add the "
                                      "class's images or remove the folder")
        found[pool] = classes
    class_names = tuple(found["train"])
    if len(class_names) < 2:
        raise ArgseUsageError(f"{root / 'train'} holds one class ({class_names[0]}): a classifier needs at least "
                              "two class folders")
    for pool in ("test", "val"):
        if pool not in found:
            continue
        extra = [name for name in found[pool] if name not in found["train"]]
        if extra:
            raise ArgseUsageError(f"{root / pool / extra[0]} is a class that {root / 'train'} lacks"
                                  + (f" (as are {len(extra) - 1} more)" if len(extra) > 1 else "")
                                  + ": add its training images or remove the folder")
    lacking = [name for name in class_names if name not in found["test"]]
    if lacking:
        raise ArgseUsageError(f"class {lacking[0]!r}" + (f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else "")
                              + f" has no folder in {root / 'test'}: add its test images (every class is evaluated)")
    label = {name: c for c, name in enumerate(class_names)}
    entries = {pool: [(path, label[name]) for name, files in classes.items() for path in files]
               for pool, classes in found.items()}
    return class_names, entries, ignored


def _images_under(folder: Path, name: str, ignored: Counter) -> list[str]:
    """The images at any depth under ``folder/name``, as paths relative to ``folder.parent``, sorted."""
    out = []
    base = folder.parent
    for directory, subdirs, files in os.walk(folder / name, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for file in files:
            if file.startswith("."):
                ignored["hidden"] += 1
            elif _is_image(file):
                out.append(os.path.relpath(os.path.join(directory, file), base))
            else:
                ignored[_kind(file)] += 1
    return sorted(out)


def _kind(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    return suffix or "no extension"


def _read_lists(root: Path, lists: dict[str, Path], present: dict[str, bool]) -> tuple[tuple[str, ...], Entries, Counter]:
    names = None
    classes_file = root / CLASSES_FILE
    if classes_file.is_file():
        names = [line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ArgseUsageError(f"{classes_file} names class {twice!r} twice: give each class one line")
    entries = {pool: _read_list(root, lists[pool], names) for pool in POOLS if present[pool]}
    train_labels = np.asarray([label for _, label in entries["train"]], dtype=np.int64)
    num_classes = len(names) if names is not None else int(train_labels.max()) + 1 if len(train_labels) else 0
    counts = np.bincount(train_labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        c = int(empty[0])
        which = f"class {c} ({names[c]!r})" if names is not None else f"label {c}"
        raise ArgseUsageError(f"{lists['train']} lists no image of {which}" + (
            f" (nor of {len(empty) - 1} more)" if len(empty) > 1 else "")
            + ": every class needs training images; list some, or number the classes without a gap"
            + (f" (and drop it from {CLASSES_FILE})" if names is not None else ""))
    if num_classes < 2:
        raise ArgseUsageError(f"{lists['train']} lists one class: a classifier needs at least two")
    for pool in ("test", "val"):
        for number, (path, label) in enumerate(entries.get(pool, ()), start=1):
            if label >= num_classes:
                raise ArgseUsageError(f"{lists[pool]}: {path} has label {label}, a class that {lists['train'].name} "
                                      f"lacks (labels 0..{num_classes - 1}): list its training images or drop the line")
    test_counts = np.bincount([label for _, label in entries["test"]], minlength=num_classes)
    lacking = np.flatnonzero(test_counts == 0)
    if len(lacking):
        c = int(lacking[0])
        raise ArgseUsageError(f"{lists['test']} lists no image of label {c}" + (
            f" (nor of {len(lacking) - 1} more)" if len(lacking) > 1 else "") + ": every class is evaluated; list its "
            "test images")
    if names is None:
        names = _names_from_folders(entries["train"], num_classes)
    return tuple(names), entries, Counter()


def _read_list(root: Path, path: Path, names: list[str] | None) -> list[tuple[str, int]]:
    out = []
    missing = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise ArgseUsageError(f"{path} line {number}: {text[:80]!r} is not `relative/path label`: write one "
                                      "image path and its integer label per line")
            relative, label_text = parts
            try:
                label = int(label_text)
                if label < 0:
                    raise ValueError
            except ValueError:
                raise ArgseUsageError(f"{path} line {number}: label {label_text!r} is not a non-negative integer: "
                                      f"labels number the classes from 0") from None
            if names is not None and label >= len(names):
                raise ArgseUsageError(f"{path} line {number}: label {label}, but {CLASSES_FILE} names "
                                      f"{len(names)} classes (labels 0..{len(names) - 1}): fix the label or add the class")
            normal = os.path.normpath(relative)
            if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
                raise ArgseUsageError(f"{path} line {number}: {relative} lies outside {root}: list paths relative "
                                      f"to {root}, inside it")
            if not os.path.isfile(root / normal):
                missing.append((number, relative))
            out.append((normal, label))
    if missing:
        number, relative = missing[0]
        raise ArgseUsageError(f"{path} line {number}: {root / relative} does not exist"
                              + (f" (nor do {len(missing) - 1} more listed files)" if len(missing) > 1 else "")
                              + ": fix the paths (relative to the folder) or drop the lines")
    if not out:
        raise ArgseUsageError(f"{path} lists no images: write one `relative/path label` line per image")
    return out


def _names_from_folders(train: list[tuple[str, int]], num_classes: int) -> list[str]:
    """Each label's folder name where all its training images sit in one folder, one per label;
    else the labels themselves."""
    folders: dict[int, set[str]] = {}
    for path, label in train:
        folders.setdefault(label, set()).add(os.path.basename(os.path.dirname(path)))
    names = [next(iter(folders[c])) if len(folders[c]) == 1 else "" for c in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(c) for c in range(num_classes)]


def _check_shared_files(root: Path, entries: Entries) -> None:
    """A file in two pools would be trained on and evaluated on: refused."""
    train = {path for path, _ in entries["train"]}
    for pool in ("test", "val"):
        shared = [path for path, _ in entries.get(pool, ()) if path in train]
        if shared:
            raise ArgseUsageError(f"{root / shared[0]} is listed for train and for {pool}"
                                  + (f" (as are {len(shared) - 1} more)" if len(shared) > 1 else "")
                                  + ": an image may be trained on or evaluated on, not both; drop it from one list")


# -- headers ------------------------------------------------------------------------------------------


def read_header(path: str) -> tuple[int, int, str]:
    """(width, height, mode) from an image file's header; the pixels are not decoded."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning and the like: the size is reported
        with Image.open(path) as image:
            return image.width, image.height, image.mode


def _read_headers(root: Path, layout: str, class_names: tuple[str, ...], entries: Entries, ignored: Counter,
                  skip_unreadable: bool) -> FolderScan:
    from PIL import Image

    modes: Counter = Counter()
    unreadable: list[Unreadable] = []
    digest = hashlib.sha256()
    digest.update("\n".join(class_names).encode())
    pools = {}
    nbytes = 0
    for pool in POOLS:
        if pool not in entries:
            continue
        paths, labels, sizes = [], [], []
        for relative, label in entries[pool]:
            full = os.path.join(root, relative)
            try:
                stat = os.stat(full)
                width, height, mode = read_header(full)
                if width < 1 or height < 1:
                    raise ValueError("no pixels")
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                unreadable.append(Unreadable(relative, type(exc).__name__))
                continue
            modes[mode] += 1
            nbytes += stat.st_size
            digest.update(f"{pool}\t{relative}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            paths.append(os.fsencode(relative))
            labels.append(label)
            sizes.append((width, height))
        pools[pool] = ImageFiles(str(root), np.asarray(paths, dtype=bytes), np.asarray(labels, dtype=np.int64),
                                 np.asarray(sizes, dtype=np.int64).reshape(-1, 2))
    if unreadable and not skip_unreadable:
        first = unreadable[0]
        raise ArgseUsageError(f"{root / first.path} cannot be read as an image ({first.reason})"
                              + (f", nor can {len(unreadable) - 1} more file(s)" if len(unreadable) > 1 else "")
                              + f": replace or remove {'them' if len(unreadable) > 1 else 'it'}, or set skip_unreadable: "
                              "true in the dataset card to leave such files out")
    for item in unreadable:
        digest.update(f"skipped\t{item.path}\n".encode())
    scan = FolderScan(root, layout, class_names, pools, dict(modes), tuple(unreadable), dict(ignored),
                      digest.hexdigest(), nbytes)
    if unreadable:  # a class may have lost every image
        for pool in ("train", "test"):
            empty = np.flatnonzero(scan.counts(pool) == 0)
            if len(empty):
                raise ArgseUsageError(f"class {class_names[empty[0]]!r} has no readable {pool} image once the "
                                      f"unreadable files are left out: replace them")
    return scan


# -- small helpers ------------------------------------------------------------------------------------


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"


__all__ = ["IMAGE_EXTENSIONS", "MEMORY_SHARE", "STORAGE", "FolderOptions", "FolderScan", "FolderSource", "ImageFiles",
           "Storage", "Unreadable", "read_header", "scan_folder"]
