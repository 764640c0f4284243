"""Selective-classification metrics, all weighted: errors at a decision, risk-coverage curves, AURC,
Chow's baseline and ECE.

Convention: a group with no accepted mass has error 1.0 (likewise the overall error when nothing is
accepted), so rejecting a whole group is never rewarded with a zero error.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Optional

import torch

from argse.selective import checks as check


@dataclass(frozen=True)
class SelectiveErrors:
    """Errors of one set of decisions. Group k means the true label lies in group k."""

    coverage: float  #: P(accept)
    group_coverage: torch.Tensor  #: [K] P(accept | y in G_k); 0.0 for a group absent from y
    group_error: torch.Tensor  #: [K] e_k = P(pred != y | accept, y in G_k); 1.0 with no accepted mass
    balanced_error: float  #: mean_k e_k
    worst_error: float  #: max_k e_k
    overall_error: float  #: P(pred != y | accept); 1.0 when nothing is accepted

    def balanced_l2r(self, cost: float) -> float:
        """The balanced L2R risk mean_k e_k + cost * P(reject)."""
        return l2r_risk(self.balanced_error, self.coverage, cost)

    def worst_l2r(self, cost: float) -> float:
        """The worst-group L2R risk max_k e_k + cost * P(reject)."""
        return l2r_risk(self.worst_error, self.coverage, cost)


def l2r_risk(error: Any, coverage: Any, cost: float) -> Any:
    """The L2R risk error + cost * P(reject) of a rule with this (balanced, worst or beta-weighted)
    error and coverage; floats or tensors of matching shapes."""
    return error + cost * (1.0 - coverage)


def weighted_coverage(accept: torch.Tensor, weights: torch.Tensor) -> float:
    """P(accept) of an accept mask [N] under sample weights [N]: sum_i w_i [accept_i] / sum_i w_i."""
    return float((accept.to(torch.float64) * weights).sum() / weights.sum())


def _ratio(num: torch.Tensor, den: torch.Tensor, empty: float) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, empty))


def group_errors(accepted: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """e_k = P(wrong | accept, y in G_k) from the accepted weight and the accepted-and-wrong weight of
    each group (any matching shapes); 1.0 for a group with no accepted mass."""
    return _ratio(wrong, accepted, 1.0)


def effective_count(accepted: torch.Tensor, accepted_sq: torch.Tensor) -> torch.Tensor:
    """The effective number of accepted samples (sum w)^2 / sum w^2 of each group (the count itself
    with unit weights; 0 where nothing is accepted)."""
    return _ratio(accepted * accepted, accepted_sq, 0.0)


#: The one-sided confidence of the bound a group's error is judged by wherever a rule, an iterate, a
#: threshold or a gate is chosen on a split (`error_bound`).
EVIDENCE_LEVEL = 0.95
#: A group with fewer accepted samples than this on a split has an error that the split cannot tell:
#: tables count such operating points (`thin_group_points`) and figures mark them.
MIN_GROUP_ACCEPTED = 10


def error_bound(accepted: torch.Tensor, wrong: torch.Tensor, accepted_sq: torch.Tensor,
                level: float = EVIDENCE_LEVEL) -> torch.Tensor:
    """The upper end of Wilson's one-sided `level` interval of each group error, from the accepted
    weight, the accepted-and-wrong weight and the accepted squared weight of the group (any matching
    shapes). The sample size is the accepted samples' effective count n = (sum w)^2 / sum w^2 (the
    count itself with unit weights), so weighted samples are not mistaken for more evidence than they
    are. A group with one error-free sample is judged about 0.73, with ten 0.21, with 100 0.026; an
    empty group 1.0; the bound falls to the measured error as the count grows.

    This is how a group's error is judged when a choice is made on a split: an error measured on a
    handful of samples never looks better than one measured on many (the winner's curse of choosing
    the rule whose tail happened to be right on the one tail sample it accepted)."""
    z2 = NormalDist().inv_cdf(float(level)) ** 2
    p = group_errors(accepted, wrong)
    n = effective_count(accepted, accepted_sq)
    safe = n.clamp_min(1e-300)
    centre = p + z2 / (2 * safe)
    spread = (z2 * (p * (1 - p) / safe + z2 / (4 * safe * safe))).sqrt()
    bound = ((centre + spread) / (1 + z2 / safe)).clamp(max=1.0)
    return torch.where(n > 0, bound, torch.ones_like(bound))


def selective_errors(
    pred: check.ArrayLike,
    accept: check.ArrayLike,
    y: check.ArrayLike,
    class_to_group: check.ArrayLike,
    weights: Optional[check.ArrayLike] = None,
) -> SelectiveErrors:
    """Coverage, per-group coverage and error, balanced, worst and overall error of the decisions
    (pred [N], accept [N]) against labels y [N], under sample weights [N] (None: all ones)."""
    device = pred.device if isinstance(pred, torch.Tensor) else None
    c2g, n_groups = check.class_to_group(class_to_group, device)
    n_classes = c2g.shape[0]
    y = check.labels(y, "y", None, n_classes, device)
    n = y.shape[0]
    if n == 0:
        raise ValueError("y must hold at least one label.")
    pred = check.labels(pred, "pred", n, n_classes, y.device)
    accept = check.flags(accept, "accept", n, y.device)
    w = check.weights(weights, "weights", n, y.device)
    by_group = torch.nn.functional.one_hot(c2g.to(y.device)[y], n_groups).to(torch.float64) * w[:, None]
    acc = accept.to(torch.float64)
    wrong = (accept & (pred != y)).to(torch.float64)
    accepted = acc @ by_group
    errors = group_errors(accepted, wrong @ by_group)
    total = float(w.sum())
    return SelectiveErrors(
        coverage=float(accepted.sum()) / total,
        group_coverage=_ratio(accepted, by_group.sum(dim=0), 0.0),
        group_error=errors,
        balanced_error=float(errors.mean()),
        worst_error=float(errors.max()),
        overall_error=float(_ratio(wrong.dot(w), acc.dot(w), 1.0)),
    )


@dataclass(frozen=True)
class RiskCoverage:
    """A risk-coverage curve: entry n-1 describes accepting the n most confident samples."""

    confidence: torch.Tensor  #: [N] the confidences, sorted in decreasing order
    coverage: torch.Tensor  #: [N] accepted weight / total weight
    balanced: torch.Tensor  #: [N] mean_k e_k
    worst: torch.Tensor  #: [N] max_k e_k
    standard: torch.Tensor  #: [N] P(pred != y | accept)
    group_error: torch.Tensor  #: [N, K] e_k


def risk_coverage(
    confidence: check.ArrayLike,
    pred: check.ArrayLike,
    y: check.ArrayLike,
    class_to_group: check.ArrayLike,
    weights: Optional[check.ArrayLike] = None,
) -> RiskCoverage:
    """Balanced, worst-group and standard risk when accepting the n most confident samples, for every
    n = 1..N, by one sort and per-group cumulative sums (O(N log N), exact).

    Ties: within a run of equal confidences the samples cannot be separated by a threshold, so they
    are accepted fractionally and in equal proportion: each cumulative sum (accepted mass and errors,
    per group) is interpolated linearly in n between the counts before and after the run. The point at
    the end of each run is exact, and the curve does not depend on the input order. Groups with no
    accepted mass count as error 1.0.
    """
    device = confidence.device if isinstance(confidence, torch.Tensor) else None
    conf = check.scores(confidence, "confidence", device=device)
    n = conf.shape[0]
    c2g, n_groups = check.class_to_group(class_to_group, conf.device)
    pred = check.labels(pred, "pred", n, c2g.shape[0], conf.device)
    y = check.labels(y, "y", n, c2g.shape[0], conf.device)
    w = check.weights(weights, "weights", n, conf.device)

    conf, order = conf.sort(descending=True, stable=True)
    y, pred, w = y[order], pred[order], w[order]
    mass = torch.nn.functional.one_hot(c2g[y], n_groups).to(torch.float64) * w[:, None]
    zero = mass.new_zeros(1, n_groups)
    cum_mass = torch.cat([zero, mass.cumsum(dim=0)])  # row n: the n most confident
    cum_wrong = torch.cat([zero, (mass * (pred != y)[:, None]).cumsum(dim=0)])

    _, run_length = torch.unique_consecutive(conf, return_counts=True)
    run_end = run_length.cumsum(dim=0)
    start = torch.repeat_interleave(run_end - run_length, run_length)
    end = torch.repeat_interleave(run_end, run_length)
    count = torch.arange(1, n + 1, device=conf.device)
    frac = ((count - start).to(torch.float64) / (end - start).to(torch.float64))[:, None]
    exact = (count == end)[:, None]

    def at_count(cum: torch.Tensor) -> torch.Tensor:
        interpolated = cum[start] + frac * (cum[end] - cum[start])
        return torch.where(exact, cum[count], interpolated)

    accepted, wrong = at_count(cum_mass), at_count(cum_wrong)
    group_error = group_errors(accepted, wrong)
    return RiskCoverage(
        confidence=conf,
        coverage=accepted.sum(dim=1) / w.sum(),
        balanced=group_error.mean(dim=1),
        worst=group_error.max(dim=1).values,
        standard=_ratio(wrong.sum(dim=1), accepted.sum(dim=1), 1.0),
        group_error=group_error,
    )


def aurc(curve: Any, risk: str = "balanced", min_coverage: float = 0.0) -> float:
    """Area under a risk-coverage curve over coverage in [min_coverage, 1].

    `curve` is a `RiskCoverage` (anything with `coverage` and the named risk);
    `risk` is "balanced", "worst" or "standard". The points, sorted by coverage, are joined by straight
    lines (trapezoids) and the curve is extended flat to coverage 0 (the risk of its lowest-coverage
    point) and to 1 (that of its highest). The area is not normalised: divide by (1 - min_coverage)
    for the mean risk over the range.
    """
    if risk not in ("balanced", "worst", "standard") or not hasattr(curve, risk):
        raise ValueError(f"risk must be one of 'balanced', 'worst', 'standard' that the curve has; got {risk!r}.")
    if not hasattr(curve, "coverage"):
        raise ValueError("curve must have a coverage attribute (a RiskCoverage).")
    lo = float(min_coverage)
    if not 0.0 <= lo < 1.0:
        raise ValueError(f"min_coverage must lie in [0, 1); got {min_coverage}.")
    x = check.scores(curve.coverage, "curve.coverage").cpu()
    r = check.scores(getattr(curve, risk), f"curve.{risk}", x.shape[0]).cpu()
    return area_under(x, r, lo)


def area_under(x: torch.Tensor, r: torch.Tensor, lo: float) -> float:
    """The area of `aurc` for validated float64 points (coverage x [M], risk r [M])."""
    x, order = x.sort(stable=True)
    r = r[order]
    x = torch.cat([x.new_zeros(1), x.clamp(0.0, 1.0), x.new_ones(1)])
    r = torch.cat([r[:1], r, r[-1:]])
    left, right = x[:-1], x[1:]
    width = right - left
    start = left.clamp_min(lo)
    t = torch.where(width > 0, (start - left) / width.clamp_min(1e-300), torch.zeros_like(width))
    r_start = r[:-1] + t * (r[1:] - r[:-1])
    area = ((right - start).clamp_min(0.0) * (r_start + r[1:]) / 2).sum()
    return float(area)


def chow(probs: check.ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Chow's rule: predict argmax_y p_y, with confidence max_y p_y (reject the least confident)."""
    device = probs.device if isinstance(probs, torch.Tensor) else None
    p = check.posteriors(probs, "probs", device=device)
    confidence, pred = p.max(dim=1)
    return pred, confidence


