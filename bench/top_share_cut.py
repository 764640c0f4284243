"""The top-share cut of a fit (`argse.selective.cut.top_share_cut`) against a full sort of each row.

    python bench/top_share_cut.py [--repeats 5]

A coverage fit spends most of its time finding, for many candidate rules at once, the margin where
the accepted share of a split reaches each target coverage. The rows timed here are the real ones:
every call the worst-group fit at the default grid of 17 coverages makes on bench/coverage_eval.py's
fashion-mnist-lt-shaped problem (tunev 3,000, val 2,000 images) is recorded, then each call is
answered by the project's bracketing cut and by the reference, a full descending argsort of every
row and a walk down it. Both must give the same values ("agree"); the ratio is reference / ours.
One torch and numpy thread.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import argse.selective.cut as cut_module  # noqa: E402
from argse.selective import fit_at_coverage  # noqa: E402
from argse.selective.matched import COVERAGES  # noqa: E402
from argse.training.utils import cpu_model  # noqa: E402
from common import CLASS_TO_GROUP, problem  # noqa: E402


def full_sort(values: np.ndarray, weight: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The reference: sort every row, accumulate the share from the top, take the first sample where it
    reaches the level (less 1e-12)."""
    order = np.argsort(-values, axis=1)
    share = np.cumsum(weight[order], axis=1) / weight.sum()
    take = np.minimum((share < level[:, None] - 1e-12).sum(axis=1), values.shape[1] - 1)
    every = np.arange(values.shape[0])
    return values[every, order[every, take]]


def recorded_calls() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    labels, experts = problem()
    calls = []

    def record(values, weight, level):
        calls.append((values.copy(), weight.copy(), level.copy()))

    cut_module.CUT_OBSERVERS.append(record)
    try:
        mixture = {split: experts[split].mean(dim=1) for split in ("tunev", "val")}
        fit_at_coverage(mixture["tunev"], labels["tunev"], mixture["val"], labels["val"], CLASS_TO_GROUP, COVERAGES,
                        objective="worst")
    finally:
        cut_module.CUT_OBSERVERS.remove(record)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls = recorded_calls()
    rows = sum(c[0].shape[0] for c in calls)
    print(f"{len(calls)} calls of the worst-group fit at {len(COVERAGES)} coverages, {rows} rows of "
          f"{sorted({c[0].shape[1] for c in calls})} margins; CPU {cpu_model()}, float64, 1 thread")
    agree = all(np.array_equal(full_sort(*c), cut_module.top_share_cut_cpu(*c)) for c in calls)
    print(f"agree: {agree}")
    seconds = {}
    for _ in range(args.repeats):  # interleaved, best of the repeats
        for name, cut in (("full sort", full_sort), ("ours", cut_module.top_share_cut_cpu)):
            started = time.perf_counter()
            for call in calls:
                cut(*call)
            seconds[name] = min(seconds.get(name, np.inf), time.perf_counter() - started)
    for name, value in seconds.items():
        print(f"{name:10s} {value * 1e3:8.1f} ms")
    print(f"ratio (full sort / ours): {seconds['full sort'] / seconds['ours']:.2f}x")
    if not agree:
        raise SystemExit("the two cuts disagree")


if __name__ == "__main__":
    main()
