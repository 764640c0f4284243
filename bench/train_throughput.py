"""Training throughput of ResNet-32 on CIFAR-shaped data: this project's on-device pipeline against
the standard torchvision + PIL + DataLoader pipeline, measured in the same run.

    python bench/train_throughput.py [--steps 25] [--rounds 3] [--device auto|cpu|cuda]

Every row trains the same model (ResNet-32, 100 classes, fresh seeded init) with the experts stage's
own step (``argse.training.experts.train_step``: cross-entropy, SGD with momentum 0.9, nesterov, and
its schedule) on the same random uint8 images (10,847, the size of
CIFAR-100-LT's train split); on CUDA every row uses bf16 autocast. Only the input pipeline, the
memory format and (last CPU row) the precision differ:

* reference: a ``Dataset`` of uint8 arrays -> PIL -> ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` -> ``DataLoader(num_workers=2)``.
* ours: ``argse.data.device.DeviceImages`` (uint8 on the device; crop, flip and normalisation per
  batch there).

Each row runs ``--warmup`` untimed steps, then ``--steps`` timed ones; the rows are measured in
interleaved rounds and each keeps its best round, so load from other processes cannot favour one
row. "vs ref" divides by the standard reference (first row, NCHW, fp32). The headline ratio is the
row that matches what ``argse experts --precision auto`` does on this device: on a CPU with bf16
units (AMX / AVX512-BF16) the CIFAR preset trains channels_last with bf16 autocast, the last row;
elsewhere fp32 channels_last. The fp32 ratio and the data path's share are printed beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from argse.data.device import DeviceImages, normalize_stats
from argse.training.experts import train_step
from argse.training.utils import cpu_has_native_bf16, resolve_device
from common import expert

CIFAR100_LT_TRAIN_IMAGES = 10_847
NUM_CLASSES = 100
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class PilImages(Dataset):
    """uint8 HWC images served one by one through PIL and a torchvision transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


@dataclass
class Setup:
    """What the rows share: the data, its statistics, the device and the options."""

    images: np.ndarray
    labels: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    args: argparse.Namespace


def reference_batches(setup: Setup) -> Batches:
    """Endless training batches from the standard torchvision + PIL + DataLoader pipeline."""
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(setup.mean, setup.std),
        ]
    )
    loader = DataLoader(
        PilImages(setup.images, setup.labels, transform),
        batch_size=setup.args.batch_size,
        shuffle=True,
        num_workers=setup.args.workers,
        drop_last=True,
        pin_memory=setup.device.type == "cuda",
        persistent_workers=setup.args.workers > 0,
    )
    for _ in itertools.count():
        for x, y in loader:
            yield x.to(setup.device, non_blocking=True), y.to(setup.device, non_blocking=True)


