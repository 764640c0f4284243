"""A fitting problem: the fitting split S1 and the selection split S2 reduced to what a rule needs,
and what a batch of rules accepts on them.

Every fit validates its inputs here once; a split keeps the per-group sufficient statistics of its
posteriors (`argse.selective.rule.GroupStats`), so that a batch of S candidate rules is then evaluated
in O(S * N * K) tensor operations (`Tally`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from argse.selective import checks as check
from argse.selective.cut import accept_top
from argse.selective.metrics import EVIDENCE_LEVEL, error_bound, group_errors
from argse.selective.rule import GroupStats, group_stats, margins


@dataclass(frozen=True)
class Split:
    """A validated split reduced to what the rule needs; weights are normalised to sum to 1."""

    stats: GroupStats
    wrong: torch.Tensor  # [K, N] bool: the top class of group k is not the label
    by_group: torch.Tensor  # [N, W] float64: w_i * [g(y_i) == k] (W = K, or 2K for a stacked pair)
    weight: torch.Tensor  # [N] float64

    @property
    def members(self) -> torch.Tensor:
        """[N, W] 1.0 where sample i counts in mass column k (its group, with a positive weight)."""
        return (self.by_group > 0).to(torch.float64)

    @functools.cached_property
    def by_group_sq(self) -> torch.Tensor:
        """[N, W] w_i^2 * [g(y_i) == k]: what the effective accepted count of a group needs."""
        return self.by_group * self.weight[:, None]

    @property
    def prior(self) -> torch.Tensor:
        """[W] P(y in G_k)."""
        return self.by_group.sum(dim=0)


def prepare_split(
    eta: Any, y: Any, weights: Any, names: tuple[str, str, str], c2g: torch.Tensor, n_groups: int,
    device: Optional[torch.device] = None,
) -> Split:
    """One split, validated (`names` name its posteriors, labels and weights in the messages)."""
    eta = check.posteriors(eta, names[0], c2g.shape[0], device)
    y = check.labels(y, names[1], eta.shape[0], c2g.shape[0], eta.device)
    w = check.weights(weights, names[2], eta.shape[0], eta.device)
    w = w / w.sum()
    stats = group_stats(eta, c2g, n_groups)
    by_group = torch.nn.functional.one_hot(c2g.to(eta.device)[y], n_groups).to(torch.float64) * w[:, None]
    return Split(stats=stats, wrong=stats.top_class != y[None, :], by_group=by_group, weight=w)


def stack(fit: Split, sel: Split) -> Split:
    """S1 and S2 as one split whose first K mass columns are S1's and last K are S2's, so that one
    pass over the samples evaluates a batch of rules on both."""
    return Split(
        stats=GroupStats(
            top=torch.cat([fit.stats.top, sel.stats.top], dim=1),
            top_class=torch.cat([fit.stats.top_class, sel.stats.top_class], dim=1),
            mass=torch.cat([fit.stats.mass, sel.stats.mass], dim=1),
        ),
        wrong=torch.cat([fit.wrong, sel.wrong], dim=1),
        by_group=torch.block_diag(fit.by_group, sel.by_group),
        weight=torch.cat([fit.weight, sel.weight]),
    )


@dataclass(frozen=True)
class Problem:
    """The fitting split S1, the selection split S2, both stacked, the groups, and the confidence the
    errors measured on S2 are judged at (`FitOptions.evidence`)."""

    fit: Split
    sel: Split
    both: Split
    class_to_group: torch.Tensor
    n_groups: int
    evidence: Optional[float] = EVIDENCE_LEVEL

    @property
    def device(self) -> torch.device:
        return self.fit.weight.device

    @property
    def fit_share(self) -> float:
        """S1's share of the samples of S1 and S2 together."""
        n_fit, n_sel = self.fit.weight.shape[0], self.sel.weight.shape[0]
        return n_fit / (n_fit + n_sel)

    def uniform_beta(self, *batch: int) -> torch.Tensor:
        """Group weights 1/K each, [*batch, K]: the balanced error's, and where the worst group's
        exponentiated gradient starts."""
        return torch.full((*batch, self.n_groups), 1.0 / self.n_groups, dtype=torch.float64, device=self.device)


