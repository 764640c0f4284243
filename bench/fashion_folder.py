"""Fashion-MNIST as a folder of PNGs against the built-in fashion-mnist-lt: the same splits and experts
stages, the same network, augmentation and protocol, so the folder path should train the same experts.

    python bench/fashion_folder.py [--root /work/data/fashion-png] [--epochs N] [--seed 0] [--log-dir DIR]

The folder: all 60,000 train and 10,000 test images of Fashion-MNIST (read by
``argse.data.loaders.load_fashion_mnist`` from its default location, Debian's ``dataset-fashion-mnist``)
written once into ``--root`` as grey 28x28 PNGs, ``train/<k>_<name>/<index>.png`` and
``test/<k>_<name>/<index>.png`` (``k`` the label, so the class folders sort in label order; the name
made filesystem-safe, ``T-shirt/top`` -> ``T-shirt_top``; ``index`` the image's position in the IDX file,
zero-padded, so each class's images keep the built-in pool's order), and beside them the card
``argse-dataset.yaml`` holding the fashion-mnist-lt preset's fields (read from
``argse.presets.PRESETS``, with ``image_size`` 28). A folder that already holds every image is reused.
Before anything runs, the folder is scanned as a stage scans it (the time is printed) and checked:
the preset it resolves to is fashion-mnist-lt's (its name and source aside), each class's images are
the built-in pool's in the same order, and a sample of them decode to the built-in pixels.

Then, for the built-in ``--dataset fashion-mnist-lt`` and for the folder (``--dataset fashion-png
--data-dir ROOT``), each in a fresh SQLite MLflow store, ``argse splits`` and ``argse experts`` run as
subprocesses with the same seed and options (``--epochs``: default the preset's). Prints:

* the memory-or-stream decision the folder's experts stage printed;
* whether the two splits runs drew the same images (each folder index mapped to its IDX index by
  its file name; the train set compared in order, the evaluation splits as sets, with their labels);
* per expert, the final (calibrated) val accuracy and val balanced accuracy of each, and their
  difference in points;
* the wall time of each splits and experts stage, the experts' seconds per epoch, the precision tag
  of the expert runs, the CPU and the commit.

Exits with status 1 when a difference exceeds 1 point, or the splits differ. ``--log-dir`` keeps what
each stage printed (``<dataset>-<stage>.log``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import yaml

from argse import EXPERTS
from argse.artifacts import load_splits
from argse.data.loaders import FASHION_SYSTEM_DIR, LOADERS, SourceData
from argse.data.splits import EVAL_SPLITS
from argse.data.stream import read_image
from argse.dataset_card import CARD_NAME, CARD_PRESET_KEYS, FolderDataset, folder_dataset
from argse.expert_runs.run import metric_name
from argse.presets import PRESETS
from argse.stage_registry import TAG_EXPERT, TAG_EXPERT_RUN, TAG_PRECISION
from argse.tracking import TAG_STAGE, configure
from argse.training.utils import cpu_model
from common import argse, commit, experts_epoch_wall, store_env

BUILT_IN = "fashion-mnist-lt"
FOLDER_NAME = "fashion-png"  # what the folder is run as
POOLS = {"train": "train", "test": "heldout"}  # folder pool -> SourceData's pool
TOLERANCE = 1.0  # points
CHECKED = 32  # images per pool decoded back and compared with the built-in pixels
METRICS = {"val acc": "final_val_acc", "val balanced acc": "final_val_balanced_acc"}


# -- the folder ----------------------------------------------------------------------------------


def class_folder(label: int, name: str, num_classes: int) -> str:
    """``<k>_<name>``: the label first (zero-padded, so the folders sort in label order), the name with
    anything but letters, digits, '.', '_' and '-' replaced by '_'."""
    return f"{label:0{len(str(num_classes - 1))}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"


def pool(source: SourceData, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of the built-in pool a folder pool (``train``, ``test``) holds."""
    return getattr(source, f"{POOLS[name]}_images"), getattr(source, f"{POOLS[name]}_labels")


def file_name(index: int, count: int) -> str:
    return f"{index:0{len(str(count - 1))}d}.png"


def complete(root: Path, source: SourceData) -> bool:
    """Whether ``root`` holds every image of ``source`` as :func:`write_folder` writes them (per class
    folder, the expected number of PNGs)."""
    for name in POOLS:
        _, labels = pool(source, name)
        for c, count in enumerate(np.bincount(labels, minlength=source.num_classes)):
            folder = root / name / class_folder(c, source.class_names[c], source.num_classes)
            if not folder.is_dir() or sum(1 for f in os.scandir(folder) if f.name.endswith(".png")) != count:
                return False
    return True


