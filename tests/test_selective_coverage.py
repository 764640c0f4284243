"""Fitting the plug-in rejector *for* a coverage (`fit_at_coverage`), against an exhaustive search over
the whole K = 2 rule family at that coverage, on the known-posterior population of
tests/test_selective_fit.py (a population, not a sample: weighted risks are population risks)."""


import numpy as np
import pytest
import torch

from argse.selective import PluginRule, fit_at_coverage, fit_balanced, selective_errors
from argse.selective.cut import top_share_cut
from argse.selective.metrics import MIN_GROUP_ACCEPTED
from argse.testing.oracle import best_at_coverage
from test_selective_fit import easy, hard_tail, one_thread, sample  # noqa: F401 (fixtures)


def exhaustive_at_coverage(cells, c2g, tau, kind):
    """Lowest balanced (or worst-group) error over the K = 2 family among rules accepting a share of at
    least tau (argse.testing.oracle): rho = coef_1 / coef_0 on a log grid, delta = (mu_1 - mu_0) / coef_0 on
    [-2, 2 rho], the threshold at the first cut whose accepted mass reaches tau."""
    return float(best_at_coverage(cells, c2g, [tau], kind, np.geomspace(0.1, 1000.0, 60),
                                  lambda rho: np.linspace(-2.0, 2.0 * rho, 60))[0])


def errors_of(rule, rows, c2g):
    eta, y, w = rows
    out = rule.predict(eta)
    return selective_errors(out.pred, out.accept, y, c2g, weights=w)


TAUS = (0.3, 0.5, 0.7, 0.9)


def test_balanced_fit_at_coverage_is_within_001_of_the_exhaustive_optimum(easy):
    rows, c2g, cells = easy
    eta, y, w = rows
    rules = fit_at_coverage(eta, y, eta, y, c2g, TAUS, weights_fit=w, weights_sel=w, evidence=None)
    for tau, rule in zip(TAUS, rules):
        errors = errors_of(rule, rows, c2g)
        assert errors.coverage == pytest.approx(tau, abs=0.01)
        optimum = exhaustive_at_coverage(cells, c2g, tau, "balanced")
        assert errors.balanced_error <= optimum + 0.01, (tau, errors.balanced_error, optimum)


def test_worst_fit_at_coverage_is_near_the_exhaustive_optimum_on_a_hard_tail(hard_tail):
    rows, c2g, cells = hard_tail
    eta, y, w = rows
    rules = fit_at_coverage(eta, y, eta, y, c2g, TAUS, objective="worst", weights_fit=w, weights_sel=w, evidence=None)
    balanced = fit_at_coverage(eta, y, eta, y, c2g, TAUS, weights_fit=w, weights_sel=w, evidence=None)
    for tau, rule, other in zip(TAUS, rules, balanced):
        errors = errors_of(rule, rows, c2g)
        optimum = exhaustive_at_coverage(cells, c2g, tau, "worst")
        assert errors.worst_error <= optimum + 0.01, (tau, errors.worst_error, optimum)
        assert errors.worst_error <= errors_of(other, rows, c2g).worst_error + 1e-9
        assert rule.history is not None and rule.history.best_round == int(rule.history.worst_risk.argmin())


def test_threshold_of_a_coverage_fit_accepts_the_target_share_of_the_selection_split():
    eta, y, c2g = sample(4000, 3)
    w = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    taus = [1.0, 0.8, 0.55, 0.2]
    rules = fit_at_coverage(eta[:2000], y[:2000], eta[2000:], y[2000:], c2g, taus, weights_sel=w)
    for tau, rule in zip(taus, rules):
        accept = rule.predict(eta[2000:]).accept.double()
        share = float((accept * w).sum() / w.sum())
        assert tau <= share <= tau + float(w.max() / w.sum()) + 1e-12  # reaches tau, overshoots by < one sample
        assert rule.cost == 0.0


def test_fit_at_coverage_beats_a_cost_rule_shifted_to_a_far_coverage(hard_tail):
    """What the coverage fit is for: a rule fitted at a cost whose coverage is far from tau, then only
    re-thresholded to tau, is worse at tau than the rule fitted for tau."""
    rows, c2g, _ = hard_tail
    eta, y, w = rows
    far = fit_balanced(eta, y, eta, y, c2g, 0.05, weights_fit=w, weights_sel=w, evidence=None)  # high coverage
    decision = far.predict(eta)
    margin, order = decision.margin.sort(descending=True)
    cum = w[order].cumsum(0)
    cut = margin[int((cum < 0.4).sum())]
    shifted = selective_errors(decision.pred, decision.margin >= cut, y, c2g, weights=w)
    fitted = errors_of(fit_at_coverage(eta, y, eta, y, c2g, 0.4, weights_fit=w, weights_sel=w, evidence=None)[0],
                       rows, c2g)
    assert fitted.balanced_error <= shifted.balanced_error + 1e-9


