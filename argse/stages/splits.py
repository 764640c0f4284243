"""The splits stage: a long-tailed train set and disjoint tunev / val / test splits, tracked.

Logs the resolved options, split sizes and group sizes as metrics, the ``splits/`` artifact
(indices, labels, class counts, class_to_group, weights, fingerprint) and the class distribution
figure. Later stages read the artifact through :func:`argse.artifacts.load_splits`.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import click
import mlflow
import numpy as np

from argse import figures, tracking
from argse.tracking import integrity
from argse.config import SplitsConfig
from argse.data.splits import EVAL_SPLITS, SPLITS, Splits, make_splits
from argse.stage_registry import SPLITS_DIR, TAG_SPLITS_FINGERPRINT

log = logging.getLogger(__name__)

FILE_LIST = "files.tsv"  # a folder dataset's file list, logged under data/ in the splits run
DIGEST_CHARS = 32  # of the scan's digest, as the folder input's digest (MLflow keeps at most 36)


def build(cfg: SplitsConfig) -> Splits:
    source = cfg.source()
    return make_splits(
        source, imb_factor=cfg.imb_factor, tunev_ratio=cfg.tunev_ratio, val_ratio=cfg.val_ratio,
        group_thresholds=cfg.group_thresholds, seed=cfg.seed,
        longtail_order=cfg.preset.longtail_order, config=cfg.params(),
        heldout_test=getattr(source, "heldout_test", None),
    )


def log_folder(cfg: SplitsConfig, tmp: Path) -> None:
    """For a folder of images: its file list (``data/files.tsv``: pool, path, label, class, width,
    height) and the folder as the run's MLflow dataset input, whose digest is the scan's."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    integrity.log_artifact(cfg.folder.scan.write_file_list(tmp / FILE_LIST), "data")
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice (as two classes of one name) and warns that it
        # picked one of the two, which are the same.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(cfg.data_dir)
    mlflow.log_input(MetaDataset(source, name=cfg.dataset, digest=cfg.folder.scan.digest[:DIGEST_CHARS]),
                     context="folder")


def distribution_table(splits: Splits, sample_classes: int = 3) -> str:
    """Per group, then a few head / middle / tail classes: train counts and evaluation split sizes."""
    counts = {split: np.bincount(splits.labels[split], minlength=splits.num_classes) for split in EVAL_SPLITS}
    groups = [["group", "classes", "train", "min", "max", *EVAL_SPLITS]]
    for k, name in enumerate(splits.group_names):
        mask = splits.class_to_group == k
        tc = splits.train_counts[mask]
        groups.append([name, int(mask.sum()), int(tc.sum()), int(tc.min()), int(tc.max()),
                       *(int(counts[s][mask].sum()) for s in EVAL_SPLITS)])
    c = splits.num_classes
    picks = sorted(set(list(range(min(sample_classes, c))) + [c // 2] + list(range(max(c - sample_classes, 0), c))))
    classes = [["class", "group", "train", "asked", *EVAL_SPLITS]]
    for cls in picks:
        classes.append([f"{cls} {splits.class_names[cls]}"[:24], splits.group_names[splits.class_to_group[cls]],
                        int(splits.train_counts[cls]), int(splits.requested_counts[cls]),
                        *(int(counts[s][cls]) for s in EVAL_SPLITS)])
    return "\n".join(_aligned(groups) + [""] + _aligned(classes))


def _aligned(rows: list[list]) -> list[str]:
    """Rows of cells as text columns, each as wide as its widest cell (header included): the first
    column left-aligned, the others right-aligned, so headers sit over their values."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
            for row in cells]


def summary(splits: Splits) -> dict[str, float]:
    metrics: dict[str, float] = {f"n_{name}": float(len(splits.indices[name])) for name in SPLITS}
    for k, name in enumerate(splits.group_names):
        mask = splits.class_to_group == k
        metrics[f"classes_{name}"] = float(mask.sum())
        metrics[f"train_images_{name}"] = float(splits.train_counts[mask].sum())
    metrics["imb_factor_achieved"] = float(splits.train_counts.max() / splits.train_counts.min())
    metrics["train_shortfall"] = float(np.maximum(splits.requested_counts - splits.train_counts, 0).sum())
    metrics["num_groups"] = float(splits.num_groups)
    return metrics


def upstream(cfg: SplitsConfig, experiment: str | None) -> dict[str, str]:
    """The runs a splits run reads: none."""
    return {}


def run(cfg: SplitsConfig, *, experiment: str | None = None) -> str | None:
    """Run the stage; return the run id (``None`` for a dry run)."""
    if cfg.dry_run:
        splits = build(cfg)
        click.echo(cfg.dry_run_header("splits"))
        click.echo(f"  experiment: {tracking.home_experiment(cfg.dataset, experiment)}")
        click.echo(f"  would write {SPLITS_DIR}/{{indices,labels,weights}}.npz, class_counts.json, class_to_group.csv, "
                   "splits.json and class_distribution.png; sizes: "
                   + ", ".join(f"{name} {len(splits.indices[name])}" for name in SPLITS))
        click.echo(distribution_table(splits))
        return None

    with tracking.stage_run("splits", cfg.dataset, cfg.params(), experiment=experiment, run_name="splits") as active:
        splits = build(cfg)
        shortfall = splits.requested_counts - splits.train_counts
        if np.any(shortfall > 0):
            log.warning("%d classes have fewer images than the profile asks for; they take what they have "
                        "(achieved counts are logged in splits/class_counts.json)", int(np.sum(shortfall > 0)))
        with tempfile.TemporaryDirectory() as tmp:
            splits.save(Path(tmp) / SPLITS_DIR)
            integrity.log_artifacts(tmp)
        if cfg.folder is not None:
            with tempfile.TemporaryDirectory() as tmp:
                log_folder(cfg, Path(tmp))
        mlflow.log_metrics(summary(splits))
        mlflow.set_tag(TAG_SPLITS_FINGERPRINT, splits.fingerprint)
        tracking.log_split_inputs(splits, SPLITS)
        eval_counts = {s: np.bincount(splits.labels[s], minlength=splits.num_classes) for s in EVAL_SPLITS}
        fig = figures.class_distribution(
            splits.train_counts, eval_counts, splits.class_to_group, splits.group_names,
            f"{cfg.dataset}: " + ("natural long tail" if cfg.imb_factor is None else f"imbalance factor {cfg.imb_factor:g}")
            + f", seed {cfg.seed}", class_names=splits.class_names,
        )
        mlflow.log_figure(fig, "class_distribution.png")
        figures.close(fig)
        if cfg.verbose:
            click.echo(distribution_table(splits))
        click.echo(
            f"splits run {active.info.run_id}: train {len(splits.indices['train'])} images "
            f"(imbalance {splits.train_counts.max()}/{splits.train_counts.min()}), "
            + ", ".join(f"{s} {len(splits.indices[s])}" for s in EVAL_SPLITS)
            + ", groups " + ", ".join(f"{n} {int((splits.class_to_group == k).sum())}"
                                      for k, n in enumerate(splits.group_names))
        )
        return active.info.run_id