def write_folder(root: Path, source: SourceData) -> None:
    """Every image of ``source``'s two pools as a grey PNG in its class folder (see the module's
    description); whatever an incomplete earlier copy left is removed first."""
    from PIL import Image

    started = time.perf_counter()
    for name in POOLS:
        shutil.rmtree(root / name, ignore_errors=True)
        images, labels = pool(source, name)
        folders = [root / name / class_folder(c, source.class_names[c], source.num_classes)
                   for c in range(source.num_classes)]
        for folder in folders:
            folder.mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image[..., 0], mode="L").save(folders[label] / file_name(i, len(labels)))
        print(f"wrote {root / name}: {len(labels):,} PNGs ({time.perf_counter() - started:.0f} s)", flush=True)


def write_card(root: Path) -> dict:
    """The card holding fashion-mnist-lt's preset fields (every field a card sets, and ``image_size``)."""
    preset = PRESETS[BUILT_IN]
    card = {"image_size": preset.image_shape[0]}
    for key in CARD_PRESET_KEYS:
        value = getattr(preset, key)
        card[key] = list(value) if isinstance(value, tuple) else value
    text = f"# {BUILT_IN}'s preset (argse.presets.PRESETS), written by bench/fashion_folder.py\n" + yaml.safe_dump(
        card, sort_keys=False)
    path = root / CARD_NAME
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return card


def original_indices(dataset: FolderDataset, name: str) -> np.ndarray:
    """Each image of the folder's pool ``name``: its index in the built-in pool (its file name)."""
    return np.array([int(Path(os.fsdecode(p)).stem) for p in dataset.scan.files(name).paths], dtype=np.int64)


def check_folder(dataset: FolderDataset, source: SourceData) -> dict[str, np.ndarray]:
    """Assert that the folder resolves to fashion-mnist-lt's preset and holds its pools image for image
    and label for label, each class in the built-in order; each pool's map to the built-in indices."""
    built_in = PRESETS[BUILT_IN]
    resolved = dataclasses.replace(dataset.preset, name=built_in.name, source=built_in.source)
    assert resolved == built_in, f"the card gives {dataset.preset}, not {built_in}"
    assert dataset.scan.class_names == tuple(class_folder(c, n, source.num_classes)
                                             for c, n in enumerate(source.class_names)), dataset.scan.class_names
    rng = np.random.default_rng(0)
    to_built_in = {}
    for name in POOLS:
        images, labels = pool(source, name)
        files = dataset.scan.files(name)
        index = original_indices(dataset, name)
        assert np.array_equal(np.sort(index), np.arange(len(labels))), f"{name}: not every image once"
        assert np.array_equal(files.labels, labels[index]), f"{name}: labels differ"
        for c in range(source.num_classes):
            assert np.array_equal(index[files.labels == c], np.flatnonzero(labels == c)), f"{name}: class {c}'s order"
        for i in rng.choice(len(files), size=CHECKED, replace=False):
            pixels = read_image(files.path(int(i)), built_in.image_shape[0], built_in.image_shape[2])
            assert np.array_equal(pixels, images[index[i]]), f"{files.path(int(i))}: pixels differ"
        to_built_in[name] = index
    return to_built_in


# -- the two runs --------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    splits_run: str
    experts_parent: str
    experts: dict[str, dict[str, float]]  # expert -> metric key -> value
    precision: set[str]
    seconds: dict[str, float]  # stage -> wall seconds
    epoch_seconds: float
    epochs: int
    storage: list[str]  # the experts stage's lines about its images


def run_dataset(label: str, dataset_args: list[str], stage_args: dict[str, list[str]], tmp: str,
                log_dir: Path | None) -> Result:
    """``argse splits`` then ``argse experts`` (each with its ``stage_args``) in a fresh store in ``tmp``;
    what they logged."""
    env = store_env(tmp)
    seconds, storage = {}, []
    for stage, extra in stage_args.items():
        seconds[stage], done = argse([stage, *dataset_args, *extra], env, tmp)
        print(f"{label}: argse {stage} {' '.join(dataset_args + extra)}: {seconds[stage]:.0f} s", flush=True)
        if log_dir is not None:
            (log_dir / f"{label}-{stage}.log").write_text(done.stdout + done.stderr)
        if stage == "experts":
            storage = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("images ")]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    (splits_run,) = client.search_runs(experiments, f"tags.\"{TAG_STAGE}\" = 'splits'")
    (parent,) = client.search_runs(experiments, f"tags.\"{TAG_EXPERT}\" = 'all'")
    experts, precision = {}, set()
    for expert in EXPERTS:
        run = client.get_run(parent.data.tags[TAG_EXPERT_RUN + expert])
        experts[expert] = {key: run.data.metrics[metric_name(key)] for key in METRICS.values()}
        precision.add(run.data.tags.get(TAG_PRECISION, "?"))
    epoch_seconds, epochs = experts_epoch_wall(client, parent.info.run_id)
    return Result(splits_run.info.run_id, parent.info.run_id, experts, precision, seconds, epoch_seconds, epochs,
                  storage)


