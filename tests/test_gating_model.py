"""The gating network (features, weights, standardisation, balanced NLL) and its two training procedures
(pretrain beats the uniform mixture, selective mode never ends worse than its start) on synthetic
expert posteriors where the right expert depends on the sample."""

import io
import math

import numpy as np
import pytest
import torch

from argse.models.gating import (
    GatingNet,
    balanced_accuracy,
    balanced_nll,
    feature_size,
    gate_weights,
    gated_mixture,
    gating_features,
    uniform_mixture,
)
from argse.selective import PluginRule, selective_errors
from argse.selective.matched import FitOptions, matched_aurc
from argse.training.gating import PretrainResult, SelectiveResult, selective_surrogate, train_pretrain, train_selective

HEAD = 5
C = 10
COUNTS = [60, 50, 40, 30, 25, 12, 10, 8, 6, 5]
CLASS_TO_GROUP = torch.tensor([0] * HEAD + [1] * (C - HEAD))


def synthetic_experts(counts, seed, right=(0.9, 0.8)):
    """Posteriors [N, 3, C] and labels [N]: expert A is confident on head samples (right with prob
    right[0]) and diffuse on tail ones, expert B the other way round (right with prob right[1]), expert M
    is mildly peaked and right half the time. A per-sample gate that follows the confident expert beats
    any fixed mixture; the features see which expert is confident."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(torch.as_tensor(counts))
    n = y.shape[0]

    def noise():
        e = -torch.log(torch.rand(n, C, generator=g))
        return e / e.sum(dim=1, keepdim=True)

    def peaked(target, low, high):
        top = low + (high - low) * torch.rand(n, generator=g)
        p = noise() * (1 - top)[:, None]
        p[torch.arange(n), target] += top
        return p

    def guess(p_right):
        wrong = (y + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
        return torch.where(torch.rand(n, generator=g) < p_right, y, wrong)

    head = (y < HEAD)[:, None]
    a = torch.where(head, peaked(guess(right[0]), 0.7, 0.95), noise())
    b = torch.where(head, noise(), peaked(guess(right[1]), 0.7, 0.95))
    m = peaked(guess(0.5), 0.2, 0.4)
    return torch.stack([a, b, m], dim=1), y


@pytest.fixture(scope="module")
def splits():
    probs_fit, y_fit = synthetic_experts(COUNTS, seed=0)
    probs_val, y_val = synthetic_experts(COUNTS, seed=1)
    return probs_fit, y_fit, probs_val, y_val


@pytest.fixture(scope="module")
def pretrained(splits):
    probs_fit, y_fit, probs_val, y_val = splits
    gate = GatingNet(3)
    rows = []
    result = train_pretrain(gate, probs_fit, y_fit, probs_val, y_val, num_classes=C, epochs=30, batch_size=64,
                            lr=3e-3, patience=8, seed=0, on_epoch=lambda epoch, row: rows.append((epoch, row)))
    return gate, result, rows


# ------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("n_classes", [10, 100])
def test_features_have_size_6e_plus_3_whatever_the_class_count(n_classes):
    probs = torch.softmax(torch.randn(7, 3, n_classes, generator=torch.Generator().manual_seed(0)), dim=-1)
    features = gating_features(probs)
    assert feature_size(3) == 21
    assert features.shape == (7, 21)
    assert torch.isfinite(features).all()


def test_features_are_finite_and_exact_on_one_hot_and_uniform_posteriors():
    n_classes = 10
    uniform = torch.full((1, 3, n_classes), 1.0 / n_classes)
    agree = torch.zeros(1, 3, n_classes)
    agree[0, :, 4] = 1.0
    disagree = torch.zeros(1, 3, n_classes)
    disagree[0, torch.arange(3), torch.tensor([1, 2, 3])] = 1.0
    features = gating_features(torch.cat([uniform, agree, disagree]))
    assert torch.isfinite(features).all()
    per_expert = features[:, :18].reshape(3, 3, 6)  # sample, expert, feature
    entropy, max_prob, gap, top5, cosine, kl = per_expert.unbind(-1)
    mixture_entropy, variance, spread = features[:, 18:].unbind(-1)
    # uniform: entropy log C, max 1/C, no gap, top-5 mass 1/2, identical to the mean
    assert torch.allclose(entropy[0], torch.full((3,), math.log(n_classes)))
    assert torch.allclose(max_prob[0], torch.full((3,), 0.1)) and torch.allclose(gap[0], torch.zeros(3))
    assert torch.allclose(top5[0], torch.full((3,), 0.5))
    assert torch.allclose(cosine[0], torch.ones(3)) and torch.allclose(kl[0], torch.zeros(3), atol=1e-6)
    # the same one-hot everywhere: no entropy, full confidence, no disagreement
    assert torch.allclose(entropy[1], torch.zeros(3), atol=1e-6) and torch.allclose(gap[1], torch.ones(3))
    assert float(variance[1]) == pytest.approx(0.0, abs=1e-7) and float(spread[1]) == pytest.approx(0.0, abs=1e-7)
    # three different one-hots: the mean is uniform on 3 classes
    assert torch.allclose(kl[2], torch.full((3,), math.log(3)), atol=1e-5)
    assert torch.allclose(cosine[2], torch.full((3,), 1 / math.sqrt(3)), atol=1e-6)
    assert float(mixture_entropy[2]) == pytest.approx(math.log(3), abs=1e-5)
    assert float(variance[2]) == pytest.approx(3 * (2 / 9) / n_classes, abs=1e-6)


def test_gate_weights_sum_to_one_and_a_fresh_gate_is_the_uniform_mixture():
    probs = torch.softmax(3 * torch.randn(50, 3, 12, generator=torch.Generator().manual_seed(1)), dim=-1)
    gate = GatingNet(3)
    gate.set_standardisation(gating_features(probs))
    assert torch.allclose(gate_weights(gate, probs), torch.full((50, 3), 1 / 3))
    assert torch.allclose(gated_mixture(gate, probs), uniform_mixture(probs), atol=1e-6)
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_(generator=torch.Generator().manual_seed(2))
    weights = gate_weights(gate, probs, batch_size=16)
    assert weights.shape == (50, 3)
    assert torch.allclose(weights.sum(dim=1), torch.ones(50), atol=1e-6)
    assert weights.std(dim=0).max() > 0.01  # a trained-looking gate weighs samples differently
    assert torch.allclose(gated_mixture(gate, probs).sum(dim=1), torch.ones(50, dtype=probs.dtype), atol=1e-6)


def test_standardisation_survives_a_state_dict_round_trip():
    probs = torch.softmax(torch.randn(40, 3, 10, generator=torch.Generator().manual_seed(3)), dim=-1)
    features = gating_features(probs)
    gate = GatingNet(3, hidden=(16, 8), dropout=0.2)
    gate.set_standardisation(features)
    with torch.no_grad():
        gate.mlp[-1].weight.normal_(generator=torch.Generator().manual_seed(4))
    assert torch.allclose(gate.feature_mean, features.mean(dim=0))
    buffer = io.BytesIO()
    torch.save(gate.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = GatingNet.from_config(gate.config())
    assert rebuilt.config() == {"num_experts": 3, "hidden": [16, 8], "dropout": 0.2}
    assert not torch.allclose(rebuilt.feature_mean, gate.feature_mean)
    rebuilt.load_state_dict(torch.load(buffer))
    assert torch.equal(rebuilt.feature_mean, gate.feature_mean)
    assert torch.equal(rebuilt.feature_std, gate.feature_std)
    assert torch.equal(gate_weights(rebuilt, probs), gate_weights(gate, probs))


def test_balanced_nll_weighs_each_class_mean_equally():
    mixture = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.1, 0.9]])
    y = torch.tensor([0, 0, 0, 1])
    per_class = torch.tensor([-math.log(0.5), -math.log(0.9)])
    assert float(balanced_nll(mixture, y)) == pytest.approx(float(per_class.mean()), rel=1e-6)
    weighted = balanced_nll(mixture, y, class_weights=torch.tensor([3.0, 1.0]))
    assert float(weighted) == pytest.approx(float((3 * per_class[0] + per_class[1]) / 4), rel=1e-6)
    # sample weights act within a class; a class absent from y is left out
    three = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.1, 0.9, 0.0]])
    value = balanced_nll(three, torch.tensor([0, 0, 1]), sample_weights=torch.tensor([1.0, 3.0, 1.0]))
    expected = ((-math.log(0.5) - 3 * math.log(0.2)) / 4 - math.log(0.9)) / 2
    assert float(value) == pytest.approx(expected, rel=1e-6)
    mostly_right = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.1, 0.9]])
    assert balanced_accuracy(mostly_right, y) == pytest.approx((2 / 3 + 1) / 2)


# ------------------------------------------------------------------------------------------- training


def test_pretrain_beats_the_uniform_mixture_on_val_and_restores_its_best_epoch(splits, pretrained):
    probs_fit, y_fit, probs_val, y_val = splits
    gate, result, rows = pretrained
    uniform_nll = float(balanced_nll(uniform_mixture(probs_val), y_val))
    assert isinstance(result, PretrainResult)
    assert result.history[0]["val_mixture_nll"] == pytest.approx(uniform_nll, rel=1e-5)  # fresh gate = uniform
    assert result.best_val_nll < uniform_nll - 0.2
    assert result.best_epoch >= 1
    assert result.best_val_nll == min(row["val_mixture_nll"] for row in result.history)
    with torch.no_grad():
        gate.eval()
        assert float(balanced_nll(gated_mixture(gate, probs_val), y_val)) == pytest.approx(result.best_val_nll, rel=1e-5)
    assert [epoch for epoch, _ in rows] == list(range(len(result.history)))
    assert {"loss", "val_mixture_nll", "val_balanced_acc", "mean_weight"} <= set(rows[-1][1])
    assert len(rows[-1][1]["mean_weight"]) == 3
    # the gate follows the confident expert: A on head samples, B on tail samples
    weights = gate_weights(gate, probs_val)
    head = y_val < HEAD
    assert weights[head, 0].mean() > 0.6 and weights[~head, 1].mean() > 0.6


def test_pretrain_is_deterministic_given_the_seed(splits):
    probs_fit, y_fit, probs_val, y_val = splits
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same starting gate; the seed argument covers batches and dropout
        gate = GatingNet(3)
        result = train_pretrain(gate, probs_fit.numpy(), y_fit.numpy(), probs_val, y_val, num_classes=C, epochs=3,
                                batch_size=32, lr=3e-3, seed=7)
        runs.append((result.history, gate_weights(gate, probs_val)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def _selective(gate, splits, **overrides):
    probs_fit, y_fit, probs_val, y_val = splits
    options = dict(cost=0.3, objective="worst", rounds=3, epochs_per_round=5, batch_size=64, lr=1e-3, seed=0,
                   fit_kwargs={"rounds": 4, "n_starts": 6})
    options.update(overrides)
    return train_selective(gate, probs_fit, y_fit, probs_val, y_val, CLASS_TO_GROUP, **options)


def _val_worst_risk(gate, rule, splits, cost=0.3):
    _, _, probs_val, y_val = splits
    with torch.no_grad():
        gate.eval()
        decision = rule.predict(gated_mixture(gate, probs_val).double())
    errors = selective_errors(decision.pred, decision.accept, y_val, CLASS_TO_GROUP)
    return errors.worst_error + cost * (1 - errors.coverage)


def test_selective_never_ends_worse_than_its_pretrained_start(splits, pretrained):
    gate = GatingNet(3)
    gate.load_state_dict(pretrained[0].state_dict())
    rounds = []
    result = _selective(gate, splits, on_round=lambda r, row: rounds.append(r))
    assert isinstance(result, SelectiveResult) and isinstance(result.rule, PluginRule)
    assert rounds == [0, 1, 2, 3]
    risks = [row["val_worst_risk"] for row in result.history]
    assert risks[result.best_round] <= risks[0]
    assert risks[result.best_round] == min(risks)
    for row in result.history:
        expected = {"val_balanced_error", "val_worst_error", "val_coverage", "val_l2r_risk", "alpha", "mu", "beta"}
        assert expected <= set(row)
        assert row["val_l2r_risk"] == row["val_worst_risk"]
    # the gate holds the best round and the returned rule is that round's
    assert _val_worst_risk(gate, result.rule, splits) == pytest.approx(risks[result.best_round], abs=1e-9)
    assert result.rule.alpha.tolist() == result.history[result.best_round]["alpha"]


def test_selective_lowers_the_worst_group_risk_of_a_uniform_gate(splits):
    """From the uniform mixture, training on the surrogate finds a per-sample mixture whose refitted
    rule has a clearly lower val worst-group L2R risk."""
    probs_fit = splits[0]
    gate = GatingNet(3)
    gate.set_standardisation(gating_features(probs_fit))
    result = _selective(gate, splits)
    risks = [row["val_worst_risk"] for row in result.history]
    assert result.best_round >= 1
    assert risks[result.best_round] < risks[0] - 0.03
    assert "loss" in result.history[1] and math.isfinite(result.history[1]["loss"])


def test_selective_balanced_objective_selected_by_error_never_worsens_the_balanced_error(splits, pretrained):
    gate = GatingNet(3)
    gate.load_state_dict(pretrained[0].state_dict())
    result = _selective(gate, splits, objective="balanced", select_by="error", rounds=2,
                        fit_kwargs={"n_starts": 6})
    errors = [row["val_balanced_error"] for row in result.history]
    assert errors[result.best_round] == min(errors) <= errors[0]
    assert all(row["val_l2r_risk"] == row["val_balanced_risk"] for row in result.history)
    assert result.rule.beta.tolist() == [0.5, 0.5]


def test_selective_surrogate_is_the_rules_l2r_risk_in_the_sharp_limit():
    """With tiny temperatures the soft acceptance and the soft error become the rule's decisions, and
    the surrogate becomes sum_k beta_k e_k + cost * P(reject) measured by `selective_errors`."""
    gen = torch.Generator().manual_seed(5)
    eta = torch.softmax(2 * torch.randn(300, 4, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (300,), generator=gen)
    weights = torch.rand(300, generator=gen, dtype=torch.float64) + 0.5
    rule = PluginRule(alpha=torch.tensor([0.8, 0.4]), mu=torch.tensor([0.1, 0.3]), beta=torch.tensor([0.3, 0.7]),
                      cost=0.2, class_to_group=torch.tensor([0, 0, 1, 1]))
    decision = rule.predict(eta)
    errors = selective_errors(decision.pred, decision.accept, y, rule.class_to_group, weights)
    assert 0.2 < errors.coverage < 0.95 and (errors.group_error > 0).all()
    exact = float((rule.beta * errors.group_error).sum()) + 0.2 * (1 - errors.coverage)
    sharp = selective_surrogate(eta, y, rule, scale=1e-9, sample_weights=weights, error_temperature=1e-4)
    assert float(sharp) == pytest.approx(exact, abs=1e-6)
    soft_eta = eta.clone().requires_grad_(True)
    selective_surrogate(soft_eta, y, rule, scale=0.1, sample_weights=weights).backward()
    assert torch.isfinite(soft_eta.grad).all() and soft_eta.grad.abs().sum() > 0


def test_training_rejects_inputs_that_do_not_fit_the_gate(splits):
    probs_fit, y_fit, probs_val, y_val = splits
    with pytest.raises(ValueError, match="3 experts"):
        train_pretrain(GatingNet(3), probs_fit[:, :2], y_fit, probs_val, y_val, num_classes=C, epochs=1,
                       batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="num_classes"):
        train_pretrain(GatingNet(3), probs_fit, y_fit, probs_val, y_val, num_classes=C + 1, epochs=1,
                       batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="objective"):
        _selective(GatingNet(3), splits, objective="mean")
    with pytest.raises(ValueError, match="y_val"):
        train_selective(GatingNet(3), probs_fit, y_fit, probs_val, np.zeros(3), CLASS_TO_GROUP, cost=0.3,
                        objective="worst", rounds=1, epochs_per_round=1, batch_size=8, lr=1e-3)


def _gate_on_expert_m(splits):
    """A gate that gives nearly all weight to the half-right expert M, whatever the sample."""
    gate = GatingNet(3)
    gate.set_standardisation(gating_features(splits[0]))
    with torch.no_grad():
        gate.mlp[-1].bias.copy_(torch.tensor([-8.0, -8.0, 8.0]))
    return gate


def test_uniform_start_replaces_a_gate_that_is_worse_than_plain_averaging(splits):
    gate = _gate_on_expert_m(splits)
    result = _selective(gate, splits, rounds=0, select_by="aurc", uniform_start=True)
    row = result.history[0]
    assert row["start_uniform"] == 1.0
    assert row["val_worst_aurc"] < row["val_worst_aurc_given"]
    weights = gate_weights(gate, splits[2])
    assert torch.allclose(weights, torch.full_like(weights, 1 / 3))


def _one_good_expert(seed):
    """Posteriors [N, 3, C]: expert 0 is right 90% of the time, experts 1 and 2 are confidently wrong
    on every sample, so plain averaging is far worse than listening to expert 0."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(torch.as_tensor(COUNTS) * 4)
    n = y.shape[0]

    def peaked(target):
        p = torch.full((n, C), 0.05 / (C - 1))
        p[torch.arange(n), target] = 0.95
        return p

    wrong = lambda: (y + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C  # noqa: E731
    good = torch.where(torch.rand(n, generator=g) < 0.9, y, wrong())
    return torch.stack([peaked(good), peaked(wrong()), peaked(wrong())], dim=1), y


def test_uniform_start_keeps_a_gate_that_beats_plain_averaging():
    probs_fit, y_fit = _one_good_expert(0)
    probs_val, y_val = _one_good_expert(1)
    gate = GatingNet(3)
    gate.set_standardisation(gating_features(probs_fit))
    with torch.no_grad():
        gate.mlp[-1].bias.copy_(torch.tensor([8.0, -8.0, -8.0]))
    before = gate_weights(gate, probs_val)
    result = _selective(gate, (probs_fit, y_fit, probs_val, y_val), rounds=0, select_by="aurc", uniform_start=True)
    assert result.history[0]["start_uniform"] == 0.0
    assert result.history[0]["val_worst_aurc"] == result.history[0]["val_worst_aurc_given"]
    assert not result.kept_uniform and result.uniform_gap[2] < 0  # better beyond val's noise
    assert torch.equal(gate_weights(gate, probs_val), before)


def test_a_gain_over_the_uniform_mixture_within_val_noise_is_not_taken(splits):
    # A gate a hair away from uniform: whichever of the two wins round 0 on val, the difference is
    # far inside the bootstrap interval, so the gate returned is the uniform mixture itself.
    gate = GatingNet(3)
    gate.set_standardisation(gating_features(splits[0]))
    with torch.no_grad():
        gate.mlp[-1].bias.copy_(torch.tensor([0.02, 0.0, -0.02]))
    result = _selective(gate, splits, rounds=0, select_by="aurc", uniform_start=True)
    assert result.kept_uniform
    if result.uniform_gap is not None:
        assert result.uniform_gap[1] <= 0 <= result.uniform_gap[2]
    weights = gate_weights(gate, splits[2])
    assert torch.allclose(weights, torch.full_like(weights, 1 / 3))
    assert result.chosen["val_worst_aurc"] == pytest.approx(
        min(result.history[0]["val_worst_aurc"], result.history[0]["val_worst_aurc_given"]), abs=0.05)


def test_select_by_aurc_keeps_the_round_with_the_lowest_val_aurc_and_that_is_the_gate_returned(splits):
    gate = _gate_on_expert_m(splits)
    result = _selective(gate, splits, rounds=2, select_by="aurc")
    values = [row["val_worst_aurc"] for row in result.history]
    assert values[result.best_round] == min(values)
    # recomputed independently of the loop, from the gate it returned
    probs_fit, y_fit, probs_val, y_val = splits
    with torch.no_grad():
        gate.eval()
        eta = {"tunev": gated_mixture(gate, probs_fit).double(), "val": gated_mixture(gate, probs_val).double()}
    again = matched_aurc(eta, {"tunev": y_fit, "val": y_val}, None, CLASS_TO_GROUP, "worst", split="val",
                         fit_options=FitOptions(rounds=4, n_starts=6), judged=True)
    assert again == pytest.approx(values[result.best_round], rel=1e-6)
