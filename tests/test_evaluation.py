"""`argse.selective.compare`: the comparison table of the evaluate stage, on posteriors with a known truth.

Fixture: 10 long-tailed classes in two groups (head 0-2, tail 3-9). Each sample has true posteriors
eta; its label is drawn from eta, so eta is the Bayes posterior. Methods built on eta are compared with
degraded versions: a head-biased posterior (eta * prior, what plain cross-entropy learns on long-tailed
data) and a noisy one (Gaussian noise on log eta).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from argse.selective import fit_at_coverage, fit_group_thresholds, fit_worst, selective_errors
from argse.selective.metrics import MIN_GROUP_ACCEPTED
from argse.selective.compare import POINT_COLUMNS, Comparison, compare, table_columns
from argse.selective.matched import COVERAGES, FitOptions, Method, check_coverages, matched_aurc, matched_aurc_gap
from argse.tracking.metric_names import metric_dict, metric_key

N_CLASSES = 10
CLASS_TO_GROUP = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
GROUP_NAMES = ("head", "tail")
SIZES = {"tunev": 1000, "val": 1000, "test": 1500}
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
    return compare(methods, labels, weights, CLASS_TO_GROUP, cost=COST, n_boot=40,
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
    for column in ("aurc_balanced", "aurc_worst", "balanced_error_at0.8", "worst_error_at0.8"):
        for other in ("plugin-worst[noisy]", "plugin-worst[head-biased]"):
            assert row.loc["ar-gse[worst]", column] < row.loc[other, column], (column, other)


def test_table_has_the_documented_columns_in_order(comparison):
    assert list(comparison.table.columns) == table_columns(GROUP_NAMES, COVERAGES)
    assert comparison.table.columns[0] == "method"
    for tau in ("1", "0.8", "0.6"):
        assert {f"balanced_error_at{tau}", f"worst_error_at{tau}"} <= set(comparison.table.columns)
    assert not any("costsweep" in c for c in comparison.table.columns)
    assert len(comparison.table) == 5
    assert not comparison.table.drop(columns="method").isna().any().any()


def test_every_aurc_lies_in_its_range(comparison):
    values = comparison.table[_aurc_columns(comparison.table)].to_numpy()
    assert values.shape[1] == 8
    assert np.all((values >= 0.0) & (values <= 1.0))
    # the coverage-matched areas span the grid [0.2, 1] only
    for column in ("aurc_balanced", "aurc_worst", "aurc_worst_hi"):
        assert np.all(comparison.table[column] <= 0.8 + 1e-12)


def test_each_bootstrap_interval_contains_its_point_estimate(comparison):
    table = comparison.table
    for risk in ("balanced", "worst"):
        lo, point, hi = table[f"aurc_{risk}_lo"], table[f"aurc_{risk}"], table[f"aurc_{risk}_hi"]
        assert np.all(lo <= point) and np.all(point <= hi)
        assert np.all(hi - lo > 0)  # a real interval, not a degenerate one


def test_metric_dict_equals_the_table(comparison):
    metrics = metric_dict(comparison.table)
    table = comparison.table
    numeric = [c for c in table.columns if c != "method"]
    assert len(metrics) == len(table) * len(numeric)
    for _, row in table.iterrows():
        for column in numeric:
            assert metrics[metric_key(row["method"], column)] == float(row[column])
    assert metrics["ar-gse.worst/aurc_worst"] == float(table.set_index("method").loc["ar-gse[worst]", "aurc_worst"])


def test_metric_keys_are_valid_mlflow_names(comparison):
    from mlflow.utils.validation import _validate_metric_name

    for key in metric_dict(comparison.table):
        _validate_metric_name(key)  # raises MlflowException on an invalid name


def test_metric_key_maps_brackets_and_other_characters():
    assert metric_key("ar-gse[worst]", "aurc_worst") == "ar-gse.worst/aurc_worst"
    assert metric_key("chow[uniform-ensemble]", "worst_error_at0.8") == "chow.uniform-ensemble/worst_error_at0.8"
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
                     cost=COST, target_coverage=0.7, n_boot=5)
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


def test_coverage_points_have_the_documented_columns_and_one_row_per_method_and_target(comparison):
    points = comparison.coverage_points
    assert tuple(points.columns) == POINT_COLUMNS
    assert len(points) == len(comparison.table) * len(COVERAGES)
    for name in comparison.table["method"]:
        mine = points[points["method"] == name]
        assert tuple(mine["target_coverage"]) == COVERAGES
        assert np.all(mine["worst_error"] >= mine["balanced_error"] - 1e-12)


def test_aurc_is_the_trapezoid_of_the_logged_points(comparison):
    row = comparison.table.set_index("method")
    for name, mine in comparison.coverage_points.groupby("method"):
        mine = mine.sort_values("target_coverage")
        x = mine["target_coverage"].to_numpy()
        for risk in ("balanced", "worst"):
            y = mine[f"{risk}_error"].to_numpy()
            area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
            assert row.loc[name, f"aurc_{risk}"] == pytest.approx(area, abs=1e-12)
        for tau in (1.0, 0.8, 0.6):
            at = mine[np.isclose(mine["target_coverage"], tau)].iloc[0]
            assert row.loc[name, f"balanced_error_at{tau:g}"] == at["balanced_error"]
            assert row.loc[name, f"worst_error_at{tau:g}"] == at["worst_error"]


def _independent_chow_points(eta, labels, weights, taus):
    """Chow's coverage-matched points by hand: the val quantile of sorted confidences, test errors."""
    conf_val = np.sort(eta["val"].max(dim=1).values.numpy())[::-1]
    n_val = len(conf_val)
    conf, pred = eta["test"].max(dim=1).values.numpy(), eta["test"].argmax(dim=1).numpy()
    y, w = labels["test"].numpy(), weights["test"].numpy()
    group = CLASS_TO_GROUP.numpy()[y]
    out = []
    for tau in taus:
        threshold = conf_val[int(np.ceil(tau * n_val - 1e-9)) - 1]  # unit val weights: the ceil(tau*n)-th largest
        accept = conf >= threshold
        errors = []
        for k in (0, 1):
            mass = w[accept & (group == k)].sum()
            errors.append(w[accept & (group == k) & (pred != y)].sum() / mass if mass > 0 else 1.0)
        out.append((w[accept].sum() / w.sum(), np.mean(errors), np.max(errors)))
    return np.array(out)


