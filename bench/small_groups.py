"""How a choice on val should judge a group's error: the alternatives, measured against the
population optimum (the comparison behind `argse.selective.metrics.error_bound`).

    python bench/small_groups.py [--draws 10] [--per-class 150,100,50] [--sharpen 1.0]

The population is the 50-draw test's (argse.testing.logged_run.population): every logged posterior of the uniform mixture of a
fashion-mnist-lt run (tests/data/fashion-mnist-lt-seed0-amd) is a cell with mass proportional to its
lt weight, and labels are drawn from the posteriors, so they are the true posteriors (the tail holds
about 2% of the weight). Each draw samples class-balanced tunev / val / test splits (per-class
sizes `--per-class`), fits the worst-group rule at every target coverage of the default grid with
each judgement of the group errors on val, and measures on the whole population how far its
worst-group error lies above the population optimum (an exhaustive search over the K = 2 family),
and how many tail images it accepts on val and test at its thinnest point. Judgements:

* measured: the errors as measured (`evidence=None`: the behaviour before the bound);
* floor 10: as measured, but a group with fewer than 10 effective accepted images counts as error 1;
* bound 80% / bound 95%: the upper end of the one-sided Wilson interval (95% is the default).

The reference row is "measured"; the ratio column is each judgement's mean gap over it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from argse.selective import fit_at_coverage, selective_errors
from argse.selective.matched import COVERAGES
from argse.selective.metrics import effective_count
from argse.testing.logged_run import draw, exhaustive_worst, population


def floor_judged(tally):
    """The alternative "floor": errors as measured, 1.0 for a group with < 10 effective accepted images."""
    n = effective_count(tally.accepted, tally.accepted_sq)
    return torch.where(n >= 10, tally.errors(), torch.ones_like(tally.accepted))


#: Each judgement as the fits' `evidence` option takes it: None (as measured), a confidence (the bound),
#: or a function of the tally (the floor).
JUDGEMENTS = {"measured": None, "floor 10": floor_judged, "bound 80%": 0.80, "bound 95%": 0.95}
#: The judgements were compared on the fit before the family search (docs/benchmarks.md's table); the
#: search's own comparison, with the bound, is bench/fit_selection.py's.
SEARCH = "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--per-class", default="150,100,50", help="tunev,val,test images per class")
    parser.add_argument("--sharpen", type=float, default=1.0, help="temperature applied to the population's posteriors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(v) for v in args.per_class.split(",")]
    eta, joint, prior, c2g = population(sharpen=args.sharpen)
    optimum = exhaustive_worst(eta, joint, c2g, COVERAGES).numpy()
    cell, label = (joint > 0).nonzero(as_tuple=True)
    print(f"population: {eta.shape[0]} cells, tail weight {float(prior[c2g == 1].sum()):.4f}, sharpen {args.sharpen}; "
          f"tunev/val/test {sizes} per class; {args.draws} draws")
    gaps = {name: [] for name in JUDGEMENTS}
    thin = {name: [] for name in JUDGEMENTS}
    emptied = {name: 0 for name in JUDGEMENTS}
    start = time.perf_counter()
    for seed in range(args.draws):
        g = torch.Generator().manual_seed(seed)
        (e_fit, y_fit, w_fit), (e_sel, y_sel, w_sel), (e_test, y_test, _) = (
            draw(eta, joint, prior, n, g) for n in sizes)
        for name, evidence in JUDGEMENTS.items():
            rules = fit_at_coverage(e_fit, y_fit, e_sel, y_sel, c2g, COVERAGES, objective="worst",
                                    weights_fit=w_fit, weights_sel=w_sel, evidence=evidence, search=SEARCH)
            errors, tail_val, tail_test = [], [], []
            for rule in rules:
                out = rule.predict(eta[cell])
                errors.append(selective_errors(out.pred, out.accept, label, c2g, weights=joint[cell, label]).worst_error)
                tail_val.append(int((rule.predict(e_sel).accept & (c2g[y_sel] == 1)).sum()))
                tail_test.append(int((rule.predict(e_test).accept & (c2g[y_test] == 1)).sum()))
            gaps[name].append(float((np.asarray(errors) - optimum).max()))
            thin[name].append(min(tail_val))
            emptied[name] += min(tail_test) == 0
    print(f"({time.perf_counter() - start:.0f} s)")
    reference = np.mean(gaps["measured"])
    print("| judgement | largest gap | mean of each draw's largest gap | ratio to measured | fewest tail images "
          "accepted on val (median) | draws emptying the tail on test |")
    print("|:---|---:|---:|---:|---:|---:|")
    for name in JUDGEMENTS:
        print(f"| {name} | {max(gaps[name]):.4f} | {np.mean(gaps[name]):.4f} | {np.mean(gaps[name]) / reference:.2f} | "
              f"{int(np.median(thin[name]))} | {emptied[name]} of {args.draws} |")


if __name__ == "__main__":
    main()