def ece(
    probs: check.ArrayLike, y: check.ArrayLike, n_bins: int = 15, weights: Optional[check.ArrayLike] = None,
) -> float:
    """Expected calibration error of the top-label confidence, with `n_bins` equal-width bins
    (lo, hi] on [0, 1] (a confidence of exactly 0 falls in the first): sum_b P(bin b) |acc_b - conf_b|."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1; got {n_bins!r}.")
    device = probs.device if isinstance(probs, torch.Tensor) else None
    p = check.posteriors(probs, "probs", device=device)
    confidence, pred = p.max(dim=1)
    n = confidence.shape[0]
    y = check.labels(y, "y", n, p.shape[1], confidence.device)
    w = check.weights(weights, "weights", n, confidence.device)
    edges = torch.linspace(0.0, 1.0, int(n_bins) + 1, dtype=torch.float64, device=confidence.device)[1:-1]
    b = torch.bucketize(confidence, edges, right=False)
    mass = torch.zeros(int(n_bins), dtype=torch.float64, device=confidence.device).index_add_(0, b, w)
    hits = torch.zeros_like(mass).index_add_(0, b, w * (pred == y))
    conf = torch.zeros_like(mass).index_add_(0, b, w * confidence)
    return float((hits - conf).abs().sum() / w.sum())