def test_chow_points_equal_an_independent_computation(data):
    eta, _, _, labels, weights = data
    taus = (1.0, 0.9, 0.7, 0.5, 0.3, 0.2)
    result = compare([Method("chow[true]", "chow", eta)], labels, weights, CLASS_TO_GROUP, cost=COST,
                     coverages=taus, target_coverage=0.5, n_boot=5)
    got = result.coverage_points[["coverage", "balanced_error", "worst_error"]].to_numpy()
    assert np.allclose(got, _independent_chow_points(eta, labels, weights, taus), atol=1e-12)


def test_plugin_points_are_fitted_for_each_coverage_and_reach_it_on_val(comparison, data):
    eta, _, _, labels, _ = data
    rules = comparison.coverage_rules["ar-gse[worst]"]
    assert len(rules) == len(COVERAGES)
    for tau, rule in zip(COVERAGES, rules):
        share = float(rule.predict(eta["val"]).accept.double().mean())
        assert tau <= share <= tau + 2.0 / SIZES["val"]
    assert "chow[noisy]" not in comparison.coverage_rules


def test_bootstrap_interval_equals_a_per_resample_recomputation(data):
    """Operating points fixed, samples resampled: the interval of a naive loop over resamples."""
    eta, _, _, labels, weights = data
    taus = (1.0, 0.6, 0.2)
    result = compare([Method("chow[true]", "chow", eta)], labels, weights, CLASS_TO_GROUP, cost=COST,
                     coverages=taus, target_coverage=0.5, n_boot=30, seed=7)
    conf_val = eta["val"].max(dim=1).values
    conf, pred = eta["test"].max(dim=1).values, eta["test"].argmax(dim=1)
    thresholds = [float(conf_val.sort(descending=True).values[int(np.ceil(t * SIZES["val"] - 1e-9)) - 1]) for t in taus]
    y, w = labels["test"], weights["test"]
    index = np.random.default_rng(7).integers(0, len(y), size=(30, len(y)))
    areas = {"balanced": [], "worst": []}
    for rows in index:
        rows = torch.from_numpy(rows)
        points = [selective_errors(pred[rows], conf[rows] >= t, y[rows], CLASS_TO_GROUP, w[rows]) for t in thresholds]
        for risk in areas:
            e = np.array([getattr(p, f"{risk}_error") for p in points])[::-1]  # ascending coverage
            areas[risk].append(float(np.sum(np.diff(taus[::-1]) * (e[1:] + e[:-1]) / 2)))
    row = result.table.iloc[0]
    for risk, values in areas.items():
        lo, hi = np.quantile(values, [0.025, 0.975])
        assert row[f"aurc_{risk}_lo"] == pytest.approx(lo, abs=1e-9)
        assert row[f"aurc_{risk}_hi"] == pytest.approx(hi, abs=1e-9)


