"""Streaming a folder of JPEGs: this project's folder reader against torchvision's ``ImageFolder`` +
``DataLoader``, one epoch each, measured in the same run.

    python bench/folder_stream.py [--root /work/data/jpeg-50k] [--images 50000] [--workers 2]
                                  [--batch-size 256] [--rounds 2]

The folder (``--images`` 64x64 RGB JPEGs in 100 class folders with a long tail, quality 90) is
generated once into ``--root`` and reused. Both rows read every image of ``train/`` once in a shuffled
order, with the same worker processes, the same batch size and the same transforms: a random resized
crop to 64x64 (scale 0.08-1, ratio 3/4-4/3, bilinear) and a horizontal flip, then a float32 batch
normalised by per-channel mean and std (estimated once, by this script, from 2,000 of the images):

* reference: ``torchvision.datasets.ImageFolder(root, transform=Compose([RandomResizedCrop(64),
  RandomHorizontalFlip(), PILToTensor(), ToDtype(float32, scale=True), Normalize(mean, std)]))`` in a
  ``DataLoader(batch_size, shuffle=True, num_workers)``.
* ours: ``argse.data.stream.StreamedImages`` over the scan of the same folder (``argse.data.folder``),
  the epoch's boxes and flips drawn in the main process: each worker task decodes a whole batch
  (Pillow, crop and resize in one call, the flip) into one uint8 tensor and, the device being the
  CPU, normalises it there too (on a GPU the uint8 batch would be normalised on the GPU).

Each row's dataset is built first (``ImageFolder``'s file list; our scan of every image's header, which
a run makes once, not per epoch; both times are printed), then one epoch is timed. Each row runs in
its own fresh Python process (so its peak memory is its own); the parent samples the resident memory
of that process and all its children (the DataLoader workers) every 20 ms and reports the peak of
their sum (RSS, counting pages the workers share with the parent once per process: an upper bound)
and of their proportional set size (PSS: shared pages split between the processes that map them). The rows alternate over ``--rounds`` rounds and each keeps its best round,
so load from other processes cannot favour one row. The ratio is ours / reference images per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CLASSES = 100
IMAGE_SIZE = 64
IMBALANCE = 10.0  # largest over smallest class of the generated folder
TEST_PER_CLASS = 2  # a test/ tree, so the folder is a complete dataset for argse.data.folder


def class_counts(total: int, classes: int = CLASSES, imbalance: float = IMBALANCE) -> np.ndarray:
    """``total`` images over ``classes`` classes, exponentially decaying by ``imbalance``."""
    shares = imbalance ** (-np.arange(classes) / (classes - 1))
    counts = np.floor(shares / shares.sum() * total).astype(np.int64)
    counts[0] += total - counts.sum()
    return counts


def generate(root: Path, total: int, seed: int = 0) -> None:
    """``total`` 64x64 JPEGs under ``root/train/<class>/`` (and a few under ``root/test/``): smooth colour
    gradients with noise (about 2 KB each, as a photo of that size), written once; a marker file says
    the folder is complete."""
    from PIL import Image

    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(total):
        return
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    started = time.perf_counter()
    for split, counts in (("train", class_counts(total)), ("test", np.full(CLASSES, TEST_PER_CLASS))):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, (count, 1, 1, 3)).astype(np.float32)
            slopes = rng.uniform(-2, 2, (count, 2, 1, 1, 3)).astype(np.float32)
            noise = rng.normal(0, 12, (count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
            images = base + x[None, ..., None] * slopes[:, 0] + y[None, ..., None] * slopes[:, 1] + noise
            for i, image in enumerate(np.clip(images, 0, 255).astype(np.uint8)):
                Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)
        print(f"generated {root / split}: {int(counts.sum()):,} images ({time.perf_counter() - started:.0f} s)",
              flush=True)
    # Its tail (classes with at most 200 images) for argse.dataset_card, so the folder is a dataset as it is.
    (root / "argse-dataset.yaml").write_text("group_thresholds: 200\n")
    marker.write_text(str(total))


# -- one row, in its own process ------------------------------------------------------------------


def stats(root: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a fixed sample of the folder, computed once here and given to both rows."""
    from argse.data.folder import scan_folder
    from argse.data.stream import estimate_stats

    scan = scan_folder(root)
    return estimate_stats(scan.files("train"), IMAGE_SIZE, scan.channels, workers=0)


def reference_loader(root: Path, workers: int, batch_size: int, mean, std):
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip(),
                            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    data = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    return lambda: iter(loader)


