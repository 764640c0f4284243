"""Long-tailed train set, disjoint evaluation splits, groups and target-prior weights (docs/design.md, *Data*).

:func:`make_splits` turns a :class:`~argse.data.loaders.SourceData` into :class:`Splits`: indices
into the source pools, the achieved class counts, ``class_to_group`` and per-sample weights. A
``Splits`` round-trips through a folder (the ``splits/`` artifact of a splits run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from argse import ArgseError
from argse.data.loaders import SourceData

EVAL_SPLITS = ("tunev", "val", "test")
SPLITS = ("train",) + EVAL_SPLITS
PRIORS = ("lt", "balanced")
# Which end of the label order is the head: ``index`` gives class 0 the most images, ``reverse``
# gives them to class C-1 (the long tail then falls on the first labels).
LONGTAIL_ORDERS = ("index", "reverse")


def longtail_counts(n_max: int, num_classes: int, imb_factor: float, order: str = "index") -> np.ndarray:
    """``n_c = floor(n_max * IF ** (-r / (C - 1)))`` (at least 1 each), where the rank r of class c is
    c in ``index`` order and C-1-c in ``reverse`` order."""
    if order not in LONGTAIL_ORDERS:
        raise ArgseError(f"unknown long-tail order {order!r}: choose one of {', '.join(LONGTAIL_ORDERS)}")
    c = np.arange(num_classes)
    counts = np.floor(n_max * imb_factor ** (-c / max(num_classes - 1, 1)) + 1e-9).astype(np.int64)
    counts = np.maximum(counts, 1)
    return counts[::-1].copy() if order == "reverse" else counts


def group_names(num_groups: int) -> tuple[str, ...]:
    if num_groups == 2:
        return ("head", "tail")
    if num_groups == 3:
        return ("many", "medium", "few")
    return tuple(f"group{k}" for k in range(num_groups))


def assign_groups(train_counts: np.ndarray, thresholds: tuple[int, ...]) -> np.ndarray:
    """Group of each class from its train count: group 0 has more than ``thresholds[0]`` images,
    group k more than ``thresholds[k]`` and at most ``thresholds[k-1]``, the last group the rest."""
    counts = np.asarray(train_counts)
    class_to_group = np.zeros(len(counts), dtype=np.int64)
    for t in thresholds:
        class_to_group += (counts <= t).astype(np.int64)
    num_groups = len(thresholds) + 1
    names = group_names(num_groups)
    empty = [names[k] for k in range(num_groups) if not np.any(class_to_group == k)]
    if empty:
        raise ArgseError(
            f"--group-thresholds {','.join(map(str, thresholds))} leaves group(s) {', '.join(empty)} "
            f"without classes (train counts range {counts.min()}..{counts.max()}); choose thresholds inside that range"
        )
    return class_to_group


def prior_weights(labels: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """``w_i = pi_target(y_i) / pi_split(y_i)``: reweights a split to the target label prior."""
    num_classes = len(target_prior)
    split_counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    split_prior = split_counts / max(split_counts.sum(), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(split_prior > 0, target_prior / split_prior, 0.0)
    return ratio[labels].astype(np.float64)


@dataclass(frozen=True)
class Splits:
    """The product of the splits stage: everything later stages need to know about the data."""

    dataset: str
    num_classes: int
    class_names: tuple[str, ...]
    indices: dict[str, np.ndarray]  # train -> source train pool; tunev/val/test -> held-out pool
    labels: dict[str, np.ndarray]
    train_counts: np.ndarray
    requested_counts: np.ndarray
    class_to_group: np.ndarray
    group_thresholds: tuple[int, ...]
    source_fingerprint: str
    config: dict

    @property
    def num_groups(self) -> int:
        return int(self.class_to_group.max()) + 1

    @property
    def group_names(self) -> tuple[str, ...]:
        return group_names(self.num_groups)

    @property
    def fingerprint(self) -> str:
        """sha256 over the source data's fingerprint and every index: names this exact split."""
        digest = hashlib.sha256(self.source_fingerprint.encode())
        for name in SPLITS:
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.indices[name], dtype=np.int64).tobytes())
        return digest.hexdigest()

    def prior(self, target: str) -> np.ndarray:
        """The target label prior: ``lt`` (the train counts) or ``balanced`` (uniform)."""
        if target == "lt":
            return self.train_counts / self.train_counts.sum()
        if target == "balanced":
            return np.full(self.num_classes, 1.0 / self.num_classes)
        raise ArgseError(f"unknown target prior {target!r}: choose one of {', '.join(PRIORS)}")

    def weights(self, split: str, target: str = "lt") -> np.ndarray:
        """Per-sample weights of ``split`` that reweight it to the ``target`` prior (mean 1)."""
        return prior_weights(self.labels[split], self.prior(target))

    def images(self, source: SourceData, split: str) -> np.ndarray:
        pool = source.train_images if split == "train" else source.heldout_images
        return pool[self.indices[split]]

    def check_source(self, source: SourceData) -> None:
        """Refuse a source whose bytes differ from the one these splits were drawn from, and splits whose
        labels, train counts or groups are not what that source and their indices give (the
        fingerprint covers the source and the indices only)."""
        if source.fingerprint != self.source_fingerprint:
            raise ArgseError(
                f"the {self.dataset} data found now differs from the data these splits were made from "
                f"(fingerprint {source.fingerprint[:12]} vs {self.source_fingerprint[:12]}); "
                "point --data-dir at the same files or create new splits"
            )
        for name in SPLITS:
            pool = source.train_labels if name == "train" else source.heldout_labels
            if not np.array_equal(pool[self.indices[name]], self.labels[name]):
                raise ArgseError(f"the {name} labels of these splits are not the {self.dataset} data's at their "
                                 "indices: create new splits")
        counts = np.bincount(self.labels["train"], minlength=self.num_classes)
        if not np.array_equal(counts, self.train_counts) or not np.array_equal(
                assign_groups(counts, self.group_thresholds), self.class_to_group):
            raise ArgseError("the train counts or the groups of these splits are not what their labels and "
                             f"--group-thresholds {','.join(map(str, self.group_thresholds))} give: create new splits")

    # -- persistence -------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "indices.npz", **{name: self.indices[name] for name in SPLITS})
        np.savez(folder / "labels.npz", **{name: self.labels[name] for name in SPLITS})
        np.savez(
            folder / "weights.npz",
            **{f"{split}_{target}": self.weights(split, target) for split in EVAL_SPLITS for target in PRIORS},
        )
        np.savetxt(folder / "class_to_group.csv", self.class_to_group, fmt="%d", header="group", comments="")
        counts = {
            "class": list(range(self.num_classes)),
            "name": list(self.class_names),
            "group": self.class_to_group.tolist(),
            "requested_train": self.requested_counts.tolist(),
            "train": self.train_counts.tolist(),
            **{split: np.bincount(self.labels[split], minlength=self.num_classes).tolist() for split in EVAL_SPLITS},
        }
        with open(folder / "class_counts.json", "w") as fh:
            json.dump(counts, fh, indent=1)
        meta = {
            "dataset": self.dataset,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_to_group": self.class_to_group.tolist(),
            "group_names": list(self.group_names),
            "group_thresholds": list(self.group_thresholds),
            "train_counts": self.train_counts.tolist(),
            "requested_counts": self.requested_counts.tolist(),
            "sizes": {name: int(len(self.indices[name])) for name in SPLITS},
            "source_fingerprint": self.source_fingerprint,
            "fingerprint": self.fingerprint,
            "config": self.config,
        }
        with open(folder / "splits.json", "w") as fh:
            json.dump(meta, fh, indent=1)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Splits":
        folder = Path(folder)
        try:
            with open(folder / "splits.json") as fh:
                meta = json.load(fh)
            with np.load(folder / "indices.npz") as npz:
                indices = {name: npz[name].astype(np.int64) for name in SPLITS}
            with np.load(folder / "labels.npz") as npz:
                labels = {name: npz[name].astype(np.int64) for name in SPLITS}
        except (OSError, KeyError, ValueError) as exc:
            raise ArgseError(f"{folder} is not a complete splits/ artifact ({exc}); rerun the splits stage") from exc
        splits = cls(
            dataset=meta["dataset"], num_classes=meta["num_classes"], class_names=tuple(meta["class_names"]),
            indices=indices, labels=labels, train_counts=np.asarray(meta["train_counts"], dtype=np.int64),
            requested_counts=np.asarray(meta["requested_counts"], dtype=np.int64),
            class_to_group=np.asarray(meta["class_to_group"], dtype=np.int64),
            group_thresholds=tuple(meta["group_thresholds"]), source_fingerprint=meta["source_fingerprint"],
            config=meta["config"],
        )
        if splits.fingerprint != meta["fingerprint"]:
            raise ArgseError(f"{folder}: the indices do not match the recorded fingerprint; rerun the splits stage")
        return splits