def prepare_problem(
    eta_fit: Any, y_fit: Any, eta_sel: Any, y_sel: Any, class_to_group: Any, weights_fit: Any, weights_sel: Any,
    evidence: Optional[float] = EVIDENCE_LEVEL,
) -> Problem:
    """The problem of a fit, every input validated with a sentence that names it."""
    device = eta_fit.device if isinstance(eta_fit, torch.Tensor) else None
    c2g, n_groups = check.class_to_group(class_to_group, device)
    fit = prepare_split(eta_fit, y_fit, weights_fit, ("eta_fit", "y_fit", "weights_fit"), c2g, n_groups, device)
    sel = prepare_split(eta_sel, y_sel, weights_sel, ("eta_sel", "y_sel", "weights_sel"), c2g, n_groups,
                        fit.weight.device)
    return Problem(fit=fit, sel=sel, both=stack(fit, sel), class_to_group=c2g, n_groups=n_groups,
                   evidence=check.evidence(evidence))


@dataclass(frozen=True)
class Tally:
    """What S decisions accept, per mass column, all [S, W]: the accepted weight, the accepted-and-wrong
    weight and the accepted squared weight (for the effective count of `error_bound`)."""

    accepted: torch.Tensor
    wrong: torch.Tensor
    accepted_sq: torch.Tensor

    def columns(self, which: slice) -> "Tally":
        return Tally(self.accepted[:, which], self.wrong[:, which], self.accepted_sq[:, which])

    def rows(self, which: Any) -> "Tally":
        return Tally(self.accepted[which], self.wrong[which], self.accepted_sq[which])

    def errors(self) -> torch.Tensor:
        """e_k as measured: P(wrong | accept, y in G_k); 1.0 for a group with no accepted mass."""
        return group_errors(self.accepted, self.wrong)

    def judged(self, evidence) -> torch.Tensor:
        """e_k as a choice judges it: the upper confidence bound of `error_bound` at one-sided
        confidence `evidence` (None: as measured; a function: what it gives for this tally)."""
        if evidence is None:
            return self.errors()
        if callable(evidence):
            return evidence(self)
        return error_bound(self.accepted, self.wrong, self.accepted_sq, evidence)


def pooled(fit: Tally, sel: Tally, fit_share: float) -> Tally:
    """The tally of S1 and S2 as one sample: each split's (normalised) weights scaled by its share of
    the samples, so that every sample counts as much as it did in its own split relative to the rest."""
    sel_share = 1.0 - fit_share
    return Tally(fit.accepted * fit_share + sel.accepted * sel_share, fit.wrong * fit_share + sel.wrong * sel_share,
                 fit.accepted_sq * fit_share ** 2 + sel.accepted_sq * sel_share ** 2)


def tally(split: Split, accept: torch.Tensor, wrong: torch.Tensor) -> Tally:
    """The `Tally` of S decisions [S, N] (accept masks, and the `wrong` flags of their predictions)."""
    s = accept.shape[0]
    flags = torch.cat([accept, accept & wrong]).view(torch.uint8).to(torch.float64)
    both = flags @ split.by_group
    return Tally(both[:s], both[s:], flags[:s] @ split.by_group_sq)


def at_cost(split: Split, coef: torch.Tensor, mu: torch.Tensor, cost: float) -> Tally:
    """The `Tally` of S rules (coef, mu [S, K]) with a single cost: each accepts margin >= -cost."""
    _, margin, wrong = margins(split.stats, coef, mu, split.wrong)
    return tally(split, margin >= -cost, wrong)


def at_level(split: Split, coef: torch.Tensor, mu: torch.Tensor, level: torch.Tensor) -> Tally:
    """The `Tally` of S rules (coef, mu [S, K]), each accepting the top share level[s] of the split."""
    _, margin, wrong = margins(split.stats, coef, mu, split.wrong)
    return tally(split, accept_top(margin, split.weight, level), wrong)