def test_accepted_counts_and_thin_points_equal_a_recount_of_each_rule(comparison, methods, data):
    # Each plug-in point's accepted images per group, recounted from its rule on the test split; a
    # point is thin when some group has fewer than MIN_GROUP_ACCEPTED (or than all of its images).
    labels = data[3]
    y = torch.as_tensor(labels["test"])
    groups = comparison.group_points
    for m in methods:
        if m.kind != "plugin":
            continue
        thin = 0
        for tau, rule in zip(comparison.coverages, comparison.coverage_rules[m.name]):
            accept = rule.predict(m.eta["test"]).accept
            mine = groups[(groups["method"] == m.name) & (groups["target_coverage"] == tau)]
            short = False
            for k, name in enumerate(GROUP_NAMES):
                in_group = CLASS_TO_GROUP[y] == k
                count = int((accept & in_group).sum())
                assert int(mine.loc[mine["group"] == name, "accepted"].iloc[0]) == count
                short |= count < min(MIN_GROUP_ACCEPTED, int(in_group.sum()))
            thin += short
        assert comparison.table.set_index("method").loc[m.name, "thin_group_points"] == thin


def test_empty_groups_are_counted_per_method(comparison):
    groups = comparison.group_points
    assert set(groups.columns) == {"method", "target_coverage", "group", "coverage", "error", "accepted"}
    for name, mine in groups.groupby("method"):
        empty = mine[mine["coverage"] <= 0]
        assert np.all(empty["error"] == 1.0)
        count = comparison.table.set_index("method").loc[name, "empty_group_points"]
        assert count == empty["target_coverage"].nunique()
    # no plug-in row empties a group at any target coverage
    table = comparison.table.set_index("method")
    for name in ("ar-gse[worst]", "plugin-worst[noisy]", "plugin-worst[head-biased]"):
        assert table.loc[name, "empty_group_points"] == 0


