"""Temperature scaling (Guo et al. 2017): one temperature per expert, fitted by minimising NLL, and
the calibration of a trained expert that its run logs (:func:`calibrate`).

The fit searches log T on a bounded interval. The NLL of softmax(z / T) is convex in 1 / T, hence
unimodal in log T, so a golden-section search finds the minimiser without gradients, step sizes or
restarts; when the minimiser lies outside the interval the nearest bound is returned.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from argse.selective import checks as check
from argse.selective import ece
from argse.training.experts import accuracy_metrics

T_MIN = 1e-2
T_MAX = 1e2
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def nll(
    logits: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray | None = None,
) -> float:
    """(Weighted) mean negative log-likelihood of softmax(logits) at the labels."""
    z, labels, w = _validate(logits, y, weights)
    return _weighted_nll(z, labels, w)


def fit_temperature(
    logits: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray | None = None,
) -> float:
    """The temperature T in [1e-2, 1e2] minimising the (weighted) NLL of softmax(logits / T)."""
    z, labels, w = _validate(logits, y, weights)

    def objective(log_t: float) -> float:
        return _weighted_nll(z / math.exp(log_t), labels, w)

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    a = hi - _GOLDEN * (hi - lo)
    b = lo + _GOLDEN * (hi - lo)
    fa, fb = objective(a), objective(b)
    while hi - lo > 1e-7:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = objective(b)
    best = (lo + hi) / 2.0
    # The interval ends are candidates too: the search never evaluates them exactly.
    candidates = [(objective(u), u) for u in (best, math.log(T_MIN), math.log(T_MAX))]
    return float(math.exp(min(candidates)[1]))


def calibrate(raw: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], class_to_group: np.ndarray,
              group_names: tuple[str, ...]) -> tuple[float, dict[str, float]]:
    """An expert's temperature, fitted on the ``val`` logits of ``raw`` (its uncalibrated logits per
    split), and what its run logs of it: the temperature, val's NLL and ECE before and after, and the
    accuracies per split and group (``final_<split>_<metric>``; a temperature changes none of them)."""
    temperature = fit_temperature(raw["val"], labels["val"])
    before, after = raw["val"], raw["val"] / temperature
    metrics = {
        "temperature": temperature,
        "val_nll_before": nll(before, labels["val"]), "val_nll_after": nll(after, labels["val"]),
        "val_ece_before": ece(before.softmax(1), labels["val"]), "val_ece_after": ece(after.softmax(1), labels["val"]),
    }
    for split, logits in raw.items():
        acc = accuracy_metrics(logits, labels[split], class_to_group, group_names)
        metrics.update({f"final_{split}_{k}": v for k, v in acc.items()})
    return temperature, metrics


def _weighted_nll(z: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None) -> float:
    losses = F.cross_entropy(z, labels, reduction="none")
    if w is None:
        return float(losses.mean())
    return float((losses * w).sum() / w.sum())


def _validate(
    logits: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    z = check.as_tensor(logits, "logits", torch.device("cpu")).to(torch.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape [N, C] with N >= 1 and C >= 2; got {list(z.shape)}.")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits must be finite; got NaN or infinite values.")
    labels = check.labels(y, "y", z.shape[0], z.shape[1], z.device)
    return z, labels, None if weights is None else check.weights(weights, "weights", z.shape[0], z.device)
