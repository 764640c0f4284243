"""Fitting the plug-in rejector: against an exhaustive search and Chow's rule on a problem with known
posteriors, the worst-group rounds, weights, and the input checks.

The synthetic problem is a population, not a sample: ten classes with 2-D Gaussian class-conditional
densities (means on a circle), a long-tailed prior (imbalance 100, an exponential profile), head =
classes 0-3 and tail = classes 4-9. The plane is cut into a grid of cells; each (cell, class) pair is a
row with the true posterior of the cell and weight p(cell, class). Weighted risks on these rows are the
population risks (up to the grid), so the fit and the exhaustive search are compared without sampling
noise; fitted on the population itself, the fit judges errors as measured (`evidence=None`: there is
no sampling noise to allow for). Fitted on samples drawn from it, with the default judgement (each
group error by its upper confidence bound), the rule must still come close to the population optimum.
"""

import math

import numpy as np
import pytest
import torch

import argse.selective as sel
from argse.selective import chow, fit_balanced, fit_group_thresholds, fit_worst, risk_coverage
from argse.selective import selective_errors
from argse.testing.oracle import best_at_cost


def population(tail_sigma: float, n_side: int = 40, radius: float = 4.0):
    """Rows (eta [R, C], y [R], w [R]), class_to_group [C], and the cells (eta [G, C], joint mass [G, C])."""
    c = torch.arange(10, dtype=torch.float64)
    prior = 100.0 ** (-c / 9)
    prior = prior / prior.sum()
    angle = 2 * math.pi * c / 10
    means = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    sigma = torch.where(c < 4, 1.0, tail_sigma).to(torch.float64)
    edge = radius + 4 * float(sigma.max())
    grid = torch.linspace(-edge, edge, n_side, dtype=torch.float64)
    cells = torch.cartesian_prod(grid, grid)
    d2 = ((cells[:, None, :] - means[None]) ** 2).sum(dim=-1)
    joint = prior[None] * torch.exp(-d2 / (2 * sigma[None] ** 2)) / sigma[None] ** 2
    joint = joint / joint.sum()
    eta = joint / joint.sum(dim=1, keepdim=True)
    cell, y = (joint > 1e-9).nonzero(as_tuple=True)
    w = joint[cell, y]
    return (eta[cell], y, w / w.sum()), (c >= 4).long(), (eta, joint)


@pytest.fixture(autouse=True)
def one_thread():
    """The fits run many small kernels; on a shared 2-core machine two OpenMP threads wait on each
    other and made these tests five times slower, so they run on one (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def easy():
    return population(tail_sigma=1.0)


@pytest.fixture(scope="module")
def hard_tail():
    return population(tail_sigma=2.5)


def l2r_risk(rule, rows, c2g, kind):
    eta, y, w = rows
    out = rule.predict(eta)
    errors = selective_errors(out.pred, out.accept, y, c2g, weights=w)
    base = errors.balanced_error if kind == "balanced" else errors.worst_error
    return base + rule.cost * (1.0 - errors.coverage), errors


#: The exhaustive search's grids (argse.testing.oracle): rho = coef_1 / coef_0 on a log grid, delta =
#: (mu_1 - mu_0) / coef_0 on [-1, rho], where the optimum's delta = rho * e_1 - e_0 lies.
RHOS = np.geomspace(0.3, 300.0, 40)


def exhaustive_search(cells, c2g, cost, kind):
    """Lowest L2R risk over the whole K = 2 family (argse.testing.oracle), the threshold searched exactly."""
    return best_at_cost(cells, c2g, cost, kind, RHOS, lambda rho: np.linspace(-1.0, rho, 40))


def best_chow(rows, c2g, cost, kind):
    """Chow's rule with its best threshold (an oracle choice, in its favour)."""
    eta, y, w = rows
    pred, confidence = chow(eta)
    curve = risk_coverage(confidence, pred, y, c2g, weights=w)
    risk = (curve.balanced if kind == "balanced" else curve.worst) + cost * (1 - curve.coverage)
    return float(risk.min())