@pytest.mark.parametrize("bad, message", [
    ({"coverages": []}, "coverages must be"),
    ({"coverages": [0.5, 1.2]}, "coverages must be"),
    ({"coverages": 0.0}, "coverages must be"),
    ({"coverages": 0.5, "objective": "mean"}, "objective must be"),
])
def test_bad_coverage_fit_arguments_are_one_sentence(bad, message):
    eta, y, c2g = sample(200, 1)
    kwargs = {"objective": "balanced", **bad}
    coverages = kwargs.pop("coverages")
    with pytest.raises(ValueError, match=message):
        fit_at_coverage(eta, y, eta, y, c2g, coverages, **kwargs)


def test_a_rule_that_starves_a_group_gets_per_group_thresholds_that_accept_a_share_of_each():
    # A head-favouring rule (the tail's coefficient 0.2 of the head's, mu_tail = -2, which lowers the
    # margin of every sample with tail mass) at coverage 0.5 accepts 3 tail samples of the selection split; the floor gives each predicted group its own threshold, accepting
    # its top half there, and that rule is kept because the tail then has evidence.
    from argse.selective.coverage import group_floor
    from argse.selective.problem import prepare_problem

    eta, y, c2g = sample(4000, 21)
    problem = prepare_problem(eta[:2000], y[:2000], eta[2000:], y[2000:], c2g, None, None)
    coef, mu = torch.tensor([1.0, 0.2], dtype=torch.float64), torch.tensor([0.0, -2.0], dtype=torch.float64)
    beta = torch.tensor([0.5, 0.5], dtype=torch.float64)
    rule = PluginRule(alpha=2 * beta / coef, mu=mu, beta=beta, cost=0.0, class_to_group=c2g)
    margin = rule.predict(eta[2000:]).margin
    shift = float(margin.sort(descending=True).values[999])  # accept the top half of the 2,000 samples
    single = PluginRule(alpha=rule.alpha, mu=mu - shift + 1e-12, beta=beta, cost=0.0, class_to_group=c2g)
    tail = c2g[y[2000:]] == 1
    assert int((single.predict(eta[2000:]).accept & tail).sum()) < MIN_GROUP_ACCEPTED
    thresholds = group_floor(problem, "worst", single.coef, single.mu, beta, 0.5)
    assert thresholds is not None
    out = single.with_thresholds(thresholds).predict(eta[2000:])
    for k in (0, 1):
        predicted = out.group == k
        assert 0.5 <= float(out.accept[predicted].double().mean()) <= 0.5 + 1 / int(predicted.sum()) + 1e-12
    assert int((out.accept & tail).sum()) >= MIN_GROUP_ACCEPTED


def _cut_by_hand(values, weight, level):
    """The top-share cut of one row, the slow way: walk the samples in decreasing order, adding their
    weight, and stop at the first whose running share reaches the level (less 1e-12)."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    total, taken = sum(weight), 0.0
    for i in order:
        taken += weight[i]
        if taken / total >= level - 1e-12:
            return values[i]
    return values[order[-1]]


@pytest.mark.parametrize("case", range(60))
def test_top_share_cut_is_the_value_a_walk_down_the_sorted_row_stops_at(case):
    rng = np.random.default_rng(case)
    rows, n = int(rng.integers(1, 12)), int(rng.integers(1, 4000))
    values = rng.normal(size=(rows, n))
    if case % 3 == 0:
        values = np.round(values, 1)  # long runs of ties
    if case % 5 == 0:
        values[:, : n // 2] *= 1e-7  # half the row in one narrow cluster
    if case % 11 == 0:
        values[:] = 0.25  # one value
    weight = rng.random(n) + 1e-3
    if case % 4 == 0:
        weight = rng.choice([0.02, 1.0, 7.0], size=n)  # a few class weights, as a split's
    level = rng.random(rows)
    level[0] = 1.0
    got = top_share_cut(torch.from_numpy(values), torch.from_numpy(weight), torch.from_numpy(level))
    for r in range(rows):
        assert float(got[r]) == _cut_by_hand(values[r].tolist(), weight.tolist(), float(level[r]))
