"""The direct search of the rule family (`argse.selective.search`): its coordinates keep a rule's
decisions, it only ever moves to a rule its criterion prefers, the smoothed criterion is the average
over each rule's neighbours and prefers a wide basin to a narrow dip, and it works for more than two
groups."""

import math

import pytest
import torch

from argse.selective import FitOptions, PluginRule, fit_at_coverage, fit_balanced, selective_errors
from argse.selective.search import SMOOTH_M, SMOOTH_U, SPAN_U, coordinates, rule_of, search, smoothed
from test_selective_fit import l2r_risk, one_thread, sample  # noqa: F401 (fixtures)


def top_share(margin: torch.Tensor, tau: float) -> torch.Tensor:
    """Accept the ceil(tau * N) largest margins (no ties in these draws)."""
    n = math.ceil(tau * margin.shape[0])
    return margin >= margin.sort(descending=True).values[n - 1]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_coordinates_keep_every_decision_at_a_coverage(k):
    # A rule and the rule of its coordinates (coef_0 = 1, mu_0 = 0) predict the same class for every
    # sample and rank the samples alike, so at a coverage they accept the same ones.
    g = torch.Generator().manual_seed(k)
    eta = torch.softmax(torch.randn(500, 3 * k, generator=g, dtype=torch.float64) * 2, dim=1)
    c2g = torch.arange(3 * k) % k
    coef = torch.rand(k, generator=g, dtype=torch.float64) * 5 + 0.1
    mu = torch.randn(k, generator=g, dtype=torch.float64)
    beta = torch.full((k,), 1.0 / k, dtype=torch.float64)
    original = PluginRule(alpha=k * beta / coef, mu=mu, beta=beta, cost=0.0, class_to_group=c2g).predict(eta)
    coef2, mu2 = rule_of(coordinates(coef, mu), k)
    assert float(coef2[0]) == 1.0 and float(mu2[0]) == 0.0
    normalised = PluginRule(alpha=k * beta / coef2, mu=mu2, beta=beta, cost=0.0, class_to_group=c2g).predict(eta)
    assert torch.equal(original.pred, normalised.pred)
    assert torch.allclose(normalised.margin, (original.margin - mu[0]) / coef[0], atol=1e-12)
    for tau in (1.0, 0.7, 0.3):
        assert torch.equal(top_share(original.margin, tau), top_share(normalised.margin, tau))


def test_the_search_finds_the_bottom_of_a_narrow_dip_and_never_moves_uphill():
    # Two problems at once, criterion written out: a wide bowl with a narrow dip (1% of the span wide)
    # that a coarse grid alone misses, and a flat criterion from which nothing may move.
    target = torch.tensor([[0.9, -0.35]], dtype=torch.float64)

    def score(theta, owner):
        bowl = ((theta - target) ** 2).sum(dim=1)
        dip = torch.where(((theta - target).abs() < 0.02).all(dim=1), -1.0, 0.0)
        return torch.where(owner == 0, bowl + dip, torch.zeros_like(bowl))

    start = torch.tensor([[0.0, 0.0], [0.3, 0.2]], dtype=torch.float64)
    theta, value = search(score, start, torch.tensor([SPAN_U, 1.0], dtype=torch.float64))
    assert (theta[0] - target[0]).abs().max() < 0.02 and float(value[0]) < -0.99
    assert torch.equal(theta[1], start[1]) and float(value[1]) == 0.0


@pytest.mark.parametrize("k, dims", [(2, 2), (2, 3), (3, 4), (3, 5)])
def test_the_smoothed_criterion_is_the_mean_over_the_rule_and_its_neighbours(k, dims):
    # Written out for one rule: the rule, then each u_k and each m_k one width up and one width down;
    # a cost fit's threshold (the coordinate after u and m) is not moved. With `scale`, each problem's
    # widths are scaled by its entry (0: the criterion itself).
    g = torch.Generator().manual_seed(dims)
    weights = torch.rand(dims, generator=g, dtype=torch.float64)

    def score(theta, owner):
        return (torch.sin(3 * theta) * weights).sum(dim=1) + owner.to(torch.float64)

    theta = torch.randn(3, dims, generator=g, dtype=torch.float64)
    owner = torch.tensor([0, 1, 1])
    widths = [SMOOTH_U] * (k - 1) + [SMOOTH_M] * (k - 1)
    for scale in (None, torch.tensor([0.0, 2.0])):
        expected = []
        for row, problem in zip(theta, owner.tolist()):
            factor = 1.0 if scale is None else float(scale[problem])
            points = [row.clone()]
            for i, width in enumerate(widths):
                for sign in (1.0, -1.0):
                    moved = row.clone()
                    moved[i] += sign * width * factor
                    points.append(moved)
            values = [float(score(p[None], torch.tensor([problem]))[0]) for p in points]
            expected.append(sum(values) / len(values))
        got = smoothed(score, k, dims, scale)(theta, owner)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12), (scale, got, expected)


