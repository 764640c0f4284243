"""The evaluate stage's computation with the fit's search and without it, on the same logits.

    python bench/evaluate_time.py [--repeats 3] [--prior lt]

What `argse evaluate` computes after loading its inputs: `compare` of the stage's methods (Chow's rule
on each expert and their average, the plug-in rows on the best expert and the average, the ar-gse
rows) on test, with the default grid of 17 target coverages and 200 bootstrap resamples, on the
logged fashion-mnist-lt run of tests/data (its registered model is the uniform mixture). Once with
`FitOptions(search="none")`, the fit before the search (the paper's fixed point alone), once with
the default options; interleaved, best of `--repeats`, CPU time of this process (the machine may be
shared) and wall time. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from argse.selective import FitOptions, PluginRule
from argse.selective.compare import compare
from argse.stages.evaluate import build_methods
from argse.testing.logged_run import logged_experts, uniform_gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prior", default="lt", choices=("lt", "balanced"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    experts = logged_experts(args.prior)
    c2g = torch.as_tensor(experts.splits.class_to_group)
    k = int(c2g.max()) + 1
    rule = PluginRule(alpha=torch.ones(k), mu=torch.zeros(k), beta=torch.full((k,), 1.0 / k), cost=0.1,
                      class_to_group=c2g)  # the operating point's rule; the coverage-matched rows refit
    methods = build_methods(experts, uniform_gate(len(experts.names)), rule, "worst", args.prior)
    weights = {s: experts.weights(s, args.prior) for s in ("tunev", "val", "test")}
    runs = {"search none (before)": FitOptions(search="none"), "default (after)": FitOptions()}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):  # interleaved
        for name, options in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            compare(methods, experts.labels, weights, c2g, split="test", cost=rule.cost, n_boot=200,
                    group_names=experts.splits.group_names, fit_options=options)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            previous = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(previous[0], cpu), min(previous[1], wall))
    print(f"evaluate's comparison on tests/data/fashion-mnist-lt-seed0-amd ({args.prior} prior, {len(methods)} "
          f"methods, 17 coverages, 200 resamples), best of {args.repeats}, one torch thread:")
    for name, (cpu, wall) in best.items():
        print(f"  {name:22s} {cpu:6.1f} s CPU  {wall:6.1f} s wall")
    (cpu0, wall0), (cpu1, wall1) = best.values()
    print(f"ratio (after / before): {cpu1 / cpu0:.2f}x CPU, {wall1 / wall0:.2f}x wall")


if __name__ == "__main__":
    main()
