"""Metrics of argse.selective: hand-computed values, a brute-force check of the risk-coverage curve,
weights (unit weights, integer weights against duplicated samples), and the input checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from argse.selective import aurc, chow, ece, risk_coverage, selective_errors
from argse.selective.metrics import error_bound

C2G = [0, 0, 1, 1]  # four classes, two groups
Y = [0, 1, 2, 3, 0, 2]
PRED = [0, 0, 2, 2, 1, 2]
ACCEPT = [True, True, True, False, False, True]


# ------------------------------------------------------------------------------ selective_errors
def test_selective_errors_by_hand():
    # Group 0 (labels 0, 1): samples 0, 1, 4; accepted 0 (right) and 1 (wrong). Group 1: samples 2, 3, 5;
    # accepted 2 and 5, both right.
    out = selective_errors(PRED, ACCEPT, Y, C2G)
    assert out.coverage == pytest.approx(4 / 6)
    assert out.group_coverage.tolist() == pytest.approx([2 / 3, 2 / 3])
    assert out.group_error.tolist() == pytest.approx([0.5, 0.0])
    assert out.balanced_error == pytest.approx(0.25)
    assert out.worst_error == pytest.approx(0.5)
    assert out.overall_error == pytest.approx(0.25)


def test_selective_errors_weighted_by_hand():
    out = selective_errors(PRED, ACCEPT, Y, C2G, weights=[1, 3, 1, 1, 1, 1])
    # Group 0: accepted mass 1 + 3, wrong 3; total group mass 5. Overall: 6 accepted of 8, 3 wrong.
    assert out.group_error.tolist() == pytest.approx([0.75, 0.0])
    assert out.group_coverage.tolist() == pytest.approx([0.8, 2 / 3])
    assert out.coverage == pytest.approx(0.75)
    assert out.overall_error == pytest.approx(0.5)
    assert out.balanced_error == pytest.approx(0.375)


def test_group_without_accepted_mass_has_error_one():
    accept = [True, True, False, False, False, False]
    out = selective_errors(PRED, accept, Y, C2G)
    assert out.group_error.tolist() == pytest.approx([0.5, 1.0])
    assert out.group_coverage[1].item() == 0.0
    assert out.worst_error == 1.0
    nothing = selective_errors(PRED, [False] * 6, Y, C2G)
    assert nothing.coverage == 0.0 and nothing.overall_error == 1.0 and nothing.balanced_error == 1.0


def test_selective_errors_integer_weights_equal_duplicated_samples():
    weights = [2, 1, 3, 1, 1, 2]
    rep = np.repeat(np.arange(6), weights)
    a = selective_errors(PRED, ACCEPT, Y, C2G, weights=weights)
    b = selective_errors(np.array(PRED)[rep], np.array(ACCEPT)[rep], np.array(Y)[rep], C2G)
    assert a.coverage == pytest.approx(b.coverage)
    assert torch.allclose(a.group_error, b.group_error) and torch.allclose(a.group_coverage, b.group_coverage)
    assert a.overall_error == pytest.approx(b.overall_error)


def test_selective_errors_unit_weights_equal_unweighted():
    a, b = selective_errors(PRED, ACCEPT, Y, C2G, weights=np.ones(6)), selective_errors(PRED, ACCEPT, Y, C2G)
    assert torch.equal(a.group_error, b.group_error) and a.coverage == b.coverage


# --------------------------------------------------------------------------------- risk_coverage
def test_risk_coverage_by_hand():
    # In decreasing confidence: (y=0, right), (y=1, wrong), (y=0, right), (y=1, right); given shuffled.
    order = [2, 0, 3, 1]
    conf = np.array([0.9, 0.8, 0.7, 0.6])[order]
    y = np.array([0, 1, 0, 1])[order]
    pred = np.array([0, 0, 0, 1])[order]
    curve = risk_coverage(conf, pred, y, [0, 1])
    assert curve.coverage.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert curve.balanced.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.25])  # group 1 absent at n=1 -> 1.0
    assert curve.worst.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert curve.standard.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.25])
    assert curve.confidence.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert curve.group_error.shape == (4, 2)


def test_risk_coverage_ties_are_accepted_in_equal_proportion():
    # The last two samples tie: at n = 2 each counts half. Sample 1: group 0, wrong; sample 2: group 1, right.
    conf, y, pred = [0.9, 0.5, 0.5], [0, 0, 1], [0, 1, 1]
    curve = risk_coverage(conf, pred, y, [0, 1])
    assert curve.coverage.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert curve.group_error[1].tolist() == pytest.approx([1 / 3, 0.0])  # group 0: 0.5 wrong of 1.5
    assert curve.balanced.tolist() == pytest.approx([0.5, 1 / 6, 0.25])
    assert curve.standard.tolist() == pytest.approx([0.0, 0.25, 1 / 3])
    swapped = risk_coverage([0.5, 0.9, 0.5], [1, 0, 1], [1, 0, 0], [0, 1])
    assert torch.allclose(swapped.balanced, curve.balanced) and torch.allclose(swapped.worst, curve.worst)


def brute_force_curve(conf, pred, y, c2g, w):
    """For each n: samples strictly above the n-th confidence fully, ties at it fractionally."""
    n_groups = int(max(c2g)) + 1
    group = np.array(c2g)[y]
    wrong = pred != y
    ranked = np.sort(conf)[::-1]
    rows = []
    for n in range(1, len(conf) + 1):
        v = ranked[n - 1]
        above, tied = conf > v, conf == v
        share = np.where(above, 1.0, np.where(tied, (n - above.sum()) / tied.sum(), 0.0)) * w
        accepted = np.array([share[group == k].sum() for k in range(n_groups)])
        errs = np.array([share[(group == k) & wrong].sum() for k in range(n_groups)])
        e = np.array([errs[k] / accepted[k] if accepted[k] > 0 else 1.0 for k in range(n_groups)])
        total = accepted.sum()
        rows.append((total / w.sum(), e.mean(), e.max(), errs.sum() / total if total > 0 else 1.0))
    return np.array(rows)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_risk_coverage_equals_brute_force(data):
    n = data.draw(st.integers(1, 25))
    c2g = data.draw(st.sampled_from([[0, 0, 1, 1], [0, 1, 2, 1, 0], [1, 0]]))
    n_classes = len(c2g)
    conf = np.array(data.draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), min_size=n, max_size=n)))
    y = np.array(data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    pred = np.array(data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    w = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=float)
    if w.sum() == 0:
        w[0] = 1.0
    curve = risk_coverage(conf, pred, y, c2g, weights=w)
    expected = brute_force_curve(conf, pred, y, c2g, w)
    got = np.stack([curve.coverage, curve.balanced, curve.worst, curve.standard], axis=1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_risk_coverage_integer_weights_equal_duplicated_samples():
    rng = np.random.default_rng(0)
    conf, y, pred = rng.random(40), rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    w = rng.integers(1, 4, 40)
    weighted = risk_coverage(conf, pred, y, C2G, weights=w)
    rep = np.repeat(np.arange(40), w)
    duplicated = risk_coverage(conf[rep], pred[rep], y[rep], C2G)
    at = np.cumsum(w[np.argsort(-conf, kind="stable")]) - 1  # where each weighted point ends
    for name in ("coverage", "balanced", "worst", "standard"):
        np.testing.assert_allclose(getattr(weighted, name), getattr(duplicated, name)[at], atol=1e-12)


def test_risk_coverage_unit_weights_equal_unweighted():
    rng = np.random.default_rng(1)
    conf, y, pred = rng.random(30), rng.integers(0, 4, 30), rng.integers(0, 4, 30)
    a, b = risk_coverage(conf, pred, y, C2G, weights=np.ones(30)), risk_coverage(conf, pred, y, C2G)
    for name in ("coverage", "balanced", "worst", "standard"):
        assert torch.equal(getattr(a, name), getattr(b, name))


# ------------------------------------------------------------------------------------------ aurc
def test_aurc_by_hand():
    curve = SimpleNamespace(coverage=[0.5, 0.25, 1.0], balanced=[0.2, 0.1, 0.4])
    # flat 0.1 on [0, 0.25], then trapezoids: 0.025 + 0.25 * 0.15 + 0.5 * 0.3
    assert aurc(curve) == pytest.approx(0.2125)
    # from 0.4: risk there is 0.16, so 0.1 * (0.16 + 0.2) / 2 + 0.15
    assert aurc(curve, min_coverage=0.4) == pytest.approx(0.168)


def test_aurc_of_a_risk_coverage_curve():
    conf, y, pred = [0.9, 0.8, 0.7, 0.6], [0, 1, 0, 1], [0, 0, 0, 1]
    curve = risk_coverage(conf, pred, y, [0, 1])
    # balanced [0.5, 0.5, 0.5, 0.25] at coverage [0.25, 0.5, 0.75, 1]
    assert aurc(curve, "balanced") == pytest.approx(0.375 + 0.25 * 0.375)
    assert aurc(curve, "balanced", min_coverage=0.6) == pytest.approx(0.15 * 0.5 + 0.25 * 0.375)
    assert aurc(curve, "worst") == pytest.approx(0.75 + 0.25 * 0.75)
    assert aurc(curve, "standard") < aurc(curve, "worst")


def test_aurc_rejects_unknown_risks_and_ranges():
    curve = SimpleNamespace(coverage=[0.5, 1.0], balanced=[0.1, 0.2])
    with pytest.raises(ValueError, match="risk"):
        aurc(curve, "worst")
    with pytest.raises(ValueError, match="min_coverage"):
        aurc(curve, min_coverage=1.0)


# ---------------------------------------------------------------------------------- chow and ece
def test_chow_predicts_the_argmax_with_its_probability():
    pred, conf = chow(np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]))
    assert pred.tolist() == [1, 0]
    assert conf.tolist() == pytest.approx([0.5, 0.6])


ECE_PROBS = np.array([[0.9, 0.1, 0.0], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.55, 0.3, 0.15]])
ECE_Y = np.array([0, 1, 0, 2])


def test_ece_by_hand():
    # Bins of width 0.2: (0.8, 1] holds 0.9 right and 0.9 wrong: |1 - 1.8| / 4. (0.4, 0.6] holds
    # 0.5 right and 0.55 wrong: |1 - 1.05| / 4.
    assert ece(ECE_PROBS, ECE_Y, n_bins=5) == pytest.approx(0.2 + 0.0125)
    confident = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert ece(confident, [0, 1]) == 0.0


def test_ece_bins_are_closed_on_the_right():
    # Two bins, (0, 0.5] and (0.5, 1]: 0.5 wrong sits alone in the first, 0.75 right in the second,
    # so ECE = (0.5 + 0.25) / 2. With [lo, hi) bins both would share a bin: |1 - 1.25| / 2.
    probs = np.array([[0.5, 0.25, 0.25], [0.75, 0.25, 0.0]])
    assert ece(probs, [1, 0], n_bins=2) == pytest.approx(0.375)


def test_ece_weights():
    w = np.array([2, 1, 1, 3])
    rep = np.repeat(np.arange(4), w)
    assert ece(ECE_PROBS, ECE_Y, weights=w) == pytest.approx(ece(ECE_PROBS[rep], ECE_Y[rep]))
    assert ece(ECE_PROBS, ECE_Y, weights=np.ones(4)) == ece(ECE_PROBS, ECE_Y)


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: selective_errors(PRED[:5], ACCEPT, Y, C2G), "pred"),
        (lambda: selective_errors(PRED, ACCEPT, [0, 1, 2, 3, 0, 4], C2G), "y"),
        (lambda: selective_errors(PRED, [0, 1, 2, 1, 0, 1], Y, C2G), "accept"),
        (lambda: selective_errors(PRED, ACCEPT, Y, C2G, weights=[1, 1, 1, -1, 1, 1]), "weights"),
        (lambda: selective_errors(PRED, ACCEPT, Y, [0, 0, 2, 2]), "class_to_group"),
        (lambda: risk_coverage(np.ones((6, 1)), PRED, Y, C2G), "confidence"),
        (lambda: risk_coverage([np.nan] * 6, PRED, Y, C2G), "confidence"),
        (lambda: risk_coverage(np.ones(6), PRED, [0.5] * 6, C2G), "y"),
        (lambda: chow(np.array([[0.7, 0.7]])), "probs"),
        (lambda: ece(ECE_PROBS, ECE_Y, n_bins=0), "n_bins"),
        (lambda: ece(ECE_PROBS, ECE_Y[:3]), "y"),
    ],
)
def test_bad_inputs_raise_a_sentence_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# ------------------------------------------------------------------------------- error bound
Z95 = 1.6448536269514722  # the one-sided 95% normal quantile


def bound(errors, accepted, weights=None):
    """error_bound of one group from per-sample weights (all ones by default)."""
    w = torch.ones(accepted, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    wrong = torch.zeros_like(w)
    wrong[:errors] = 1.0
    return float(error_bound(w.sum(), (w * wrong).sum(), (w * w).sum()))


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000])
def test_error_bound_of_an_error_free_group_is_z2_over_n_plus_z2(n):
    # With no error, Wilson's upper end has the closed form z^2 / (n + z^2): one image 0.73, ten 0.21.
    assert bound(0, n) == pytest.approx(Z95 ** 2 / (n + Z95 ** 2), rel=1e-12)


@pytest.mark.parametrize("errors, n", [(1, 10), (3, 40), (50, 200), (999, 1000)])
def test_error_bound_is_the_upper_root_of_wilsons_equation(errors, n):
    # The upper end u of Wilson's interval solves (u - p)^2 = z^2 u (1 - u) / n with u > p.
    p, u = errors / n, bound(errors, n)
    assert u > p
    assert (u - p) ** 2 == pytest.approx(Z95 ** 2 * u * (1 - u) / n, rel=1e-9)


def test_error_bound_of_an_empty_group_is_one_and_falls_to_the_error_as_evidence_grows():
    assert float(error_bound(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))) == 1.0
    bounds = [bound(n // 10, n) for n in (10, 100, 1000, 100000)]
    assert all(a > b for a, b in zip(bounds, bounds[1:])) and bounds[-1] == pytest.approx(0.1, abs=0.002)


def test_error_bound_counts_weighted_samples_by_their_effective_number():
    # One sample of weight 3 is one sample's evidence, not three; scaling every weight changes nothing;
    # unequal weights count as (sum w)^2 / sum w^2 samples.
    assert bound(0, 1, [3.0]) == pytest.approx(bound(0, 1))
    assert bound(0, 3) < bound(0, 1, [3.0])
    assert bound(1, 4, [2.0] * 4) == pytest.approx(bound(1, 4))
    unequal = [4.0, 1.0, 1.0, 1.0, 1.0]
    n_eff = sum(unequal) ** 2 / sum(w * w for w in unequal)  # 3.2
    assert bound(0, 5, unequal) == pytest.approx(Z95 ** 2 / (n_eff + Z95 ** 2), rel=1e-12)
