"""Long-tail losses: hand-computed values, the LogitAdjust/BalancedSoftmax identity, bad names."""

import math

import pytest
import torch
import torch.nn.functional as F

from argse.training.losses import EXPERTS, make_loss, posterior_shift

COUNTS = [6, 3, 1]


def _hand_ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


def test_each_expert_name_makes_the_loss_it_names() -> None:
    # By hand: CE on the logits; LogitAdjust, CE on logits + tau * log(prior); BalancedSoftmax, CE on
    # logits + log(counts). Three different values on the same batch.
    logits, y = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]), torch.tensor([0, 2])
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    by_hand = {"ce": F.cross_entropy(logits, y),
               "logitadjust": F.cross_entropy(logits + 2.0 * (counts / counts.sum()).log(), y),
               "balsoftmax": F.cross_entropy(logits + counts.log(), y)}
    assert set(by_hand) == set(EXPERTS)
    for name in EXPERTS:
        assert float(make_loss(name, COUNTS, la_tau=2.0)(logits, y)) == pytest.approx(float(by_hand[name]), rel=1e-6)
    assert len({round(float(v), 6) for v in by_hand.values()}) == 3


def test_ce_matches_a_hand_computed_value() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    loss = make_loss("ce", COUNTS)(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(_hand_ce([1.0, 2.0, 0.5], 0), rel=1e-6)


def test_logitadjust_adds_tau_log_prior_before_the_softmax() -> None:
    logits = [1.0, 2.0, 0.5]
    tau = 0.5
    shifted = [v + tau * math.log(n / 10) for v, n in zip(logits, COUNTS)]
    loss = make_loss("logitadjust", COUNTS, la_tau=tau)(torch.tensor([logits]), torch.tensor([2]))
    assert loss.item() == pytest.approx(_hand_ce(shifted, 2), rel=1e-6)


def test_balsoftmax_adds_log_counts_before_the_softmax() -> None:
    logits = [1.0, 2.0, 0.5]
    shifted = [v + math.log(n) for v, n in zip(logits, COUNTS)]
    loss = make_loss("balsoftmax", COUNTS)(torch.tensor([logits]), torch.tensor([1]))
    assert loss.item() == pytest.approx(_hand_ce(shifted, 1), rel=1e-6)


def test_logitadjust_at_tau_1_equals_balsoftmax_and_ce_differs() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 3, requires_grad=True)
    y = torch.randint(0, 3, (64,))
    la = make_loss("logitadjust", COUNTS, la_tau=1.0)(logits, y)
    bs = make_loss("balsoftmax", COUNTS)(logits, y)
    ce = make_loss("ce", COUNTS)(logits, y)
    assert la.item() == pytest.approx(bs.item(), abs=1e-6)
    (grad_la,) = torch.autograd.grad(la, logits)
    (grad_bs,) = torch.autograd.grad(bs, logits)
    assert torch.allclose(grad_la, grad_bs, atol=1e-7)
    assert abs(ce.item() - bs.item()) > 1e-2
    la_2 = make_loss("logitadjust", COUNTS, la_tau=2.0)(logits, y)
    assert la_2.item() != pytest.approx(bs.item())


def test_loss_is_a_mean_over_the_batch_and_works_on_bf16_logits() -> None:
    logits = torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    loss = make_loss("balsoftmax", COUNTS)
    expected = F.cross_entropy(logits + torch.log(torch.tensor(COUNTS, dtype=torch.float32)), y)
    assert loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(logits.bfloat16(), y).dtype == torch.float32


def test_unknown_loss_names_the_accepted_values() -> None:
    with pytest.raises(ValueError, match="ce, logitadjust, balsoftmax"):
        make_loss("focal", COUNTS)


def test_empty_class_and_wrong_class_count_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        make_loss("balsoftmax", [5, 0, 2])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        make_loss("ce", COUNTS)(torch.randn(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("name, tau", [("ce", 1.0), ("logitadjust", 1.0), ("logitadjust", 2.0), ("logitadjust", 0.5),
                                       ("balsoftmax", 1.0)])
def test_posterior_shift_recovers_the_posterior_under_each_target_prior(name: str, tau: float) -> None:
    # The logits a perfect expert of each loss would learn: softmax(f + a) is the train posterior, so
    # f = log P_train(y|x) - a. Shifted, they must give the train posterior back (target = train
    # prior) and, for the uniform prior, P_train(y|x) / pi(y) renormalised (Bayes' rule by hand).
    counts = torch.tensor([60.0, 25.0, 10.0, 5.0])
    prior = counts / counts.sum()
    train_posterior = torch.tensor([[0.70, 0.15, 0.10, 0.05], [0.10, 0.20, 0.30, 0.40], [0.25, 0.25, 0.25, 0.25]],
                                   dtype=torch.float64)
    adjustment = {"ce": torch.zeros(4), "logitadjust": tau * prior.log(), "balsoftmax": counts.log()}[name]
    logits = train_posterior.log() - adjustment.double()
    lt = torch.softmax(logits + posterior_shift(name, counts, prior, la_tau=tau), dim=1)
    assert torch.allclose(lt, train_posterior, atol=1e-6)
    uniform = torch.full((4,), 0.25)
    balanced = torch.softmax(logits + posterior_shift(name, counts, uniform, la_tau=tau), dim=1)
    by_hand = train_posterior / prior.double()
    assert torch.allclose(balanced, by_hand / by_hand.sum(dim=1, keepdim=True), atol=1e-6)


def test_posterior_shift_rejects_a_prior_of_the_wrong_size_or_with_zeros() -> None:
    with pytest.raises(ValueError, match="target_prior must be 3 positive class probabilities"):
        posterior_shift("ce", COUNTS, [0.5, 0.5])
    with pytest.raises(ValueError, match="target_prior must be 3 positive"):
        posterior_shift("ce", COUNTS, [1.0, 0.0, 0.0])