def fit_on_population(fit, rows, c2g, cost, **options):
    """The fit with the population rows as both splits: errors judged as measured (no sampling noise)."""
    eta, y, w = rows
    return fit(eta, y, eta, y, c2g, cost, weights_fit=w, weights_sel=w, evidence=None, **options)


def draw_from(cells, n, seed):
    """n samples (eta [n, C], y [n]) drawn from the population's cells: a cell and a class by p(cell, class)."""
    eta, joint = cells
    index = torch.multinomial(joint.flatten(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return eta[index // joint.shape[1]], index % joint.shape[1]


@pytest.mark.parametrize("fit, kind, tolerance", [(fit_balanced, "balanced", 0.01), (fit_worst, "worst", 0.015)])
def test_a_fit_on_samples_judged_by_the_bound_comes_close_to_the_population_optimum(easy, fit, kind, tolerance):
    # The default fit (each error judged by its upper bound) on 4,000 + 4,000 samples: its population
    # risk against the exhaustive optimum of the population.
    rows, c2g, cells = easy
    eta_fit, y_fit = draw_from(cells, 4000, 0)
    eta_sel, y_sel = draw_from(cells, 4000, 1)
    rule = fit(eta_fit, y_fit, eta_sel, y_sel, c2g, 0.3)
    risk, _ = l2r_risk(rule, rows, c2g, kind)
    assert risk <= exhaustive_search(cells, c2g, 0.3, kind) + tolerance


# -------------------------------------------------------------------------- against the optimum
@pytest.mark.parametrize("cost", [0.2, 0.3])
def test_fit_balanced_reaches_the_exhaustive_optimum_and_beats_chow(easy, cost):
    rows, c2g, cells = easy
    risk, _ = l2r_risk(fit_on_population(fit_balanced, rows, c2g, cost), rows, c2g, "balanced")
    optimum = exhaustive_search(cells, c2g, cost, "balanced")
    assert risk <= optimum + 2e-3
    assert risk <= best_chow(rows, c2g, cost, "balanced") - 0.03


@pytest.mark.parametrize("cost", [0.2, 0.3])
def test_fit_worst_reaches_the_exhaustive_optimum_and_beats_chow(easy, cost):
    rows, c2g, cells = easy
    risk, _ = l2r_risk(fit_on_population(fit_worst, rows, c2g, cost), rows, c2g, "worst")
    optimum = exhaustive_search(cells, c2g, cost, "worst")
    assert risk <= optimum + 2e-3
    assert risk <= best_chow(rows, c2g, cost, "worst") - 0.05


def test_fit_worst_lowers_the_worst_group_error_when_the_tail_is_hard(hard_tail):
    rows, c2g, cells = hard_tail
    balanced_rule = fit_on_population(fit_balanced, rows, c2g, 0.3)
    worst_rule = fit_on_population(fit_worst, rows, c2g, 0.3)
    balanced_risk, balanced_errors = l2r_risk(balanced_rule, rows, c2g, "worst")
    worst_risk, worst_errors = l2r_risk(worst_rule, rows, c2g, "worst")
    assert balanced_errors.group_error[1] > balanced_errors.group_error[0] + 0.05  # the tail is the hard group
    assert worst_errors.worst_error <= balanced_errors.worst_error - 0.01
    assert worst_risk <= balanced_risk - 0.03
    assert worst_risk <= exhaustive_search(cells, c2g, 0.3, "worst") + 2e-3


# ------------------------------------------------------------------------------ worst-group rounds
def test_fit_worst_history_records_the_exponentiated_gradient(easy):
    # On the population, errors are judged as measured: the history's errors are the ones beta moved by.
    rows, c2g, _ = easy
    rule = fit_on_population(fit_worst, rows, c2g, 0.3, rounds=6, step=3.0)
    h = rule.history
    assert h.rounds == 6 and h.beta.shape == (6, 2) and h.group_error.shape == (6, 2)
    assert h.beta[0].tolist() == [0.5, 0.5]
    expected = h.beta[:-1] * torch.exp(3.0 * h.group_error[:-1])
    assert torch.allclose(h.beta[1:], expected / expected.sum(dim=1, keepdim=True))
    assert torch.allclose(h.worst_risk, h.group_error.max(dim=1).values + 0.3 * (1 - h.coverage))
    assert h.best_round == int(h.worst_risk.argmin())
    assert torch.equal(rule.beta, h.beta[h.best_round])
    risk, errors = l2r_risk(rule, rows, c2g, "worst")  # the selection split is the population here
    assert risk == pytest.approx(float(h.worst_risk[h.best_round]), abs=1e-9)
    assert errors.group_error.tolist() == pytest.approx(h.group_error[h.best_round].tolist(), abs=1e-9)
    assert [r["round"] for r in h.rows()] == list(range(6))
    back = sel.PluginRule.from_dict(rule.to_dict())
    assert torch.equal(back.history.beta, h.beta) and back.history.best_round == h.best_round


def test_fit_balanced_with_beta_weights_the_groups(easy):
    rows, c2g, _ = easy
    tail_heavy = fit_on_population(fit_balanced, rows, c2g, 0.3, beta=[0.2, 0.8])
    head_heavy = fit_on_population(fit_balanced, rows, c2g, 0.3, beta=[0.8, 0.2])
    _, tail_errors = l2r_risk(tail_heavy, rows, c2g, "balanced")
    _, head_errors = l2r_risk(head_heavy, rows, c2g, "balanced")
    assert tail_heavy.beta.tolist() == pytest.approx([0.2, 0.8])
    assert tail_errors.group_error[1] < head_errors.group_error[1]
    assert head_errors.group_error[0] < tail_errors.group_error[0]


# ------------------------------------------------------------------------------------- weights
def sample(n, seed, k3=False):
    """A sampled problem: labels from the long-tailed prior, features 2-D Gaussian."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(10, dtype=torch.float64)
    prior = 100.0 ** (-c / 9)
    prior = prior / prior.sum()
    angle = 2 * math.pi * c / 10
    means = torch.stack([4 * torch.cos(angle), 4 * torch.sin(angle)], dim=1)
    y = torch.multinomial(prior, n, replacement=True, generator=g)
    x = means[y] + torch.randn(n, 2, generator=g, dtype=torch.float64)
    logp = prior.log()[None] - ((x[:, None, :] - means[None]) ** 2).sum(-1) / 2
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2]) if k3 else (c >= 4).long()
    return torch.softmax(logp, dim=1), y, groups


def test_unit_weights_give_the_unweighted_fit():
    eta, y, c2g = sample(3000, 1)
    a = fit_balanced(eta[:1500], y[:1500], eta[1500:], y[1500:], c2g, 0.2)
    b = fit_balanced(eta[:1500], y[:1500], eta[1500:], y[1500:], c2g, 0.2,
                     weights_fit=np.ones(1500), weights_sel=np.full(1500, 3.0))
    assert torch.allclose(a.alpha, b.alpha, rtol=1e-12) and torch.allclose(a.mu, b.mu, rtol=1e-12)


def test_integer_weights_equal_duplicated_samples_when_errors_are_judged_as_measured():
    # (With the default judgement they differ, as they should: a weight of 3 is not three samples'
    # evidence; see test_selective_metrics.py::test_error_bound_counts_weighted_samples_by_their_effective_number.)
    eta, y, c2g = sample(2000, 2)
    w = torch.randint(1, 4, (2000,), generator=torch.Generator().manual_seed(0))
    rep = torch.repeat_interleave(torch.arange(2000), w)
    first, second = rep[rep < 1000], rep[rep >= 1000]
    a = fit_balanced(eta[:1000], y[:1000], eta[1000:], y[1000:], c2g, 0.2,
                     weights_fit=w[:1000], weights_sel=w[1000:], evidence=None)
    b = fit_balanced(eta[first], y[first], eta[second], y[second], c2g, 0.2, evidence=None)
    assert torch.allclose(a.alpha, b.alpha, rtol=1e-9) and torch.allclose(a.mu, b.mu, rtol=1e-6, atol=1e-9)
    test_eta = sample(2000, 3)[0]
    assert torch.equal(a.predict(test_eta).accept, b.predict(test_eta).accept)


def test_numpy_inputs_give_the_same_rule_as_tensors():
    eta, y, c2g = sample(2000, 4)
    a = fit_worst(eta[:1000], y[:1000], eta[1000:], y[1000:], c2g, 0.3, rounds=3)
    b = fit_worst(eta[:1000].numpy(), y[:1000].numpy(), eta[1000:].numpy(), y[1000:].numpy(), c2g.numpy(), 0.3,
                  rounds=3)
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.mu, b.mu) and torch.equal(a.beta, b.beta)


def test_three_groups_fit_and_beat_chow():
    eta, y, c2g = sample(8000, 5, k3=True)
    eta1, y1, eta2, y2 = eta[:4000], y[:4000], eta[4000:], y[4000:]
    for fit, kind in ((fit_balanced, "balanced"), (fit_worst, "worst")):
        rule = fit(eta1, y1, eta2, y2, c2g, 0.3)
        assert rule.alpha.shape == (3,) and rule.mu.shape == (3,)
        risk, _ = l2r_risk(rule, (eta2, y2, None), c2g, kind)
        assert risk < best_chow((eta2, y2, None), c2g, 0.3, kind) - 0.02


def test_group_thresholds_on_a_fitted_rule_reach_their_targets():
    eta, y, c2g = sample(3000, 7)
    rule = fit_group_thresholds(fit_balanced(eta[:1500], y[:1500], eta[1500:], y[1500:], c2g, 0.2), eta, [0.6, 0.9])
    out = rule.predict(eta)
    for k, target in enumerate([0.6, 0.9]):
        share = out.accept[out.group == k].double().mean().item()
        assert target <= share <= target + 0.01


# ------------------------------------------------------------------------------------ validation
ETA_OK, Y_OK, C2G_OK = sample(200, 8)


@pytest.mark.parametrize(
    "changes, argument",
    [
        ({"y_fit": Y_OK[:100] + 10}, "y_fit"),
        ({"eta_sel": ETA_OK[100:, :9]}, "eta_sel"),
        ({"eta_fit": ETA_OK[:100] * 2}, "eta_fit"),
        ({"y_sel": Y_OK[100:150]}, "y_sel"),
        ({"weights_fit": -torch.ones(100)}, "weights_fit"),
        ({"weights_sel": torch.zeros(100)}, "weights_sel"),
        ({"class_to_group": torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 2, 2])}, "class_to_group"),
        ({"cost": -1.0}, "cost"),
        ({"beta": [0.3, 0.3]}, "beta"),
        ({"n_starts": 0}, "n_starts"),
    ],
)
def test_fit_balanced_rejects_bad_inputs_with_the_argument_name(changes, argument):
    args = dict(eta_fit=ETA_OK[:100], y_fit=Y_OK[:100], eta_sel=ETA_OK[100:], y_sel=Y_OK[100:],
                class_to_group=C2G_OK, cost=0.2)
    args.update(changes)
    with pytest.raises(ValueError, match=argument):
        fit_balanced(**args)


@pytest.mark.parametrize("options, argument", [({"rounds": 0}, "rounds"), ({"step": -1.0}, "step")])
def test_fit_worst_rejects_bad_options(options, argument):
    with pytest.raises(ValueError, match=argument):
        fit_worst(ETA_OK[:100], Y_OK[:100], ETA_OK[100:], Y_OK[100:], C2G_OK, 0.2, **options)


def test_fit_balanced_threshold_is_the_best_on_the_selection_split():
    # The fitted rule, read as a confidence (its margin), cannot be improved on S2 by moving the threshold.
    eta, y, c2g = sample(4000, 11)  # a sample where the best fixed-point iterate alone misses it by 0.004
    rule = fit_balanced(eta[:2000], y[:2000], eta[2000:], y[2000:], c2g, 0.25, evidence=None)
    out = rule.predict(eta[2000:])
    curve = risk_coverage(out.margin, out.pred, y[2000:], c2g)
    best_shift = float((curve.balanced + 0.25 * (1 - curve.coverage)).min())
    risk, _ = l2r_risk(rule, (eta[2000:], y[2000:], None), c2g, "balanced")
    assert risk == pytest.approx(best_shift, abs=1e-12)


def wilson_upper(errors, n, z=1.6448536269514722):
    """Wilson's upper bound, written out: (p + z^2/2n + z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = errors / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def test_fit_threshold_is_the_best_on_the_selection_split_with_each_error_judged_by_its_bound():
    # The same, with the default judgement: every cut of S2's margins scored by a hand loop that counts
    # the accepted images and errors per group and applies Wilson's bound; the fit's threshold is the best.
    eta, y, c2g = sample(1200, 12)
    rule = fit_balanced(eta[:600], y[:600], eta[600:], y[600:], c2g, 0.25)
    out = rule.predict(eta[600:])
    margin, order = out.margin.sort(descending=True)
    group, wrong = c2g[y[600:]][order].tolist(), (out.pred != y[600:])[order].tolist()
    seen, errs, scores = [0, 0], [0, 0], []
    for i in range(len(group)):  # accept the i + 1 largest margins
        seen[group[i]] += 1
        errs[group[i]] += wrong[i]
        if i + 1 < len(group) and margin[i + 1] == margin[i]:
            continue
        bound = [wilson_upper(errs[k], seen[k]) if seen[k] else 1.0 for k in (0, 1)]
        scores.append(sum(bound) / 2 + 0.25 * (1 - (i + 1) / len(group)))
    accepted = out.accept[order].tolist()
    n = sum(accepted)
    group_acc = [sum(1 for g, a in zip(group, accepted) if a and g == k) for k in (0, 1)]
    group_err = [sum(1 for g, a, e in zip(group, accepted, wrong) if a and e and g == k) for k in (0, 1)]
    chosen = sum(wilson_upper(group_err[k], group_acc[k]) if group_acc[k] else 1.0 for k in (0, 1)) / 2
    assert chosen + 0.25 * (1 - n / len(group)) == pytest.approx(min(scores), abs=1e-12)


def test_a_judge_given_as_a_function_is_what_the_choices_use():
    # evidence may be a function of the tally (bench/small_groups.py compares another judgement this
    # way): the measured errors as a function give the fit of evidence=None, bit for bit; a judge that
    # calls every group's error 1 ties every candidate, so the fit keeps its first start instead.
    eta, y, c2g = sample(3000, 41)
    fit = dict(cost=0.2, search="none")
    measured = fit_balanced(eta[:1500], y[:1500], eta[1500:], y[1500:], c2g, evidence=None, **fit)
    as_function = fit_balanced(eta[:1500], y[:1500], eta[1500:], y[1500:], c2g,
                               evidence=lambda tally: tally.errors(), **fit)
    assert measured.to_dict() == as_function.to_dict()
    blind = fit_balanced(eta[:1500], y[:1500], eta[1500:], y[1500:], c2g,
                         evidence=lambda tally: torch.ones_like(tally.accepted), **fit)
    assert blind.to_dict() != measured.to_dict()
