"""Training-step time of the digits expert net with 1 and 2 torch threads (why the digits-lt preset
pins one CPU thread). Prints a table; with --busy, a second process keeps one core busy meanwhile,
as another job or an MLflow server would."""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch

from argse.models.backbones import DigitsNet


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def step_seconds(threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DigitsNet(10)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = parser.parse_args()
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,)) if args.busy else None
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