def our_batches(setup: Setup, channels_last: bool) -> Batches:
    """Endless training batches from this project's on-device pipeline."""
    data = DeviceImages(
        setup.images,
        setup.labels,
        mean=setup.mean,
        std=setup.std,
        augmentation="cifar",
        device=setup.device,
        channels_last=channels_last,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in itertools.count():
        yield from data.batches(
            setup.args.batch_size, shuffle=True, generator=generator, augment=True, drop_last=True
        )


@dataclass
class Row:
    pipeline: str
    layout: str
    make: Callable[[], Batches]
    channels_last: bool
    cpu_bf16: bool = False
    best: float = 0.0
    memory: float = 0.0  #: peak GPU memory of the row's training, in GB (CUDA only)


def measure(row: Row, setup: Setup) -> float:
    """Training images per second over ``--steps`` steps, after ``--warmup`` untimed ones (on CUDA the
    row's peak GPU memory goes to ``row.memory``)."""
    args, device = setup.args, setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bf16 = device.type == "cuda" or row.cpu_bf16
    state = expert("resnet32", NUM_CLASSES, lr=0.1, batch_size=args.batch_size, device=device, bf16=bf16,
                   channels_last=row.channels_last, steps=args.warmup + args.steps)
    if args.compile:
        state.model = torch.compile(state.model, mode=args.compile_mode)
    batches = row.make()
    seen, start = 0, 0.0
    for step, (x, y) in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen, start = 0, time.perf_counter()
        train_step(state, x, y, device=device, bf16=bf16)
        seen += y.shape[0]
        if step + 1 == args.warmup + args.steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
        row.memory = max(row.memory, torch.cuda.max_memory_allocated(device) / 1e9)
    elapsed = time.perf_counter() - start
    batches.close()  # shuts the DataLoader workers down before the next row
    return seen / elapsed


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.num_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=args.num_images)
    mean, std = normalize_stats(images)
    setup = Setup(images, labels, mean, std, device, args)

    reference = f"reference: torchvision+PIL+DataLoader({args.workers} workers)"
    ours = "ours: DeviceImages, on-device crop/flip"
    rows = [
        Row(reference, "NCHW", lambda: reference_batches(setup), channels_last=False),
        Row(reference, "channels_last", lambda: reference_batches(setup), channels_last=True),
        Row(ours, "NCHW", lambda: our_batches(setup, False), channels_last=False),
        Row(ours, "channels_last", lambda: our_batches(setup, True), channels_last=True),
    ]
    default_bf16 = device.type == "cpu" and cpu_has_native_bf16()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        label = ("ours as `argse experts` trains here: + bf16 autocast" if default_bf16
                 else "ours + CPU bf16 autocast (--precision bf16)")
        rows.append(Row(label, "channels_last", lambda: our_batches(setup, True), channels_last=True, cpu_bf16=True))

    if args.rows:
        keep = {0} | {int(i) for i in args.rows.split(",")}
        rows = [row for i, row in enumerate(rows) if i in keep]
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for row in rows:
            row.best = max(row.best, measure(row, setup))

    print(
        f"ResNet-32, 100 classes, batch {args.batch_size}, best of {args.rounds} rounds of "
        f"{args.steps} timed steps after {args.warmup} warm-up; device {_describe(device)}; "
        f"autocast {'bf16 on every row' if device.type == 'cuda' else 'off except the bf16 row'}"
        + (f"; torch.compile (mode {args.compile_mode})" if args.compile else "")
    )
    header = (
        f"{'pipeline':<50} {'layout':<14} {'img/s':>8} {'vs ref':>7} "
        f"{'200 epochs, 1 expert':>21} {'x 3 experts':>12}"
        + (f" {'GPU memory':>11}" if device.type == "cuda" else "")
    )
    print(header)
    print("-" * len(header))
    base = rows[0].best
    for row in rows:
        hours = 200 * CIFAR100_LT_TRAIN_IMAGES / row.best / 3600
        print(
            f"{row.pipeline:<50} {row.layout:<14} {row.best:>8.1f} {row.best / base:>6.2f}x "
            f"{_hours(hours):>21} {_hours(3 * hours):>12}"
            + (f" {row.memory:>8.2f} GB" if device.type == "cuda" else "")
        )
    print("-" * len(header))
    precision = "bf16" if device.type == "cuda" else "fp32"
    if len(rows) >= 4:  # every row measured (not --rows)
        best_ours, same_layout_reference = max(
            zip(rows[2:4], rows[0:2]), key=lambda pair: pair[0].best
        )
        # What `argse experts --precision auto` does on this device: CUDA and the CIFAR CPU fast path
        # train channels_last with bf16 autocast where the hardware has bf16 units.
        default = rows[-1] if default_bf16 else rows[3]
        print(
            f"ours as `argse experts` trains here ({default.pipeline.split(': ', 1)[-1]}, {default.layout}) / "
            f"reference (NCHW, {precision}): {default.best / base:.2f}x"
        )
        print(
            f"ours {precision} ({best_ours.layout}) / reference (NCHW): {best_ours.best / base:.2f}x; "
            f"data path alone (both {best_ours.layout}): "
            f"{best_ours.best / same_layout_reference.best:.2f}x"
        )
    print(
        f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs (other processes distort CPU timings)"
    )


def _hours(hours: float) -> str:
    """A projected training time: minutes below two hours, else hours."""
    return f"{hours * 60:.1f} min" if hours < 2 else f"{hours:.2f} h"


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({os.cpu_count()} CPUs, {capability}, {torch.get_num_threads()} torch threads)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=25, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best counts")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-images", type=int, default=CIFAR100_LT_TRAIN_IMAGES)
    parser.add_argument("--workers", type=int, default=2, help="the reference's DataLoader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: default")
    parser.add_argument("--compile", action="store_true", help="torch.compile every row's model")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile's mode (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--rows", default="", help="measure only these rows, e.g. 0,3 (0: the reference, "
                                                   "always measured); default all")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return args


if __name__ == "__main__":
    main(parse_args())