def requested_train_counts(pool_counts: np.ndarray, imb_factor: float | None, longtail_order: str = "index",
                           n_max: int | None = None) -> np.ndarray:
    """The training images asked of each class: the :func:`longtail_counts` profile from ``n_max``
    (default: the smallest class of the pool, so every class can supply what the profile asks;
    CIFAR-100: 500), or the whole pool where ``imb_factor`` is None (a pool that is long-tailed as it
    is, kept so)."""
    pool_counts = np.asarray(pool_counts, dtype=np.int64)
    if imb_factor is None:
        return pool_counts.copy()
    if n_max is None:
        n_max = int(pool_counts[pool_counts > 0].min()) if np.any(pool_counts > 0) else 1
    return longtail_counts(n_max, len(pool_counts), imb_factor, longtail_order)


def heldout_parts(labels: np.ndarray, num_classes: int, tunev_ratio: float, val_ratio: float,
                  rng: np.random.Generator, heldout_test: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The held-out rows of each evaluation split (sorted), per class: ``tunev_ratio`` and ``val_ratio``
    of its rows (rounded) and the rest for test; with ``heldout_test`` (see :func:`make_splits`) those
    rows are test, and tunev and val share the others as ``tunev_ratio : val_ratio``. How many rows
    each split gets does not depend on ``rng``, only which."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in EVAL_SPLITS}
    for c in range(num_classes):
        if heldout_test is None:
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_tunev = int(round(len(idx) * tunev_ratio))
            n_val = int(round(len(idx) * val_ratio))
            parts["tunev"].append(idx[:n_tunev])
            parts["val"].append(idx[n_tunev:n_tunev + n_val])
            parts["test"].append(idx[n_tunev + n_val:])
        else:
            idx = rng.permutation(np.flatnonzero((labels == c) & ~heldout_test))
            n_tunev = int(round(len(idx) * tunev_ratio / (tunev_ratio + val_ratio)))
            parts["tunev"].append(idx[:n_tunev])
            parts["val"].append(idx[n_tunev:])
            parts["test"].append(np.flatnonzero((labels == c) & heldout_test))
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


def make_splits(
    source: SourceData,
    *,
    imb_factor: float | None,
    tunev_ratio: float,
    val_ratio: float,
    group_thresholds: tuple[int, ...],
    seed: int,
    longtail_order: str = "index",
    n_max: int | None = None,
    heldout_test: np.ndarray | None = None,
    config: dict | None = None,
) -> Splits:
    """Draw the long-tailed train set and the disjoint per-class tunev / val / test splits.

    The train set follows :func:`requested_train_counts` (``imb_factor`` None: the whole train pool);
    ``longtail_order`` says which end of the labels is the head (see :func:`longtail_counts`). A class
    with fewer images than asked for takes what it has; ``Splits.requested_counts`` keeps what was
    asked. ``heldout_test`` (a mask over the held-out pool, as
    :class:`argse.data.folder.FolderSource` gives it where a folder brings its own validation list):
    those rows are the test split as they are, and tunev and val are drawn from the other rows in the
    proportion ``tunev_ratio : val_ratio``. ``source``: a :class:`~argse.data.loaders.SourceData` or
    anything with its ``name``, ``num_classes``, ``class_names``, ``train_labels``,
    ``heldout_labels`` and ``fingerprint``.
    """
    num_classes = source.num_classes
    rng = np.random.default_rng(seed)
    pool_counts = np.bincount(source.train_labels, minlength=num_classes)
    requested = requested_train_counts(pool_counts, imb_factor, longtail_order, n_max)
    train_parts = []
    for c in range(num_classes):
        idx = np.flatnonzero(source.train_labels == c)
        take = min(int(requested[c]), len(idx))  # a short class gives what it has
        train_parts.append(np.sort(rng.choice(idx, size=take, replace=False)))
    train = np.concatenate(train_parts)
    train_counts = np.bincount(source.train_labels[train], minlength=num_classes)
    if np.any(train_counts == 0):
        missing = np.flatnonzero(train_counts == 0)
        raise ArgseError(
            f"classes {missing[:10].tolist()} have no training images in the source data; "
            "the data folder is incomplete"
        )

    parts = heldout_parts(source.heldout_labels, num_classes, tunev_ratio, val_ratio, rng, heldout_test)
    indices = {"train": train, **parts}
    for name in EVAL_SPLITS:
        if len(indices[name]) == 0:
            raise ArgseError(f"the {name} split is empty: the held-out data has too few images per class")
    labels = {
        name: (source.train_labels if name == "train" else source.heldout_labels)[idx]
        for name, idx in indices.items()
    }
    return Splits(
        dataset=source.name, num_classes=num_classes, class_names=source.class_names, indices=indices,
        labels=labels, train_counts=train_counts, requested_counts=requested,
        class_to_group=assign_groups(train_counts, group_thresholds), group_thresholds=tuple(group_thresholds),
        source_fingerprint=source.fingerprint, config=dict(config or {}),
    )
