"""The coverage fit reaches the optimum of its family on val where val has the evidence for it.

On the logged fashion-mnist-lt run (tests/data/fashion-mnist-lt-seed0-amd; the registered model there
is the uniform mixture under the lt prior), at target coverages 1.0 and 0.95, where most of the area
of the comparison lies and val holds dozens of errors in each group, the balanced fit's balanced error
on val is within 0.0005 of the lowest that any rule of the K = 2 family reaches there: an exhaustive
search, written independently of the library (tests/oracle.py), over a grid of 241 coefficient
ratios and 81 mu gaps per ratio, each with its threshold at the coverage.
"""

import numpy as np
import pytest
import torch

from argse.selective import fit_at_coverage, selective_errors
from oracle import best_at_coverage, sample_cells
from test_small_groups import logged_experts

#: rho = coef_tail / coef_head on a log grid, and the mu gap as a multiple of rho (mu_tail - mu_head =
#: m * coef_tail, m from -2 to 2): at coverage 1 nothing is rejected and only rho matters.
RHOS = np.geomspace(0.5, 500.0, 241)
M_GRID = np.linspace(-2.0, 2.0, 81)


@pytest.fixture(scope="module")
def mixture():
    experts = logged_experts("lt")
    eta = {s: experts.probs[s].mean(dim=1) for s in ("tunev", "val")}
    w = {s: experts.weights(s, "lt") for s in eta}
    return eta, experts.labels, w, torch.as_tensor(experts.splits.class_to_group)


@pytest.mark.slow
@pytest.mark.parametrize("tau", [1.0, 0.95])
def test_the_balanced_coverage_fit_reaches_the_family_optimum_on_val(mixture, tau):
    eta, y, w, c2g = mixture
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rule = fit_at_coverage(eta["tunev"], y["tunev"], eta["val"], y["val"], c2g, tau, weights_fit=w["tunev"],
                               weights_sel=w["val"])[0]
        out = rule.predict(eta["val"])
        fitted = selective_errors(out.pred, out.accept, y["val"], c2g, weights=w["val"]).balanced_error
        deltas = (lambda rho: [0.0]) if tau == 1.0 else (lambda rho: rho * M_GRID)
        optimum = float(best_at_coverage(sample_cells(eta["val"], y["val"], w["val"]), c2g, [tau], "balanced", RHOS,
                                         deltas)[0])
    finally:
        torch.set_num_threads(threads)
    assert fitted <= optimum + 5e-4, (tau, fitted, optimum)