def test_a_chow_rule_that_never_trusts_the_tail_empties_it_below_the_head_share():
    """Head samples (classes 0-2) are confident, tail samples are not: Chow accepts no tail sample
    below the head's share of coverage, and those targets count as empty with error 1.0."""
    g = torch.Generator().manual_seed(0)
    n = 400
    y = torch.cat([torch.randint(0, 3, (n // 2,), generator=g), torch.randint(3, 10, (n // 2,), generator=g)])
    eta = torch.full((n, N_CLASSES), 0.1 / 9, dtype=torch.float64)
    eta[torch.arange(n), y] = torch.where(y < 3, 0.9, 0.5).double()
    eta = eta / eta.sum(dim=1, keepdim=True)
    splits = {s: eta for s in ("tunev", "val", "test")}
    labels = {s: y for s in splits}
    taus = (1.0, 0.8, 0.6, 0.4, 0.2)
    result = compare([Method("chow[shy]", "chow", splits)], labels, None, CLASS_TO_GROUP, cost=COST, coverages=taus,
                     target_coverage=0.5, n_boot=5, group_names=GROUP_NAMES)
    assert result.table["empty_group_points"].iloc[0] == 2  # tau = 0.4 and 0.2
    points = result.coverage_points.set_index("target_coverage")
    assert points.loc[0.4, "worst_error"] == 1.0 and points.loc[0.6, "worst_error"] < 1.0


@pytest.mark.parametrize("grid, message", [
    ([], "at least two"), ([0.5], "at least two"), ([1.0, 1.2], "lie in"), ([0.5, 0.0], "lie in"),
    (["a", 0.5], "numbers"),
])
def test_bad_coverage_grids_get_one_sentence(grid, message):
    with pytest.raises(ValueError, match=message):
        check_coverages(grid)


def test_coverage_grid_is_sorted_and_deduplicated():
    assert check_coverages([0.2, 1.0, 0.6, 0.6]) == (1.0, 0.6, 0.2)
    assert COVERAGES[0] == 1.0 and COVERAGES[-1] == 0.2 and len(COVERAGES) == 17


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
    counts = comparison.to_markdown(columns=["empty_group_points", "thin_group_points"]).strip().splitlines()
    for line, (_, row) in zip(counts[2:], comparison.table.iterrows()):  # counts as integers, not 8.0000
        assert line.endswith(f"| {int(row['empty_group_points'])} | {int(row['thin_group_points'])} |"), line


def test_a_fixed_rule_is_used_as_given(data):
    eta, _, _, labels, weights = data
    rule = fit_worst(eta["tunev"], labels["tunev"], eta["val"], labels["val"], CLASS_TO_GROUP, COST, rounds=3,
                     n_starts=4, max_iter=10)
    result = compare([Method("ar-gse[worst]", "plugin", eta, objective="worst", rule=rule)], labels, weights,
                     CLASS_TO_GROUP, cost=COST, n_boot=5, fit_options=FIT)
    assert result.rules["ar-gse[worst]"] is rule
    accept = rule.predict(eta["test"]).accept.double()
    w = weights["test"]
    assert result.table["coverage"].iloc[0] == pytest.approx(float((accept * w).sum() / w.sum()))
    with pytest.raises(ValueError, match="fitted at cost"):
        compare([Method("ar-gse[worst]", "plugin", eta, objective="worst", rule=rule)], labels, weights,
                CLASS_TO_GROUP, cost=0.1, n_boot=5)


def test_a_rule_with_group_thresholds_ranks_a_rejected_group_last(data):
    eta, _, _, labels, weights = data
    rule = fit_worst(eta["tunev"], labels["tunev"], eta["val"], labels["val"], CLASS_TO_GROUP, COST, rounds=2,
                     n_starts=3, max_iter=5)
    rule = fit_group_thresholds(rule, eta["val"], [0.8, 0.0])  # the tail group gets t = +inf
    result = compare([Method("ar-gse[worst,groupwise]", "plugin", eta, objective="worst", rule=rule)], labels,
                     weights, CLASS_TO_GROUP, cost=COST, n_boot=5, group_names=GROUP_NAMES,
                     fit_options=FIT)
    row = result.table.iloc[0]
    predicted_tail = rule.predict(eta["test"]).group == 1
    assert 0.0 < row["coverage"] < 1.0
    assert row["coverage_val"] == pytest.approx(float((rule.predict(eta["val"]).accept).double().mean()))
    # every sample predicted in the rejected group is rejected at the operating point
    w = weights["test"]
    assert row["coverage"] <= float(w[~predicted_tail].sum() / w.sum()) + 1e-12
    assert metric_key("ar-gse[worst,groupwise]", "aurc_worst") == "ar-gse.worst_groupwise/aurc_worst"


def test_split_val_and_tunev_are_evaluated_on_that_split(data):
    eta, _, _, labels, _ = data
    for split in ("val", "tunev"):
        result = compare([Method("chow[true]", "chow", {s: eta[s] for s in ("tunev", "val")})],
                         {s: labels[s] for s in ("tunev", "val")}, None, CLASS_TO_GROUP, split=split, cost=COST,
                         target_coverage=0.5, n_boot=5)
        assert result.split == split
        y, (confidence, pred) = labels[split], eta[split].max(1)
        # tau = 1 accepts what reaches val's lowest confidence: all of val, nearly all of tunev
        at_one = selective_errors(pred, confidence >= eta["val"].max(1).values.min(), y, CLASS_TO_GROUP)
        assert result.table["balanced_error_at1"].iloc[0] == pytest.approx(at_one.balanced_error)
        assert result.coverage_points["coverage"].iloc[0] == pytest.approx(at_one.coverage)
        assert at_one.coverage == 1.0 if split == "val" else at_one.coverage > 0.99


def test_invalid_inputs_get_one_sentence(data):
    eta, _, _, labels, weights = data
    ok = Method("chow[true]", "chow", eta)
    kwargs = dict(cost=COST, n_boot=5, target_coverage=0.5)
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
        compare([ok], labels, weights, CLASS_TO_GROUP, cost=COST, n_boot=5)
    with pytest.raises(ValueError, match="coverages"):
        compare([ok], labels, weights, CLASS_TO_GROUP, coverages=[0.5], **kwargs)


def _hand_matched_aurc(rules, eta, y, w, risk: str) -> float:
    """The coverage-matched AURC by hand: each target's rule applied to the split, every group's error
    counted in a loop over the samples (1.0 for a group with nothing accepted), the worst or the mean
    of them, and the trapezoid over the targets sorted by coverage."""
    points = []
    for tau, rule in zip(COVERAGES, rules):
        decision = rule.predict(eta)
        accepted, wrong = [0.0, 0.0], [0.0, 0.0]
        for i in range(len(y)):
            if bool(decision.accept[i]):
                group = int(CLASS_TO_GROUP[int(y[i])])
                weight = 1.0 if w is None else float(w[i])
                accepted[group] += weight
                wrong[group] += weight * (int(decision.pred[i]) != int(y[i]))
        errors = [wrong[k] / accepted[k] if accepted[k] > 0 else 1.0 for k in (0, 1)]
        points.append((tau, max(errors) if risk == "worst" else sum(errors) / 2))
    points.sort()
    return sum((x1 - x0) * (r0 + r1) / 2 for (x0, r0), (x1, r1) in zip(points, points[1:]))


@pytest.mark.parametrize("name, risk, split", [("ar-gse[worst]", "worst", "test"),
                                              ("plugin-worst[head-biased]", "worst", "test"),
                                              ("ar-gse[worst]", "balanced", "val")])
def test_matched_aurc_equals_a_hand_count_of_each_target_s_rule(methods, data, name, risk, split):
    # matched_aurc is what the gating stage selects by on val; here against an independent count of
    # the same operating points (the rules fit_at_coverage gives for each target coverage).
    _, _, _, labels, weights = data
    method = next(m for m in methods if m.name == name)
    value = matched_aurc(method.eta, labels, weights, CLASS_TO_GROUP, risk, split=split, fit_options=FIT)
    rules = fit_at_coverage(method.eta["tunev"], labels["tunev"], method.eta["val"], labels["val"], CLASS_TO_GROUP,
                            COVERAGES, objective=risk, weights_fit=weights["tunev"], weights_sel=weights["val"],
                            rounds=FIT.rounds, n_starts=FIT.n_starts, max_iter=FIT.max_iter)
    assert value == pytest.approx(_hand_matched_aurc(rules, method.eta[split], labels[split], weights[split], risk),
                                  abs=1e-12)


def test_matched_aurc_prefers_the_true_posterior(data):
    eta, head_biased, _, labels, weights = data
    true = matched_aurc(eta, labels, weights, CLASS_TO_GROUP, "worst", split="val", fit_options=FIT)
    biased = matched_aurc(head_biased, labels, weights, CLASS_TO_GROUP, "worst", split="val", fit_options=FIT)
    assert true < biased


def test_matched_aurc_gap_and_its_interval_equal_a_per_resample_recomputation(data):
    # The paired interval, recomputed by hand: each resample of the test split reweights the test
    # samples by how often they are drawn; the rules (fitted on tunev / val) stay fixed, so
    # matched_aurc with those weights is that resample's area.
    from argse.selective.matched import CI_LEVEL, resample_counts

    eta, head_biased, _, labels, weights = data
    fit = dataclasses.replace(FIT, search="none")  # any fit will do: the arithmetic of the interval is tested
    gap, lo, hi = matched_aurc_gap(eta, head_biased, labels, weights, CLASS_TO_GROUP, "worst", split="test",
                                   fit_options=fit, n_boot=6, seed=3)
    area = lambda e, w: matched_aurc(e, labels, {**weights, "test": w}, CLASS_TO_GROUP, "worst",  # noqa: E731
                                     split="test", fit_options=fit)
    assert gap == pytest.approx(area(eta, weights["test"]) - area(head_biased, weights["test"]), abs=1e-12)
    counts = resample_counts(len(labels["test"]), 6, 3)
    gaps = [area(eta, weights["test"] * c) - area(head_biased, weights["test"] * c) for c in counts]
    expected = np.quantile(gaps, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    assert (lo, hi) == pytest.approx(tuple(expected), abs=1e-12)
    assert gap < 0 and hi < 0  # the true posterior is better beyond noise
