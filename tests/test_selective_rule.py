"""The plug-in rule of argse.selective: hand-computed decisions, serialisation, per-group thresholds,
and the input checks."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from argse.selective import PluginRule, fit_group_thresholds

# Three classes, K = 2 groups: classes 0 and 1 are the head (group 0), class 2 the tail (group 1).
CLASS_TO_GROUP = [0, 0, 1]
ETA = torch.tensor(
    [
        [0.50, 0.20, 0.30],
        [0.05, 0.05, 0.90],
        [0.90, 0.05, 0.05],
    ],
    dtype=torch.float64,
)


def hand_rule(**changes) -> PluginRule:
    params = dict(alpha=[2.0, 0.5], mu=[0.1, 0.2], beta=[0.5, 0.5], cost=0.1, class_to_group=CLASS_TO_GROUP)
    params.update(changes)
    return PluginRule(**params)


def test_predict_matches_hand_computation_and_divides_by_alpha():
    # coef_k = K * beta_k / alpha_k = [2 * 0.5 / 2.0, 2 * 0.5 / 0.5] = [0.5, 2.0].
    # Row 0: scores [0.25, 0.10, 0.60] -> class 2; margin = 0.60 - (0.4 * 0.70 + 1.8 * 0.30) = -0.22 < -0.1.
    # Row 1: scores [0.025, 0.025, 1.8] -> class 2; margin = 1.8 - (0.4 * 0.10 + 1.8 * 0.90) = 0.14.
    # Row 2: scores [0.45, 0.025, 0.10] -> class 0; margin = 0.45 - (0.4 * 0.95 + 1.8 * 0.05) = -0.02.
    # Multiplying by alpha instead (coef = [2.0, 0.5]) would predict class 0 for row 0.
    out = hand_rule().predict(ETA)
    assert out.pred.tolist() == [2, 2, 0]
    assert out.group.tolist() == [1, 1, 0]
    assert out.accept.tolist() == [False, True, True]
    assert torch.allclose(out.margin, torch.tensor([-0.22, 0.14, -0.02], dtype=torch.float64), atol=1e-12)
    assert out.pred.dtype == torch.long and out.accept.dtype == torch.bool


def test_cost_moves_only_the_acceptance():
    rule = hand_rule()
    strict, lenient = rule.with_cost(0.0).predict(ETA), rule.with_cost(0.25).predict(ETA)
    assert strict.accept.tolist() == [False, True, False]
    assert lenient.accept.tolist() == [True, True, True]
    assert torch.equal(strict.pred, lenient.pred) and torch.equal(strict.margin, lenient.margin)
    assert rule.cost == 0.1  # with_cost returns a new rule


def test_beta_weights_the_groups_in_the_scores():
    # beta = [0.9, 0.1]: coef = [2 * 0.9 / 2.0, 2 * 0.1 / 0.5] = [0.9, 0.4]; row 0 scores [0.45, 0.18, 0.12].
    out = hand_rule(beta=[0.9, 0.1]).predict(ETA)
    assert out.pred.tolist() == [0, 2, 0]
    # margin row 0 = 0.45 - ((0.9 - 0.1) * 0.7 + (0.4 - 0.2) * 0.3) = 0.45 - 0.62 = -0.17
    assert out.margin[0].item() == pytest.approx(-0.17, abs=1e-12)


def test_thresholds_replace_the_cost_per_predicted_group():
    out = hand_rule(thresholds=[0.0, -0.3]).predict(ETA)
    # margins [-0.22, 0.14, -0.02] with predicted groups [1, 1, 0]: -0.22 >= -0.3, 0.14 >= -0.3, -0.02 < 0.
    assert out.accept.tolist() == [True, True, False]


def test_confidence_is_the_margin():
    rule = hand_rule()
    assert torch.equal(rule.confidence(ETA), rule.predict(ETA).margin)


def test_numpy_and_torch_inputs_agree():
    rule = PluginRule(
        alpha=np.array([2.0, 0.5]), mu=np.array([0.1, 0.2]), beta=np.array([0.5, 0.5]), cost=0.1,
        class_to_group=np.array(CLASS_TO_GROUP),
    )
    a, b = rule.predict(ETA.numpy()), hand_rule().predict(ETA)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.accept, b.accept) and torch.allclose(a.margin, b.margin)


def test_rule_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        hand_rule().cost = 0.5


def test_dict_round_trip_through_json():
    rule = hand_rule(thresholds=[math.inf, -0.3])
    d = rule.to_dict()
    assert d["alpha"] == [2.0, 0.5] and d["class_to_group"] == [0, 0, 1] and d["cost"] == 0.1
    back = PluginRule.from_dict(json.loads(json.dumps(d)))
    for name in ("alpha", "mu", "beta", "class_to_group", "thresholds"):
        assert torch.equal(getattr(back, name), getattr(rule, name))
    assert back.cost == rule.cost and back.history is None
    assert back.predict(ETA).accept.tolist() == [True, True, False]


def test_from_dict_names_missing_keys():
    with pytest.raises(ValueError, match="mu"):
        PluginRule.from_dict({"alpha": [1, 1], "beta": [0.5, 0.5], "cost": 0.1, "class_to_group": [0, 1]})


# --------------------------------------------------------------------------- per-group thresholds
def chow_like_rule(cost: float = 0.0) -> PluginRule:
    # alpha = 1, beta = 1/2, mu = 0: coef = 1, so margin = max_y eta_y - 1 and pred = argmax.
    return PluginRule(alpha=[1.0, 1.0], mu=[0.0, 0.0], beta=[0.5, 0.5], cost=cost, class_to_group=[0, 1])


GROUP_ETA = torch.tensor(
    [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.05, 0.95], [0.45, 0.55]], dtype=torch.float64
)


def test_group_thresholds_reach_the_target_coverage_per_predicted_group():
    rule = fit_group_thresholds(chow_like_rule(), GROUP_ETA, [0.5, 1.0])
    # Group 0 margins [-0.1, -0.2, -0.3, -0.4]: half of them -> threshold -0.2; group 1: all -> -0.45.
    assert rule.thresholds.tolist() == pytest.approx([-0.2, -0.45])
    assert rule.predict(GROUP_ETA).accept.tolist() == [True, True, False, False, True, True]


def test_group_thresholds_use_the_weights():
    rule = fit_group_thresholds(chow_like_rule(), GROUP_ETA, 0.5, weights=[3, 1, 1, 1, 1, 1])
    # Group 0: the first sample alone carries 3 / 6 of the weight; group 1: one of two samples.
    assert rule.thresholds.tolist() == pytest.approx([-0.1, -0.05])


def test_group_threshold_of_zero_target_rejects_the_group_and_unseen_groups_keep_the_cost():
    rule = fit_group_thresholds(chow_like_rule(cost=0.3), GROUP_ETA[:4], [0.0, 0.5])
    assert rule.thresholds[0].item() == math.inf
    assert rule.thresholds[1].item() == pytest.approx(-0.3)  # no sample predicted in group 1
    assert not rule.predict(GROUP_ETA).accept[:4].any()


def test_group_thresholds_reject_bad_targets():
    with pytest.raises(ValueError, match="target_coverage"):
        fit_group_thresholds(chow_like_rule(), GROUP_ETA, [0.5, 1.5])
    with pytest.raises(ValueError, match="target_coverage"):
        fit_group_thresholds(chow_like_rule(), GROUP_ETA, [0.5, 0.5, 0.5])


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "changes, argument",
    [
        ({"alpha": [1.0, 0.0]}, "alpha"),
        ({"alpha": [1.0, 1.0, 1.0]}, "alpha"),
        ({"mu": [0.0, math.nan]}, "mu"),
        ({"beta": [0.7, 0.7]}, "beta"),
        ({"beta": [1.5, -0.5]}, "beta"),
        ({"cost": -0.1}, "cost"),
        ({"class_to_group": [0, 0, 2]}, "class_to_group"),
        ({"class_to_group": [0.5, 0, 1]}, "class_to_group"),
        ({"thresholds": [0.0]}, "thresholds"),
    ],
)
def test_invalid_parameters_are_rejected_with_the_argument_name(changes, argument):
    with pytest.raises(ValueError, match=argument):
        hand_rule(**changes)


@pytest.mark.parametrize(
    "eta, message",
    [
        (torch.tensor([0.2, 0.3, 0.5]), "2-D"),
        (torch.tensor([[0.5, 0.5]]), "C = 3 columns"),
        (torch.tensor([[0.5, 0.6, -0.1]]), "negative"),
        (torch.tensor([[0.5, 0.3, 0.3]]), "sum to 1"),
        (torch.tensor([[math.nan, 0.5, 0.5]]), "NaN"),
    ],
)
def test_predict_rejects_inputs_that_are_not_posteriors(eta, message):
    with pytest.raises(ValueError, match=message) as info:
        hand_rule().predict(eta)
    assert str(info.value).startswith("eta ")


def test_predict_accepts_rows_that_miss_one_by_rounding():
    eta = ETA.float() * (1 + 1e-5)
    assert hand_rule().predict(eta).pred.tolist() == [2, 2, 0]
