"""Training-step time of the digits expert net (the experts stage's own step,
``argse.training.experts.train_step``) with 1 and 2 torch threads (why the digits-lt preset pins one
CPU thread). Prints a table; with --busy, a second process keeps one core busy meanwhile,
as another job or an MLflow server would."""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch

from argse.presets import PRESETS
from argse.training.experts import train_step
from common import expert, spin


def step_seconds(threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    p = PRESETS["digits-lt"]
    state = expert(p.backbone, p.num_classes, lr=p.lr, batch_size=p.batch_size, device=cpu, steps=steps + 5)
    h, w, c = p.image_shape
    x, y = torch.randn(p.batch_size, c, h, w), torch.randint(0, p.num_classes, (p.batch_size,))
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        train_step(state, x, y, device=cpu)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = parser.parse_args()
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=spin, args=(stop,)) if args.busy else None
    if spinner:
        spinner.start()
    try:
        two = step_seconds(2, args.steps)
        one = step_seconds(1, args.steps)
    finally:
        stop.set()
        if spinner:
            spinner.join()
    print(f"digits net, batch 64, training step ({'one core busy' if args.busy else 'idle machine'})")
    print(f"{'threads':>8} {'ms/step':>9}")
    print(f"{2:>8} {two * 1e3:>9.1f}")
    print(f"{1:>8} {one * 1e3:>9.1f}")
    print(f"ratio 2 threads / 1 thread: {two / one:.2f}")


if __name__ == "__main__":
    main()