def same_splits(built_in: Result, folder: Result, to_built_in: dict[str, np.ndarray], tmp: dict[str, str],
                source_fingerprint: str) -> list[str]:
    """What differs between the two splits runs' draws (empty: the built-in run read the images the
    folder was written from, and both drew the same images, labels, counts and groups), the folder's
    indices mapped to the built-in pools'."""
    configure(store_env(tmp["built-in"])["MLFLOW_TRACKING_URI"])
    a = load_splits(built_in.splits_run)
    configure(store_env(tmp["folder"])["MLFLOW_TRACKING_URI"])
    b = load_splits(folder.splits_run)
    differ = [] if a.source_fingerprint == source_fingerprint else ["the built-in run's source"]
    mapped = to_built_in["train"][b.indices["train"]]
    if not (np.array_equal(mapped, a.indices["train"]) and np.array_equal(b.labels["train"], a.labels["train"])):
        differ.append("train")
    for split in EVAL_SPLITS:
        mapped = to_built_in["test"][b.indices[split]]
        order = np.argsort(mapped)
        if not (np.array_equal(mapped[order], a.indices[split]) and np.array_equal(b.labels[split][order],
                                                                                   a.labels[split])):
            differ.append(split)
    if not (np.array_equal(a.train_counts, b.train_counts) and np.array_equal(a.class_to_group, b.class_to_group)):
        differ.append("train counts or groups")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/work/data/fashion-png"), help="The PNG folder.")
    parser.add_argument("--epochs", type=int, default=None, help="Expert epochs (default: the preset's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=None, help="Keep each stage's output here.")
    args = parser.parse_args()
    preset = PRESETS[BUILT_IN]
    source = LOADERS[preset.source](FASHION_SYSTEM_DIR)  # where the built-in run, given no --data-dir, reads
    if complete(args.root, source):
        print(f"{args.root}: every image already written, reused")
    else:
        write_folder(args.root, source)
    write_card(args.root)
    started = time.perf_counter()
    dataset = folder_dataset(args.root, FOLDER_NAME)
    scan_seconds = time.perf_counter() - started
    print(f"scanned {args.root} in {scan_seconds:.1f} s:\n" + "\n".join(dataset.describe()), flush=True)
    to_built_in = check_folder(dataset, source)
    print(f"checked: the folder resolves to {BUILT_IN}'s preset, holds its pools in the built-in order, "
          f"{CHECKED} images per pool decode to the built-in pixels", flush=True)
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    seed = ["--seed", str(args.seed)]
    stage_args = {"splits": seed, "experts": seed + (["--epochs", str(args.epochs)] if args.epochs else [])}
    runs = {"built-in": ["--dataset", BUILT_IN], "folder": ["--dataset", FOLDER_NAME, "--data-dir", str(args.root)]}
    results = {}
    with tempfile.TemporaryDirectory(prefix="argse-bench-fashion-") as a, \
            tempfile.TemporaryDirectory(prefix="argse-bench-fashion-") as b:
        tmp = {"built-in": a, "folder": b}
        for label, dataset_args in runs.items():
            results[label] = run_dataset(label, dataset_args, stage_args, tmp[label], args.log_dir)
        differ = same_splits(results["built-in"], results["folder"], to_built_in, tmp, source.fingerprint)

    built_in, folder = results["built-in"], results["folder"]
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs; commit {commit()}; seed {args.seed}, "
          f"{built_in.epochs} epoch(s); precision built-in {'/'.join(sorted(built_in.precision))}, "
          f"folder {'/'.join(sorted(folder.precision))}")
    print(f"folder scan (in this process) {scan_seconds:.1f} s; folder experts: "
          + ("; ".join(folder.storage) or "no line about its images"))
    print("splits: " + ("the same images and labels in train, tunev, val and test, the same counts and groups"
                        if not differ else f"DIFFER in {', '.join(differ)}"))
    print(f"{'stage':8s} {'built-in':>10s} {'folder':>10s}")
    for stage in ("splits", "experts"):
        print(f"{stage:8s} {built_in.seconds[stage]:9.0f}s {folder.seconds[stage]:9.0f}s")
    print(f"{'epoch':8s} {built_in.epoch_seconds:9.1f}s {folder.epoch_seconds:9.1f}s   (seconds per epoch, the three experts)")
    worst = 0.0
    print(f"\n{'expert':12s} {'metric':17s} {'built-in':>9s} {'folder':>9s} {'diff (points)':>14s}")
    for expert in EXPERTS:
        for label, key in METRICS.items():
            x, y = built_in.experts[expert][key], folder.experts[expert][key]
            worst = max(worst, abs(y - x) * 100)
            print(f"{expert:12s} {label:17s} {x * 100:8.2f}% {y * 100:8.2f}% {(y - x) * 100:+14.2f}")
    verdict = worst <= TOLERANCE and not differ
    print(f"\nlargest difference {worst:.2f} points (tolerance {TOLERANCE:g}): {'PASS' if verdict else 'FAIL'}")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
