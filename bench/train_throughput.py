"""Training throughput of ResNet-32 on CIFAR-shaped data: this project's on-device pipeline against
the standard torchvision + PIL + DataLoader pipeline, measured in the same run.

    python bench/train_throughput.py [--steps 25] [--rounds 3] [--device auto|cpu|cuda]

Every row trains the same model (ResNet-32, 100 classes, fresh seeded init) with the same step (SGD,
momentum 0.9, nesterov, cross-entropy, bf16 autocast on CUDA only) on the same random uint8 images
(10,847, the size of CIFAR-100-LT's train split). Only the input pipeline and the memory format differ:

* reference: ``Dataset`` of uint8 arrays -> PIL -> ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` -> ``DataLoader(num_workers=2)``, model NCHW.
* ours: ``argse.data.device.DeviceImages`` (uint8 on the device, crop/flip/normalise per batch there).

The first ``--warmup`` steps of each row are not timed; rows are measured in interleaved rounds and each
keeps its best round. "ours" is the faster of its NCHW and channels_last rows; the ratio column divides
each row by the standard reference (first row).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from argse.data.device import DeviceImages, normalize_stats
from argse.models.backbones import resnet32
from argse.train_utils import autocast_context, resolve_device

CIFAR100_LT_TRAIN_IMAGES = 10_847
NUM_CLASSES = 100


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


def reference_batches(
    images: np.ndarray, labels: np.ndarray, mean: tuple, std: tuple, args: argparse.Namespace, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = DataLoader(
        PilImages(images, labels, transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    for _ in itertools.count():
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def our_batches(
    images: np.ndarray, labels: np.ndarray, mean: tuple, std: tuple, args: argparse.Namespace,
    device: torch.device, channels_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    data = DeviceImages(
        images, labels, mean=mean, std=std, augmentation="cifar", device=device, channels_last=channels_last
    )
    generator = torch.Generator().manual_seed(0)
    for _ in itertools.count():
        yield from data.batches(args.batch_size, shuffle=True, generator=generator, augment=True, drop_last=True)


def measure(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], channels_last: bool, args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Training images per second over ``args.steps`` steps, after ``args.warmup`` untimed ones."""
    torch.manual_seed(0)
    model = resnet32(NUM_CLASSES).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    step_fn = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    seen = 0
    start = 0.0
    for step, (x, y) in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            seen = 0
        with autocast_context(device):
            loss = F.cross_entropy(step_fn(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += y.shape[0]
        if step + 1 == args.warmup + args.steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.num_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=args.num_images)
    mean, std = normalize_stats(images)

    reference_name = f"reference: torchvision+PIL+DataLoader({args.workers} workers)"
    ours_name = "ours: DeviceImages, on-device crop/flip"
    configs: list[tuple[str, str, Callable[[], Iterator], bool]] = [
        (reference_name, "NCHW", lambda: reference_batches(images, labels, mean, std, args, device), False),
        (reference_name, "channels_last", lambda: reference_batches(images, labels, mean, std, args, device), True),
        (ours_name, "NCHW", lambda: our_batches(images, labels, mean, std, args, device, False), False),
        (ours_name, "channels_last", lambda: our_batches(images, labels, mean, std, args, device, True), True),
    ]
    load_before = os.getloadavg()[0]
    # Rows are interleaved round by round and each keeps its best round, so a burst of load from
    # another process cannot favour one pipeline over the other.
    best = [0.0] * len(configs)
    for _ in range(args.rounds):
        for index, (_, _, make, channels_last) in enumerate(configs):
            batches = make()
            best[index] = max(best[index], measure(batches, channels_last, args, device))
            batches.close()  # stops the DataLoader workers before the next row
    rows = [(name, layout, rate) for (name, layout, _, _), rate in zip(configs, best)]

    reference = rows[0][2]
    ours = max(rows[2:], key=lambda row: row[2])
    print(
        f"ResNet-32, 100 classes, batch {args.batch_size}, best of {args.rounds} rounds of {args.steps} timed steps "
        f"after {args.warmup} warm-up, "
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch threads {torch.get_num_threads()}, autocast {'bf16' if device.type == 'cuda' else 'off'}"
        + (", torch.compile" if args.compile else "")
    )
    header = f"{'pipeline':<50} {'layout':<14} {'img/s':>9} {'vs ref':>7} {'200 ep CIFAR-100-LT':>20}"
    print(header)
    print("-" * len(header))
    for name, layout, rate in rows:
        hours = 200 * CIFAR100_LT_TRAIN_IMAGES / rate / 3600
        print(f"{name:<50} {layout:<14} {rate:>9.1f} {rate / reference:>6.2f}x {hours:>18.2f} h")
    print("-" * len(header))
    print(f"ours ({ours[1]}) / reference (NCHW): {ours[2] / reference:.2f}x")
    print(f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs (other processes distort CPU timings)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="timed training steps per row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row keeps its best")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing each row")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-images", type=int, default=CIFAR100_LT_TRAIN_IMAGES)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in every row")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    return args


if __name__ == "__main__":
    main(parse_args())
