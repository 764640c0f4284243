"""The dataset card: what a dataset preset holds, for a folder of the user's own images.

A folder of images (:mod:`argse.data.folder`) becomes a dataset like the built-in ones through a
:class:`~argse.config.DatasetPreset` built from three things, once, where the config is resolved:

* **the scan** fixes what the images say: ``num_classes``, the channels of ``image_shape`` (1 when
  every image is grey, else 3), ``source`` (``folder``); the name is the one the dataset is run under.
* **the card**, ``argse-dataset.yaml`` beside ``train/`` and ``test/`` (or the list files), optional,
  sets any other preset field by its own name (``backbone``, ``augmentation``, ``imb_factor``,
  ``group_thresholds``, ``epochs``, ``batch_size``, ``lr``, ``warmup_epochs``, ``tunev_ratio``,
  ``val_ratio``, ``gating_epochs``, ``gating_batch_size``, ``longtail_order``, ``cpu_threads``,
  ``cpu_fast_path``: :data:`CARD_PRESET_KEYS`, derived from the preset's fields, so a field added to
  the preset is a card key without an edit here), the training side ``image_size`` (``image_shape``
  is ``image_size x image_size x channels``), and how the folder is read
  (:class:`~argse.data.folder.FolderOptions`: ``storage``, ``skip_unreadable``, ``val_pool``).
  Values are checked against the preset field's type; an unknown key or a bad value is one line.
* **the defaults**, for what neither says: CIFAR-100-LT's preset (:data:`BASE_PRESET`: the paper's
  recipe for long-tailed images: tunev / val ratios, group threshold 20, i.e. tail = classes with at
  most 20 training images, epochs, batch size, lr, warm-up, the gate's training), except that the
  natural long tail of the train pool is kept (``imb_factor: natural``; a number draws the train set
  long-tailed from the pool, as for CIFAR), and what follows from the image size: ``image_size`` the
  median shorter side of the training images, at most :data:`LARGEST_DEFAULT_SIZE`; at
  :data:`SMALL_IMAGES` pixels or less the CIFAR network and augmentation (``resnet32``, ``cifar``),
  above ResNet-18 and random resized crops (``resnet18``, ``natural``).

An example card (ImageNet-LT as the paper trains it)::

    image_size: 224
    backbone: resnet50
    epochs: 90
    batch_size: 256
    group_thresholds: 100,20   # many / medium / few
    storage: stream
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from argse import ArgseError, ArgseUsageError
from argse.options import BOOLEAN_WORDS, parse_group_thresholds
from argse.presets import PRESETS, DatasetPreset
from argse.data.device import AUGMENTATIONS
from argse.data.folder import FolderOptions, FolderScan, FolderSource, Storage, scan_folder
from argse.data.splits import LONGTAIL_ORDERS, assign_groups, group_names, requested_train_counts
from argse.models.backbones import BACKBONES

CARD_NAME = "argse-dataset.yaml"
SOURCE = "folder"
BASE_PRESET = "cifar100-lt"
NATURAL = "natural"  # imb_factor: keep the train pool's own long tail
LARGEST_DEFAULT_SIZE = 224
SMALL_IMAGES = 32
#: Preset fields the folder and the run fix, never the card.
FROM_FOLDER = ("name", "source", "num_classes", "image_shape")
#: Card keys that set the preset field of the same name.
CARD_PRESET_KEYS = tuple(f.name for f in dataclasses.fields(DatasetPreset) if f.name not in FROM_FOLDER)
#: Card keys of how the folder is read.
CARD_FOLDER_KEYS = tuple(f.name for f in dataclasses.fields(FolderOptions))
CARD_KEYS = ("image_size",) + CARD_PRESET_KEYS + CARD_FOLDER_KEYS
#: Card keys whose value is one of a few names.
CHOICES = {"backbone": tuple(BACKBONES), "augmentation": AUGMENTATIONS, "longtail_order": LONGTAIL_ORDERS,
           "storage": ("auto", "memory", "stream")}
#: Card numbers that must lie in a range (the stages check the same values given as options, and name
#: the option; a value from the card is refused here, naming the card).
RANGES = {"epochs": (lambda v: v >= 1, "at least 1"), "batch_size": (lambda v: v >= 1, "at least 1"),
          "gating_epochs": (lambda v: v >= 1, "at least 1"), "gating_batch_size": (lambda v: v >= 1, "at least 1"),
          "warmup_epochs": (lambda v: v >= 0, "at least 0"), "cpu_threads": (lambda v: v >= 0, "at least 0"),
          "lr": (lambda v: v > 0, "above 0"), "tunev_ratio": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
          "val_ratio": (lambda v: 0 < v < 1, "strictly between 0 and 1")}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class FolderDataset:
    """A folder resolved into a dataset: its preset, how it is read, what the scan found, the card's
    own values and where the images will live."""

    preset: DatasetPreset
    options: FolderOptions
    scan: FolderScan
    card: dict[str, Any]  # the card's keys as read and checked (empty without a card)
    card_path: Path | None
    storage: Storage

    @property
    def image_size(self) -> int:
        return self.preset.image_shape[0]

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of what a run on this folder depends on: the scan's digest (every kept file's path,
        label, size and time), the preset the card and the defaults give, and how the folder is read."""
        text = json.dumps([self.scan.digest, dataclasses.asdict(self.preset), dataclasses.asdict(self.options)],
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def source(self) -> FolderSource:
        """The pools the splits are drawn from (:meth:`~argse.data.folder.FolderScan.source`)."""
        return self.scan.source(self.preset.name, val_pool=self.options.val_pool)

    def train_counts(self) -> np.ndarray:
        """The training images each class will have (the pool's, or the drawn profile's)."""
        pool = self.scan.counts("train")
        return np.minimum(requested_train_counts(pool, self.preset.imb_factor, self.preset.longtail_order), pool)

    def describe(self) -> list[str]:
        """The dry run's lines: the folder, the card and the preset it gives, the groups, the storage."""
        p = self.preset
        card = (f"{self.card_path} ({', '.join(self.card)})" if self.card else f"{self.card_path} (empty)") \
            if self.card_path else f"none (defaults; write {CARD_NAME} beside the images to change them)"
        counts = self.train_counts()
        groups = assign_groups(counts, p.group_thresholds)
        names = group_names(len(p.group_thresholds) + 1)
        tail = "the natural long tail kept" if p.imb_factor is None else f"drawn at imbalance factor {p.imb_factor:g}"
        lines = self.scan.describe() + [
            f"  card: {card}",
            f"  preset: {p.image_shape[0]}x{p.image_shape[1]}x{p.image_shape[2]}, backbone {p.backbone}, augmentation "
            f"{p.augmentation}, {p.epochs} epochs, batch {p.batch_size}, lr {p.lr:g}",
            f"  train {int(counts.sum()):,} images ({tail}: {counts.max():,} to {counts.min():,} per class); groups at "
            f"{','.join(map(str, p.group_thresholds))}: " + ", ".join(
                f"{name} {int((groups == k).sum())} classes ({int(counts[groups == k].sum()):,} images)"
                for k, name in enumerate(names)),
        ]
        if "val" in self.scan.pools:
            lines.append("  tunev and val drawn from the val pool, test the test pool as it is" if self.options.val_pool
                         else "  val pool not used (val_pool: false): tunev, val and test drawn from the test pool")
        lines.append(f"  images {'held in memory' if self.storage.kind == 'memory' else 'streamed from the files'}: "
                     f"{self.storage.reason}")
        return lines


def read_card(root: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The card beside the images, its keys checked and values cast (``{}`` and None without one)."""
    import yaml

    path = Path(root) / CARD_NAME
    if not path.is_file():
        return {}, None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ArgseUsageError(f"{path} is not valid YAML{line}: write one `key: value` per line") from None
    if raw is None:
        return {}, path
    if not isinstance(raw, dict):
        raise ArgseUsageError(f"{path} must hold `key: value` lines, not a {type(raw).__name__}")
    card = {}
    for key, value in raw.items():
        if key not in CARD_KEYS:
            raise ArgseUsageError(f"{path}: unknown key {key!r}; the card's keys are {', '.join(CARD_KEYS)}")
        card[key] = _cast(path, key, value)
        if key in RANGES and not RANGES[key][0](card[key]):
            raise ArgseUsageError(f"{path}: {key} {value!r} must be {RANGES[key][1]}")
    if card.get("tunev_ratio", 0) + card.get("val_ratio", 0) >= 1:
        raise ArgseUsageError(f"{path}: tunev_ratio plus val_ratio must stay below 1 so the test split is not empty")
    return card, path


def _cast(path: Path, key: str, value: Any) -> Any:
    """A card value as its preset field's (or folder option's) type, or one line naming the key."""
    if key == "imb_factor" and isinstance(value, str) and value.strip().lower() == NATURAL:
        return None
    kind = int if key == "image_size" else _field_types()[key]
    try:
        if kind is tuple:
            try:
                return parse_group_thresholds(",".join(map(str, value)) if isinstance(value, list) else str(value))
            except ArgseUsageError:
                raise ArgseUsageError(f"{path}: group_thresholds {value!r} must be positive integers, strictly "
                                      "decreasing (20: head/tail; 100,20: many/medium/few)") from None
        if kind is bool:
            return value if isinstance(value, bool) else BOOLEAN_WORDS[str(value).strip().lower()]
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            number = int(float(value))
            if key == "image_size" and number < 8:
                raise ArgseUsageError(f"{path}: image_size {number} is too small: give the training side in pixels, "
                                      "at least 8")
            return number
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if key == "imb_factor" and number < 1:
                raise ArgseUsageError(f"{path}: imb_factor {value} must be >= 1 (1: balanced), or {NATURAL}")
            return number
        text = str(value)
        if key in CHOICES and text not in CHOICES[key]:
            raise ArgseUsageError(f"{path}: {key} {text!r}: choose one of {', '.join(CHOICES[key])}")
        return text
    except (KeyError, TypeError, ValueError, OverflowError):
        wanted = {bool: "true or false", int: "an integer", float: "a number", tuple: "a list of integers",
                  str: "a name"}[kind] + (f" or {NATURAL}" if key == "imb_factor" else "")
        raise ArgseUsageError(f"{path}: {key} {value!r} is not {wanted}") from None


def _field_types() -> dict[str, type]:
    """int, float, str, bool or tuple for each preset field and folder option."""
    hints = {**typing.get_type_hints(DatasetPreset), **typing.get_type_hints(FolderOptions)}
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = tuple if typing.get_origin(hint) is tuple else (args[0] if args else hint)
    return out


def default_image_size(scan: FolderScan) -> int:
    """The median shorter side of the training images, at most :data:`LARGEST_DEFAULT_SIZE`."""
    sizes = scan.files("train").sizes
    return int(min(LARGEST_DEFAULT_SIZE, np.median(sizes.min(axis=1))))


def folder_preset(name: str, scan: FolderScan, card: dict[str, Any], card_path: Path | None = None) -> DatasetPreset:
    """The preset of the folder ``scan`` found, run as ``name``: :data:`BASE_PRESET`'s fields, what
    follows from the images, then the card's values (see the module's description)."""
    size = card.get("image_size") or default_image_size(scan)
    small = size <= SMALL_IMAGES
    defaults = {"imb_factor": None, "backbone": "resnet32" if small else "resnet18",
                "augmentation": "cifar" if small else "natural"}
    preset = dataclasses.replace(
        PRESETS[BASE_PRESET], name=name, source=SOURCE, num_classes=scan.num_classes,
        image_shape=(size, size, scan.channels),
        **{**defaults, **{key: value for key, value in card.items() if key in CARD_PRESET_KEYS}})
    pool = scan.counts("train")
    counts = np.minimum(requested_train_counts(pool, preset.imb_factor, preset.longtail_order), pool)
    try:
        assign_groups(counts, preset.group_thresholds)
    except ArgseError:
        where = card_path or Path(scan.root) / CARD_NAME
        thresholds = ",".join(map(str, preset.group_thresholds))
        raise ArgseUsageError(
            f"group_thresholds {thresholds} leaves a group without classes (the classes have {counts.min():,} to "
            f"{counts.max():,} training images): set group_thresholds in {where} inside that range (a class with at "
            "most that many images is in the tail)") from None
    return preset


def folder_dataset(root: str | Path, name: str | None = None, *, available: int | None = None,
                   copies: int = 1) -> FolderDataset:
    """Read the card beside the images, scan the folder and resolve both into a dataset (``name``:
    what it is run as, default the folder's name; ``available`` and ``copies``: see
    :meth:`~argse.data.folder.FolderScan.storage`)."""
    root = Path(root)
    name = name or root.resolve().name
    if not NAME_PATTERN.fullmatch(name):
        raise ArgseUsageError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (it names the "
                              "experiment and the registered model)")
    if name in PRESETS:
        raise ArgseUsageError(f"dataset name {name!r} is a built-in dataset: run the folder {root} under another name")
    card, card_path = read_card(root) if root.is_dir() else ({}, None)
    options = FolderOptions(**{key: value for key, value in card.items() if key in CARD_FOLDER_KEYS})
    scan = scan_folder(root, skip_unreadable=options.skip_unreadable)
    preset = folder_preset(name, scan, card, card_path)
    storage = scan.storage(preset.image_shape[0], choice=options.storage, available=available, copies=copies)
    return FolderDataset(preset, options, scan, card, card_path, storage)


def open_folder(data_dir: str | Path, name: str) -> FolderDataset:
    """The dataset ``name`` that is not a built-in preset: the folder ``data_dir`` read as
    :func:`folder_dataset` reads it, once per process (every stage's config resolves it; a later
    change to the folder is caught where the images are read, against the splits run's digest). One
    line when ``data_dir`` is not a folder."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ArgseUsageError(
            f"unknown dataset {name!r}: choose one of {', '.join(PRESETS)}, or run your own images as {name!r} by "
            f"giving their folder as --data-dir (mlflow run: -P data_dir=...); {str(data_dir)!r} is not a folder")
    return _open_folder(str(root.resolve()), name)


@functools.lru_cache(maxsize=8)
def _open_folder(root: str, name: str) -> FolderDataset:
    return folder_dataset(root, name)


__all__ = ["CARD_NAME", "CARD_KEYS", "CARD_PRESET_KEYS", "FolderDataset", "default_image_size", "folder_dataset",
           "folder_preset", "open_folder", "read_card"]
