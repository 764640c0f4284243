"""The experts' training losses: CE, LogitAdjust and BalancedSoftmax.

Each is a cross-entropy on logits shifted by a fixed per-class vector:

* ``ce``: no shift.
* ``logitadjust`` (Menon et al. 2021): ``f(x) + tau * log(pi)`` with ``pi = n / sum(n)`` the train
  class prior.
* ``balsoftmax`` (Ren et al. 2020): ``f(x) + log(n)`` with ``n`` the train class counts.

LogitAdjust at ``tau = 1`` and BalancedSoftmax coincide: ``log(pi) = log(n) - log(sum(n))`` differs
from ``log(n)`` by the same constant for every class, and softmax cross-entropy is unchanged by a
constant shift of all logits, so the two give the same loss and the same gradients. Both names are
kept because users expect them; ``tau`` lets LogitAdjust move away from BalancedSoftmax. The shift is
used in training only: the model's own logits ``f(x)`` are what the later stages consume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from argse import EXPERTS


class AdjustedCrossEntropy(nn.Module):
    """Mean cross-entropy of ``logits + adjustment`` against integer labels."""

    adjustment: torch.Tensor
    label_smoothing: float = 0.0  # F.cross_entropy's; make_loss sets it

    def __init__(self, adjustment: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("adjustment", adjustment.detach().to(torch.float32).clone())

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.adjustment.numel():
            raise ValueError(
                f"logits must have shape [N, {self.adjustment.numel()}] for this loss; "
                f"got {list(logits.shape)}."
            )
        shifted = logits.float() + self.adjustment.to(logits.device)
        return F.cross_entropy(shifted, y, label_smoothing=self.label_smoothing)


class CrossEntropy(AdjustedCrossEntropy):
    """Plain softmax cross-entropy."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(torch.zeros(num_classes))


class LogitAdjustLoss(AdjustedCrossEntropy):
    """LogitAdjust (Menon et al. 2021): cross-entropy on ``f(x) + tau * log(pi)``."""

    def __init__(self, class_counts: torch.Tensor, tau: float = 1.0) -> None:
        prior = class_counts / class_counts.sum()
        super().__init__(float(tau) * torch.log(prior))
        self.tau = float(tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class BalancedSoftmaxLoss(AdjustedCrossEntropy):
    """BalancedSoftmax (Ren et al. 2020): cross-entropy on ``f(x) + log(n)``."""

    def __init__(self, class_counts: torch.Tensor) -> None:
        super().__init__(torch.log(class_counts))


def make_loss(
    name: str,
    class_counts: Sequence[int] | np.ndarray | torch.Tensor,
    la_tau: float = 1.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The training loss of expert ``name``; its forward(logits [N, C], y [N]) returns a scalar.

    ``class_counts`` are the train images per class (each at least 1); ``la_tau`` is LogitAdjust's
    tau and is ignored by the other losses; ``label_smoothing`` smooths the targets of any of them.
    """
    if name not in EXPERTS:
        raise ValueError(f"expert loss must be one of {', '.join(EXPERTS)}; got {name!r}.")
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().to(device="cpu", dtype=torch.float64).flatten()
    else:
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).flatten()
    if counts.numel() < 2:
        raise ValueError(
            f"class_counts needs one count per class (at least 2); got {counts.numel()}."
        )
    if not bool(torch.all(counts >= 1)):
        empty = torch.nonzero(counts < 1).flatten().tolist()
        raise ValueError(
            f"class_counts must be at least 1 for every class; classes {empty[:10]} have none."
        )
    if name == "ce":
        loss = CrossEntropy(counts.numel())
    elif name == "logitadjust":
        loss = LogitAdjustLoss(counts, tau=la_tau)
    else:
        loss = BalancedSoftmaxLoss(counts)
    loss.label_smoothing = float(label_smoothing)
    return loss


def posterior_shift(
    name: str,
    class_counts: Sequence[int] | np.ndarray | torch.Tensor,
    target_prior: Sequence[float] | np.ndarray | torch.Tensor,
    la_tau: float = 1.0,
) -> torch.Tensor:
    """The per-class shift [C] (float64) that turns the logits f(x) of an expert trained with loss
    ``name`` into its posterior under ``target_prior``: ``softmax(f(x) + shift)``.

    The loss fits softmax(f + a) to the train posterior, with a its adjustment (0 for ce,
    tau * log(pi) for logitadjust, log(n) for balsoftmax). Bayes' rule moves a posterior from the
    train prior pi to a target prior pi_t, so shift = a + log(pi_t) - log(pi), up to a constant. Without
    it, a logitadjust or balsoftmax expert gives the posterior under the prior pi ** (1 - tau) (uniform
    at tau = 1), while ce gives it under pi: mixing them, or handing them to the plug-in rule, which
    needs the posterior under the prior its errors are weighted by, mixes different quantities.
    """
    loss = make_loss(name, class_counts, la_tau)
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64)).flatten()
    target = torch.as_tensor(np.asarray(target_prior, dtype=np.float64)).flatten()
    if target.shape != counts.shape or not bool((target > 0).all()):
        raise ValueError(f"target_prior must be {counts.numel()} positive class probabilities; got shape {tuple(target.shape)}.")
    return loss.adjustment.double() + target.log() - (counts / counts.sum()).log()