def our_loader(root: Path, workers: int, batch_size: int, mean, std):
    import torch

    from argse.data.folder import scan_folder
    from argse.data.stream import StreamedImages

    scan = scan_folder(root)
    data = StreamedImages(scan.files("train"), image_size=IMAGE_SIZE, channels=scan.channels, mean=mean, std=std,
                          augmentation="natural", workers=workers)
    return lambda: data.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), augment=True,
                                drop_last=False)


def one_row(row: str, root: Path, workers: int, batch_size: int, mean: list[float], std: list[float]) -> None:
    """Time one epoch of ``row`` (the dataset built before: ImageFolder's file list, or the folder's
    scan, which a run makes once, not per epoch); print one JSON line (the parent measures the memory)."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    epoch = (reference_loader if row == "reference" else our_loader)(root, workers, batch_size, mean, std)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    seen = sum(len(y) for _, y in epoch())
    seconds = time.perf_counter() - started
    print(json.dumps({"row": row, "images": seen, "seconds": seconds, "setup": setup}), flush=True)


# -- the parent: memory of a process tree -----------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process, (0, 0) when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def measure(row: str, args: argparse.Namespace, mean: list[float], std: list[float]) -> dict:
    """Run ``row`` in a fresh process; its JSON line plus the peak RSS and PSS of its process tree."""
    command = [sys.executable, __file__, "--row", row, "--root", str(args.root), "--workers", str(args.workers),
               "--batch-size", str(args.batch_size), "--stats", json.dumps([list(mean), list(std)])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = pss = 0
            for pid in _tree(process.pid):
                r, p = _memory(pid)
                rss, pss = rss + r, pss + p
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"the {row} row failed (exit code {process.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "per_second": result["images"] / result["seconds"], "peak_rss": peak["rss"],
            "peak_pss": peak["pss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="The folder (default /work/data/jpeg-<N/1000>k).")
    parser.add_argument("--images", type=int, default=50_000, help="Training images to generate when absent.")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes, both rows.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds; each row keeps its best.")
    parser.add_argument("--only", choices=("reference", "ours"), default=None, help="Measure one row only.")
    parser.add_argument("--generate-only", action="store_true", help="Write the folder and stop.")
    parser.add_argument("--row", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.root is None:
        args.root = Path(f"/work/data/jpeg-{args.images // 1000}k")
    if args.row:
        one_row(args.row, args.root, args.workers, args.batch_size, *args.stats)
        return
    generate(args.root, args.images)
    if args.generate_only:
        return
    mean, std = stats(args.root)
    rows = ("reference", "ours") if args.only is None else (args.only,)
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for row in (rows if round_ % 2 == 0 else rows[::-1]):
            result = measure(row, args, mean, std)
            print(f"round {round_ + 1} {row:9s}: dataset built in {result['setup']:.1f} s, then "
                  f"{result['images']:,} images in {result['seconds']:.1f} s = "
                  f"{result['per_second']:,.0f} images/s; peak of the process tree RSS "
                  f"{result['peak_rss'] / 2**30:.2f} GiB, PSS {result['peak_pss'] / 2**30:.2f} GiB", flush=True)
            if row not in best or result["per_second"] > best[row]["per_second"]:
                best[row] = {**result, "peak_rss": max(result["peak_rss"], best.get(row, {}).get("peak_rss", 0)),
                             "peak_pss": max(result["peak_pss"], best.get(row, {}).get("peak_pss", 0))}
            else:
                best[row]["peak_rss"] = max(best[row]["peak_rss"], result["peak_rss"])
                best[row]["peak_pss"] = max(best[row]["peak_pss"], result["peak_pss"])
    print(f"\n{args.root}: one epoch of {next(iter(best.values()))['images']:,} 64x64 JPEGs, {args.workers} workers, "
          f"batch {args.batch_size}, best of {args.rounds} round(s)")
    print(f"{'row':10s} {'images/s':>10s} {'peak RSS':>10s} {'peak PSS':>10s}")
    for row, result in best.items():
        print(f"{row:10s} {result['per_second']:10,.0f} {result['peak_rss'] / 2**30:9.2f}G {result['peak_pss'] / 2**30:9.2f}G")
    if len(best) == 2:
        print(f"ratio (ours / reference images per second): {best['ours']['per_second'] / best['reference']['per_second']:.2f}x")


if __name__ == "__main__":
    main()
