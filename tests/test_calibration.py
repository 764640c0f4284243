"""Temperature scaling: recovers a known temperature, lowers NLL, honours weights, rejects bad
input."""

import numpy as np
import pytest
import torch

from argse.training.calibration import T_MAX, T_MIN, fit_temperature, nll


def _tempered(
    t_true: float, n: int = 20_000, c: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits t_true * z whose labels are drawn from softmax(z): the right temperature is t_true."""
    generator = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, c, generator=generator)
    y = torch.multinomial(torch.softmax(z, dim=1), 1, generator=generator).squeeze(1)
    return t_true * z, y, z


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t_true: float) -> None:
    logits, y, _ = _tempered(t_true)
    assert fit_temperature(logits, y) == pytest.approx(t_true, rel=0.05)


def test_fitted_temperature_lowers_nll_to_that_of_the_true_posterior() -> None:
    logits, y, z = _tempered(3.0)
    t = fit_temperature(logits, y)
    assert nll(logits / t, y) < nll(logits, y) - 0.1
    # In-sample, the fitted temperature is at least as good as the true one.
    assert nll(logits / t, y) <= nll(z, y) + 1e-9


def test_weights_change_the_fit_and_uniform_weights_do_not() -> None:
    logits, y, _ = _tempered(2.0)
    assert fit_temperature(logits, y, weights=torch.full((len(y),), 3.0)) == pytest.approx(
        fit_temperature(logits, y), rel=1e-4
    )
    # Weight only the confidently-right rows: sharper logits (a lower temperature) fit those better.
    right = (logits.argmax(1) == y).double()
    assert fit_temperature(logits, y, weights=right) < fit_temperature(logits, y)


def test_nll_matches_a_hand_computed_value_and_accepts_numpy() -> None:
    logits = np.array([[0.0, np.log(3.0)], [0.0, 0.0]])
    y = np.array([1, 0])
    expected = (-np.log(0.75) - np.log(0.5)) / 2
    assert nll(logits, y) == pytest.approx(expected)
    assert nll(logits, y, weights=np.array([1.0, 0.0])) == pytest.approx(-np.log(0.75))


def test_degenerate_logits_give_a_bounded_finite_temperature() -> None:
    y = torch.arange(5) % 3
    separable = 10 * torch.nn.functional.one_hot(y, 3).float()
    assert fit_temperature(separable, y) == pytest.approx(T_MIN)
    assert fit_temperature(-separable, y) == pytest.approx(T_MAX)
    assert fit_temperature(torch.zeros(5, 3), y) > 0


def test_bad_inputs_are_rejected_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D array of 4 class labels"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels in 0\.\.2"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="non-negative"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 1]), weights=torch.tensor([1.0, -1.0]))
