"""Benchmark of the coverage-matched comparison (`argse.selective.compare.compare`) against a naive loop.

    python bench/coverage_eval.py [--threads 1] [--n-boot 200]

The data imitate fashion-mnist-lt's evaluation splits: 10 classes (7 head, 3 tail), tunev / val /
test of 3,000 / 2,000 / 5,000 held-out images (300 / 200 / 500 per class), and three "experts" whose
posteriors lean towards the head by different amounts, so the methods the evaluate stage compares
are all there: Chow on each expert and on their average, the plug-in (balanced and worst) on the
best expert and on the average, and a "mixture" standing in for the gated one (10 methods, the
default grid of 17 target coverages, 200 bootstrap resamples).

The reference does the same work the obvious way: for every method and every target coverage on
its own, one `fit_at_coverage` call (no batching over coverages) and the errors from
`selective_errors`; then a Python loop over the bootstrap resamples that re-measures every point.
Both must give the same AURCs (the "agree" line).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from argse.selective import chow, fit_at_coverage, selective_errors
from argse.selective.compare import compare
from argse.selective.matched import COVERAGES, FIT_SPLIT, SEL_SPLIT, FitOptions, Method, trapezoid
from common import CLASS_TO_GROUP, SIZES, problem

def methods(experts) -> list[Method]:
    splits = tuple(SIZES)
    out = [Method(f"chow[e{e}]", "chow", {s: experts[s][:, e] for s in splits}) for e in range(3)]
    uniform = {s: experts[s].mean(dim=1) for s in splits}
    mixture = {s: (experts[s] * torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)[None, :, None]).sum(1)
               for s in splits}
    out.append(Method("chow[uniform]", "chow", uniform))
    for obj in ("balanced", "worst"):
        out += [Method(f"plugin-{obj}[e1]", "plugin", {s: experts[s][:, 1] for s in splits}, obj),
                Method(f"plugin-{obj}[uniform]", "plugin", uniform, obj),
                Method(f"ar-gse[{obj}]", "plugin", mixture, obj)]
    return out


def naive(all_methods, labels, n_boot: int, options: FitOptions, seed: int) -> dict[str, tuple[float, float]]:
    """AURCs and bootstrap intervals, one coverage and one resample at a time."""
    y, w = labels["test"], torch.ones(SIZES["test"], dtype=torch.float64)
    index = torch.from_numpy(np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y))))
    out = {}
    for m in all_methods:
        decisions = []
        for tau in COVERAGES:
            if m.kind == "chow":
                _, conf_val = chow(m.eta[SEL_SPLIT])
                ranked = conf_val.sort(descending=True).values
                threshold = ranked[int(np.ceil(tau * len(ranked) - 1e-9)) - 1]
                pred, conf = chow(m.eta["test"])
                decisions.append((pred, conf >= threshold))
            else:
                rule = fit_at_coverage(m.eta[FIT_SPLIT], labels[FIT_SPLIT], m.eta[SEL_SPLIT], labels[SEL_SPLIT],
                                       CLASS_TO_GROUP, [tau], objective=m.objective, rounds=options.rounds,
                                       step=options.step, n_starts=options.n_starts, max_iter=options.max_iter)[0]
                d = rule.predict(m.eta["test"])
                decisions.append((d.pred, d.accept))
        worst = [selective_errors(p, a, y, CLASS_TO_GROUP, w).worst_error for p, a in decisions]
        boot = []
        for rows in index:  # a loop over resamples
            boot.append([selective_errors(p[rows], a[rows], y[rows], CLASS_TO_GROUP, w[rows]).worst_error
                         for p, a in decisions])
        out[m.name] = (float(trapezoid(COVERAGES, worst)), float(np.quantile(trapezoid(COVERAGES, torch.tensor(boot)), 0.975)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-boot", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels, experts = problem()
    all_methods = methods(experts)
    options = FitOptions()

    start = time.perf_counter()
    result = compare(all_methods, labels, None, CLASS_TO_GROUP, cost=0.0, target_coverage=0.8, n_boot=args.n_boot,
                     fit_options=options)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    reference = naive(all_methods, labels, args.n_boot, options, seed=0)
    theirs = time.perf_counter() - start

    table = result.table.set_index("method")
    gap = max(abs(table.loc[name, "aurc_worst"] - ref[0]) for name, ref in reference.items())
    gap_hi = max(abs(table.loc[name, "aurc_worst_hi"] - ref[1]) for name, ref in reference.items())
    print(f"{len(all_methods)} methods x {len(COVERAGES)} target coverages, {args.n_boot} bootstrap resamples, "
          f"test split of {SIZES['test']}, torch threads {args.threads}")
    print("| what | compare (s) | naive loop (s) | ratio |")
    print("|:---|---:|---:|---:|")
    print(f"| coverage-matched table | {ours:.1f} | {theirs:.1f} | {theirs / ours:.1f}x |")
    print(f"agree: largest |aurc_worst difference| {gap:.2e}, of its upper bound {gap_hi:.2e}")


if __name__ == "__main__":
    main()
