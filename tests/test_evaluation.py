"""`argse.evaluation`: the comparison table of the evaluate stage, on posteriors with a known truth.

Fixture: 10 long-tailed classes in two groups (head 0-2, tail 3-9). Each sample has true posteriors
eta; its label is drawn from eta, so eta is the Bayes posterior. Methods built on eta are compared with
degraded versions: a head-biased posterior (eta * prior, what plain cross-entropy learns on long-tailed
data) and a noisy one (Gaussian noise on log eta).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from argse.evaluation import (
    MAX_RC_POINTS,
    Comparison,
    FitOptions,
    Method,
    compare,
    metric_dict,
    metric_key,
    table_columns,
)
from argse.selective import fit_group_thresholds, fit_worst

N_CLASSES = 10
CLASS_TO_GROUP = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
GROUP_NAMES = ("head", "tail")
SIZES = {"tunev": 1000, "val": 1000, "test": 1500}
COSTS = (0.1, 0.3, 0.5)
COST = 0.3
FIT = FitOptions(rounds=4, n_starts=4, max_iter=10)


def _data(seed: int = 0):
    """True posteriors and labels drawn from them per split, the degraded posteriors, test weights."""
    g = torch.Generator().manual_seed(seed)
    prior = 0.65 ** torch.arange(N_CLASSES, dtype=torch.float64)
    prior = prior / prior.sum()
    eta, labels, head_biased, noisy = {}, {}, {}, {}
    for split, n in SIZES.items():
        signal = torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64) * 4.0
        true = torch.softmax(prior.log() + signal, dim=1)
        eta[split] = true
        labels[split] = torch.multinomial(true, 1, generator=g)[:, 0]
        biased = true * prior
        head_biased[split] = biased / biased.sum(dim=1, keepdim=True)
        noise = torch.randn(n, N_CLASSES, generator=g, dtype=torch.float64) * 2.5
        noisy[split] = torch.softmax(true.log() + noise, dim=1)
    # Test weights that make the test prior balanced (as the stage's --test-prior balanced does).
    test_weights = (1.0 / prior)[labels["test"]]
    weights = {"tunev": None, "val": None, "test": test_weights}
    return eta, head_biased, noisy, labels, weights


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.fixture(scope="module")
def methods(data):
    eta, head_biased, noisy, _, _ = data
    return [
        Method("chow[head-biased]", "chow", head_biased),
        Method("plugin-worst[noisy]", "plugin", noisy, objective="worst"),
        Method("chow[noisy]", "chow", noisy),
        Method("ar-gse[worst]", "plugin", eta, objective="worst"),
        Method("plugin-worst[head-biased]", "plugin", head_biased, objective="worst"),
    ]


@pytest.fixture(scope="module")
def comparison(methods, data) -> Comparison:
    _, _, _, labels, weights = data
    return compare(methods, labels, weights, CLASS_TO_GROUP, cost=COST, costs=COSTS, n_boot=40,
                   group_names=GROUP_NAMES, fit_options=FIT)


def _aurc_columns(table) -> list[str]:
    return [c for c in table.columns if c.startswith("aurc_")]


def test_true_posterior_method_ranks_first(comparison):
    table = comparison.table
    assert table["method"].iloc[0] == "ar-gse[worst]"
    # and the ranking is the documented one: aurc_worst ascending
    assert np.all(np.diff(table["aurc_worst"].to_numpy()) >= 0)


def test_true_posteriors_beat_their_degraded_versions_on_every_aurc(comparison):
    row = comparison.table.set_index("method")
    for column in ("aurc_balanced", "aurc_worst", "aurc_balanced_costsweep", "aurc_worst_costsweep"):
        for other in ("plugin-worst[noisy]", "plugin-worst[head-biased]"):
            assert row.loc["ar-gse[worst]", column] < row.loc[other, column], (column, other)


def test_table_has_the_documented_columns_in_order(comparison):
    assert list(comparison.table.columns) == table_columns(GROUP_NAMES, 0.2)
    assert comparison.table.columns[0] == "method"
    assert "aurc_balanced_cov0.2" in comparison.table.columns
    assert len(comparison.table) == 5
    assert not comparison.table.drop(columns="method").isna().any().any()


def test_every_aurc_lies_in_the_unit_interval(comparison):
    values = comparison.table[_aurc_columns(comparison.table)].to_numpy()
    assert values.shape[1] == 11
    assert np.all((values >= 0.0) & (values <= 1.0))
    # the restricted area covers [0.2, 1] only
    assert np.all(comparison.table["aurc_worst_cov0.2"] <= 0.8 + 1e-12)


def test_each_bootstrap_interval_contains_its_point_estimate(comparison):
    table = comparison.table
    for risk in ("balanced", "worst"):
        lo, point, hi = table[f"aurc_{risk}_lo"], table[f"aurc_{risk}"], table[f"aurc_{risk}_hi"]
        assert np.all(lo <= point) and np.all(point <= hi)
        assert np.all(hi - lo > 0)  # a real interval, not a degenerate one


def test_metric_dict_equals_the_table(comparison):
    metrics = metric_dict(comparison)
    table = comparison.table
    numeric = [c for c in table.columns if c != "method"]
    assert len(metrics) == len(table) * len(numeric)
    for _, row in table.iterrows():
        for column in numeric:
            assert metrics[metric_key(row["method"], column)] == float(row[column])
    assert metrics["ar-gse.worst/aurc_worst"] == float(table.set_index("method").loc["ar-gse[worst]", "aurc_worst"])


def test_metric_keys_are_valid_mlflow_names(comparison):
    from mlflow.utils.validation import _validate_metric_name

    for key in metric_dict(comparison):
        _validate_metric_name(key)  # raises MlflowException on an invalid name


def test_metric_key_maps_brackets_and_other_characters():
    assert metric_key("ar-gse[worst]", "aurc_worst") == "ar-gse.worst/aurc_worst"
    assert metric_key("chow[uniform-ensemble]", "aurc_balanced_cov0.2") == "chow.uniform-ensemble/aurc_balanced_cov0.2"
    assert metric_key("plugin-worst[best single expert]", "ece") == "plugin-worst.best single expert/ece"
    assert metric_key("a/b:c", "x") == "a_b_c/x"
    with pytest.raises(ValueError, match="valid MLflow metric name"):
        metric_key("..", "x")


def test_chow_operating_point_matches_the_reference_coverage_on_val(comparison):
    row = comparison.table.set_index("method")
    assert comparison.reference == "ar-gse[worst]"
    reference = row.loc["ar-gse[worst]", "coverage_val"]
    assert comparison.reference_coverage == pytest.approx(reference)
    assert 0.05 < reference < 0.999
    for chow_method in ("chow[head-biased]", "chow[noisy]"):
        assert row.loc[chow_method, "coverage_val"] == pytest.approx(reference, abs=2.0 / SIZES["val"])


def test_target_coverage_sets_the_chow_operating_point(data):
    _, head_biased, _, labels, weights = data
    result = compare([Method("chow[head-biased]", "chow", head_biased)], labels, weights, CLASS_TO_GROUP,
                     cost=COST, costs=COSTS, target_coverage=0.7, n_boot=5)
    assert result.reference == "target_coverage"
    assert result.table["coverage_val"].iloc[0] == pytest.approx(0.7, abs=2.0 / SIZES["val"])
    # groups named by index when no names are given
    assert {"coverage_0", "coverage_1"} <= set(result.table.columns)


def test_operating_point_risks_follow_from_the_errors(comparison):
    t = comparison.table
    assert np.allclose(t["balanced_l2r"], t["balanced_error"] + COST * (1 - t["coverage"]))
    assert np.allclose(t["worst_l2r"], t["worst_error"] + COST * (1 - t["coverage"]))
    assert np.all(t["worst_error"] >= t["balanced_error"])
    for _, row in t.iterrows():
        per_group = comparison.group_coverage[row["method"]]
        assert per_group.shape == (2,)
        assert np.allclose(per_group, [row["coverage_head"], row["coverage_tail"]])


def test_curves_end_at_the_full_coverage_errors(comparison):
    row = comparison.table.set_index("method")
    for name, (coverage, balanced, worst) in comparison.curves.items():
        assert coverage[-1] == pytest.approx(1.0)
        assert np.all(np.diff(coverage) >= -1e-12)
        assert balanced[-1] == pytest.approx(row.loc[name, "balanced_error_full"])
        assert worst[-1] == pytest.approx(row.loc[name, "worst_error_full"])


def test_rc_points_are_downsampled_keeping_the_endpoints(comparison):
    points = comparison.rc_points
    assert list(points.columns) == ["method", "coverage", "balanced", "worst", "standard"]
    for name, (coverage, balanced, _) in comparison.curves.items():
        mine = points[points["method"] == name]
        assert 2 <= len(mine) <= MAX_RC_POINTS
        assert mine["coverage"].iloc[0] == coverage[0] and mine["coverage"].iloc[-1] == coverage[-1]
        assert mine["balanced"].iloc[-1] == balanced[-1]


def test_to_markdown_has_a_header_and_one_line_per_method(comparison):
    text = comparison.to_markdown()
    lines = text.strip().splitlines()
    assert len(lines) == 2 + len(comparison.table)
    assert lines[0].startswith("| method | aurc_balanced |")
    assert set(lines[1]) <= set("|:-")
    n_cells = len(comparison.table.columns)
    for line, name in zip(lines[2:], comparison.table["method"]):
        assert line.startswith(f"| {name} |")
        assert line.count("|") == n_cells + 1
    short = comparison.to_markdown(columns=["aurc_worst"], digits=3).strip().splitlines()
    assert short[0] == "| method | aurc_worst |"
    assert re.fullmatch(r"\| ar-gse\[worst\] \| 0\.\d{3} \|", short[2])


def test_a_fixed_rule_is_used_as_given(data):
    eta, _, _, labels, weights = data
    rule = fit_worst(eta["tunev"], labels["tunev"], eta["val"], labels["val"], CLASS_TO_GROUP, COST, rounds=3,
                     n_starts=4, max_iter=10)
    result = compare([Method("ar-gse[worst]", "plugin", eta, objective="worst", rule=rule)], labels, weights,
                     CLASS_TO_GROUP, cost=COST, costs=(COST,), n_boot=5, fit_options=FIT)
    assert result.rules["ar-gse[worst]"] is rule
    accept = rule.predict(eta["test"]).accept.double()
    w = weights["test"]
    assert result.table["coverage"].iloc[0] == pytest.approx(float((accept * w).sum() / w.sum()))
    with pytest.raises(ValueError, match="fitted at cost"):
        compare([Method("ar-gse[worst]", "plugin", eta, objective="worst", rule=rule)], labels, weights,
                CLASS_TO_GROUP, cost=0.1, costs=COSTS, n_boot=5)


def test_a_rule_with_group_thresholds_ranks_a_rejected_group_last(data):
    eta, _, _, labels, weights = data
    rule = fit_worst(eta["tunev"], labels["tunev"], eta["val"], labels["val"], CLASS_TO_GROUP, COST, rounds=2,
                     n_starts=3, max_iter=5)
    rule = fit_group_thresholds(rule, eta["val"], [0.8, 0.0])  # the tail group gets t = +inf
    result = compare([Method("ar-gse[worst,groupwise]", "plugin", eta, objective="worst", rule=rule)], labels,
                     weights, CLASS_TO_GROUP, cost=COST, costs=(COST,), n_boot=5, group_names=GROUP_NAMES,
                     fit_options=FIT)
    row = result.table.iloc[0]
    predicted_tail = rule.predict(eta["test"]).group == 1
    assert 0.0 < row["coverage"] < 1.0
    assert row["coverage_val"] == pytest.approx(float((rule.predict(eta["val"]).accept).double().mean()))
    # every sample predicted in the rejected group sits at the end of the threshold sweep
    coverage, _, _ = result.curves["ar-gse[worst,groupwise]"]
    w = weights["test"]
    share_before_tail = float(w[~predicted_tail].sum() / w.sum())
    assert np.any(np.isclose(coverage, share_before_tail))
    assert metric_key("ar-gse[worst,groupwise]", "aurc_worst") == "ar-gse.worst_groupwise/aurc_worst"


def test_split_val_and_tunev_are_evaluated_on_that_split(data):
    eta, _, _, labels, _ = data
    for split in ("val", "tunev"):
        result = compare([Method("chow[true]", "chow", {s: eta[s] for s in ("tunev", "val")})],
                         {s: labels[s] for s in ("tunev", "val")}, None, CLASS_TO_GROUP, split=split, cost=COST,
                         costs=COSTS, target_coverage=0.5, n_boot=5)
        assert result.split == split
        full_error = float((eta[split].argmax(1) != labels[split]).double().mean())
        assert result.table["error_full"].iloc[0] == pytest.approx(full_error)


def test_invalid_inputs_get_one_sentence(data):
    eta, _, _, labels, weights = data
    ok = Method("chow[true]", "chow", eta)
    kwargs = dict(cost=COST, costs=COSTS, n_boot=5, target_coverage=0.5)
    with pytest.raises(ValueError, match="at least one Method"):
        compare([], labels, weights, CLASS_TO_GROUP, **kwargs)
    with pytest.raises(ValueError, match="split must be one of"):
        compare([ok], labels, weights, CLASS_TO_GROUP, split="train", **kwargs)
    short = {**eta, "test": eta["test"][:-5]}
    with pytest.raises(ValueError, match="same samples"):
        compare([ok, Method("chow[short]", "chow", short)], labels, weights, CLASS_TO_GROUP, **kwargs)
    with pytest.raises(ValueError, match="unique"):
        compare([ok, ok], labels, weights, CLASS_TO_GROUP, **kwargs)
    with pytest.raises(ValueError, match="objective"):
        compare([Method("plugin", "plugin", eta)], labels, weights, CLASS_TO_GROUP, **kwargs)
    with pytest.raises(ValueError, match="no posteriors"):
        compare([Method("chow[x]", "chow", {"val": eta["val"]})], labels, weights, CLASS_TO_GROUP, **kwargs)
    with pytest.raises(ValueError, match="rank_by"):
        compare([ok], labels, weights, CLASS_TO_GROUP, rank_by=("aurc_typo",), **kwargs)
    with pytest.raises(ValueError, match="reference coverage"):
        compare([ok], labels, weights, CLASS_TO_GROUP, cost=COST, costs=COSTS, n_boot=5)



def test_batched_bootstrap_equals_bootstrap_ci_of_the_per_replicate_curves():
    """The evaluate stage's batched bootstrap gives the interval that `bootstrap_ci` over
    `risk_coverage` + `aurc` gives, ties in the confidence included."""
    from argse.evaluation import _bootstrap_aurc
    from argse.selective import aurc, bootstrap_ci, risk_coverage

    gen = torch.Generator().manual_seed(3)
    n, c2g = 300, torch.tensor([0, 0, 0, 1, 1, 2])
    confidence = (torch.rand(n, generator=gen, dtype=torch.float64) * 20).round() / 20  # many ties
    y = torch.randint(0, 6, (n,), generator=gen)
    pred = torch.where(torch.rand(n, generator=gen) < 0.7, y, torch.randint(0, 6, (n,), generator=gen))
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    got = _bootstrap_aurc(confidence, pred, y, w, c2g, n_boot=40, seed=11, chunk=7)
    for risk in ("balanced", "worst"):
        want = bootstrap_ci(lambda cf, p, t, ww: aurc(risk_coverage(cf, p, t, c2g, ww), risk),
                            confidence, pred, y, w, n=40, level=0.95, seed=11)
        assert got[risk] == pytest.approx(want, abs=1e-9)