def test_the_smoothed_search_prefers_a_wide_basin_to_a_deeper_narrow_dip():
    # A bowl around A and, away from it, a dip deeper than the bowl's bottom but narrower than the
    # neighbourhood: the plain search ends in the dip (the criterion's minimum), the smoothed one at A.
    a = torch.tensor([0.8, -0.3], dtype=torch.float64)
    b = torch.tensor([-0.9, 0.4], dtype=torch.float64)

    half_width = torch.tensor([SMOOTH_U, SMOOTH_M], dtype=torch.float64) / 4

    def score(theta, owner):
        bowl = 0.1 * ((theta - a) ** 2).sum(dim=1)
        dip = torch.where(((theta - b).abs() < half_width).all(dim=1), -1.0, 0.0)
        return bowl + dip

    start = b[None] + torch.tensor([[0.05, 0.002]], dtype=torch.float64)
    span = torch.tensor([SPAN_U, 1.0], dtype=torch.float64)
    plain, _ = search(score, start, span)
    smooth, _ = search(smoothed(score, 2, 2), start, span)
    assert bool(((plain[0] - b).abs() < half_width).all()), plain  # in the dip (at its edge nearest A)
    assert (smooth[0] - a).abs().max() < 0.05, smooth


def test_with_three_groups_the_smoothed_fits_return_three_group_rules():
    eta, y, c2g = sample(6000, 34, k3=True)
    rules = fit_at_coverage(eta[:3000], y[:3000], eta[3000:], y[3000:], c2g, [1.0, 0.8, 0.5], search="smoothed")
    assert all(rule.alpha.shape == (3,) and rule.mu.shape == (3,) for rule in rules)
    for tau, rule in zip([1.0, 0.8, 0.5], rules):
        accepted = float(rule.predict(eta[3000:]).accept.double().mean())
        assert abs(accepted - tau) < 0.01, (tau, accepted)
    rule = fit_balanced(eta[:3000], y[:3000], eta[3000:], y[3000:], c2g, 0.2, search="smoothed")
    assert rule.alpha.shape == (3,) and bool(torch.isfinite(rule.mu).all())


def test_with_three_groups_the_coverage_fit_judged_as_measured_is_never_worse_on_the_selection_split():
    # K = 3: the searched rule's balanced error on the selection split (errors judged as measured, so
    # the criterion is what selective_errors measures) is at most the fixed point's at every coverage,
    # and lower at full coverage, where the fixed point offers one reweighting only.
    eta, y, c2g = sample(6000, 31, k3=True)
    taus = [1.0, 0.9, 0.7, 0.5]
    fits = {search: fit_at_coverage(eta[:3000], y[:3000], eta[3000:], y[3000:], c2g, taus, evidence=None,
                                    search=search) for search in ("none", "selection")}
    errors = {search: [selective_errors(r.predict(eta[3000:]).pred, r.predict(eta[3000:]).accept, y[3000:], c2g)
                       .balanced_error for r in rules] for search, rules in fits.items()}
    assert all(a <= b + 1e-12 for a, b in zip(errors["selection"], errors["none"])), errors
    assert errors["selection"][0] < errors["none"][0] - 1e-3, errors
    assert all(rule.alpha.shape == (3,) for rule in fits["selection"])


def test_with_three_groups_the_pooled_fit_at_full_coverage_is_never_worse_on_both_splits():
    # Judged on both splits (the default), at coverage 1: the balanced error of all 6,000 samples.
    eta, y, c2g = sample(6000, 33, k3=True)
    errors = {}
    for selection in ("none", "pooled"):
        rule = fit_at_coverage(eta[:3000], y[:3000], eta[3000:], y[3000:], c2g, 1.0, evidence=None,
                               search=selection)[0]
        out = rule.predict(eta)
        errors[selection] = selective_errors(out.pred, out.accept, y, c2g).balanced_error
    assert errors["pooled"] < errors["none"] - 1e-3, errors


def test_with_three_groups_the_cost_fit_is_never_worse_on_the_selection_split():
    eta, y, c2g = sample(6000, 32, k3=True)
    risks = {}
    for selection in ("none", "selection"):
        rule = fit_balanced(eta[:3000], y[:3000], eta[3000:], y[3000:], c2g, 0.2, evidence=None, search=selection)
        risks[selection], _ = l2r_risk(rule, (eta[3000:], y[3000:], None), c2g, "balanced")
    assert risks["selection"] <= risks["none"] + 1e-12, risks


@pytest.mark.parametrize("bad", ["sideways", "", None])
def test_an_unknown_search_is_one_sentence(bad):
    with pytest.raises(ValueError, match="search must be one of"):
        FitOptions(search=bad)
