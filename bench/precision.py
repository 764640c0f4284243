"""Training-step throughput of a preset's expert in fp32, fp32 + channels_last and bf16 autocast +
channels_last on the CPU: the measurement behind a preset's ``cpu_fast_path`` (argse/presets.py).

    python bench/precision.py --dataset fashion-mnist-lt [--threads 1] [--busy] [--rounds 3] [--steps 20]

Every row trains the preset's backbone (fresh seeded init) with the experts stage's own training step
(``argse.training.experts.train_step``: cross-entropy, SGD with momentum 0.9, nesterov, and its
schedule) on the same random uint8 images of the preset's shape, batched and augmented by
``DeviceImages`` with the preset's augmentation, at the preset's batch size and learning rate. The rows
are measured in interleaved rounds and each keeps its best round. Two columns: images per second of
wall time, and per second of this process's CPU time, which other jobs on a shared machine disturb
far less (read it with ``--threads 1``). ``--busy`` keeps one core busy with a second process
meanwhile, as another job on a shared machine would (compare ``--threads 1`` and ``--threads 2``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
import torch

from argse.data.device import DeviceImages
from argse.models.backbones import build_backbone
from argse.presets import PRESETS
from argse.training.experts import train_step
from argse.training.utils import cpu_has_native_bf16
from common import expert, spin

ROWS = {"fp32": (False, False), "fp32 channels_last": (False, True), "bf16 channels_last": (True, True)}


def measure(dataset: str, bf16: bool, channels_last: bool, steps: int, warmup: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over ``steps`` training steps."""
    p = PRESETS[dataset]
    h, w, c = p.image_shape
    rng = np.random.default_rng(0)
    n = p.batch_size * (steps + warmup)
    images = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    data = DeviceImages(images, rng.integers(0, p.num_classes, n), mean=[0.5] * c, std=[0.25] * c,
                        augmentation=p.augmentation, channels_last=channels_last)
    cpu = torch.device("cpu")
    state = expert(p.backbone, p.num_classes, lr=p.lr, batch_size=p.batch_size, device=cpu, bf16=bf16,
                   channels_last=channels_last, steps=steps + warmup)
    batches = data.batches(p.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                           augment=True, drop_last=True)
    seen = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            wall, cpu_seconds, seen = time.perf_counter(), time.process_time(), 0
        train_step(state, x, y, device=cpu, bf16=bf16)
        seen += len(y)
    return seen / (time.perf_counter() - wall), seen / (time.process_time() - cpu_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=tuple(PRESETS), default="fashion-mnist-lt")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best counts")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: default")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop,)) if args.busy else None
    if spinner:
        spinner.start()
    best = {row: (0.0, 0.0) for row in ROWS}
    try:
        for _ in range(args.rounds):
            for row, (bf16, channels_last) in ROWS.items():
                wall, cpu = measure(args.dataset, bf16, channels_last, args.steps, args.warmup)
                best[row] = (max(best[row][0], wall), max(best[row][1], cpu))
    finally:
        stop.set()
        if spinner:
            spinner.join()
    p = PRESETS[args.dataset]
    print(f"{args.dataset}: {type(build_backbone(p.backbone, p.num_classes)).__name__}, batch {p.batch_size}, "
          f"best of {args.rounds} rounds of {args.steps} steps; {torch.get_num_threads()} torch thread(s), "
          f"bf16 units: {'yes' if cpu_has_native_bf16() else 'no'}{'; one core kept busy' if args.busy else ''}")
    print(f"{'row':<20}{'img/s wall':>12}{'img/s CPU':>12}{'vs fp32 (CPU)':>15}")
    for row, (wall, cpu) in best.items():
        print(f"{row:<20}{wall:>12.0f}{cpu:>12.0f}{cpu / best['fp32'][1]:>14.2f}x")


if __name__ == "__main__":
    main()
