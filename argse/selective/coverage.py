"""Fitting the plug-in rejector for a coverage: the operating points of the coverage-matched
comparison (docs/design.md, *The rule*), and per-group thresholds for per-group coverage targets.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch

from argse.selective import checks as check
from argse.selective.cut import threshold_at_level
from argse.selective.fit import FitOptions
from argse.selective.fixed_point import Solved, exponentiated_gradient, iterate
from argse.selective.metrics import MIN_GROUP_ACCEPTED
from argse.selective.problem import Problem, Tally, at_level, pooled, prepare_problem, tally
from argse.selective.rule import PluginRule, WorstFitHistory, margins
from argse.selective.search import LEVELS, SMOOTH_LEVELS, coordinates, rule_of, search, smoothed, spans


def _solve_at_levels(problem: Problem, options: FitOptions, level: torch.Tensor, beta: torch.Tensor,
                     init: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Solved:
    """T coverage-constrained fits at once (beta [T, K], level [T]): the joint (alpha, mu) fixed point
    on S1 with the acceptance set held at the top share level[t] of S1 (the threshold, hence the
    common shift of mu, is set by the level, not by a cost), from several starts (plus `init`, [T, K]
    each); each problem keeps the iterate with the lowest sum_k beta_k e_k on S2 (each e_k judged by
    its upper bound, `error_bound`), where S2's threshold is likewise set to accept the top share
    level[t]."""

    def evaluate(coef: torch.Tensor, mu: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, Tally, Tally]:
        sel = at_level(problem.sel, coef, mu, level[owner])
        risk = (sel.judged(problem.evidence) * beta[owner]).sum(dim=1)
        return risk, at_level(problem.fit, coef, mu, level[owner]), sel

    best = iterate(problem.fit, beta, options.n_starts, options.max_iter, evaluate, init)
    return Solved(alpha=best.alpha, mu=best.mu, group_error=best.sel.errors(),
                  judged_error=best.sel.judged(problem.evidence), coverage=level, risk=best.score)


def _search_at_levels(problem: Problem, options: FitOptions, objective: str, level: torch.Tensor, beta: torch.Tensor,
                      alpha: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T rules (alpha, mu [T, K], for group weights beta [T, K]) moved by the direct search of the
    family (`argse.selective.search`) to the rule with the lowest criterion of the objective at
    coverage level[t]: sum_k beta_k e_k ("balanced") or max_k e_k ("worst"), each e_k judged by its
    upper bound on S2 (on S1 and S2 together unless `options.search` is "selection"). When it is
    "smoothed", the criterion is averaged over the neighbouring rules (`argse.selective.search.smoothed`)
    below full coverage; at full coverage nothing is rejected, every sample of both splits is evidence,
    and the rule is the family's optimum there (tests/test_selective_optimum.py)."""
    k = problem.n_groups
    coef = k * beta / alpha

    def score(theta: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        coef, mu = rule_of(theta, k)
        sel = at_level(problem.sel, coef, mu, level[owner])
        if options.search != "selection":
            sel = pooled(at_level(problem.fit, coef, mu, level[owner]), sel, problem.fit_share)
        judged = sel.judged(problem.evidence)
        return (judged * beta[owner]).sum(dim=1) if objective == "balanced" else judged.max(dim=1).values

    levels = LEVELS
    if options.search == "smoothed":
        score, levels = smoothed(score, k, 2 * (k - 1), (level < 1.0).to(torch.float64)), SMOOTH_LEVELS
    theta, _ = search(score, coordinates(coef, mu), spans(k, False, problem.device), levels=levels)
    coef, mu = rule_of(theta, k)
    return k * beta / coef, mu


def fit_at_coverage(
    eta_fit: check.ArrayLike,
    y_fit: check.ArrayLike,
    eta_sel: check.ArrayLike,
    y_sel: check.ArrayLike,
    class_to_group: check.ArrayLike,
    coverages: Union[float, Sequence[float]],
    *,
    objective: str = "balanced",
    weights_fit: Optional[check.ArrayLike] = None,
    weights_sel: Optional[check.ArrayLike] = None,
    options: Optional[FitOptions] = None,
    **overrides: Any,
) -> list[PluginRule]:
    """One plug-in rule per target coverage tau, fitted *for* that coverage (docs/design.md, *The rule*).

    The paper's rule family with the acceptance level as the constraint instead of a cost: alpha and
    mu iterate the fixed point of `fit_balanced` on the fitting split with the acceptance set held at
    the top share tau of it; the iterate with the lowest sum_k beta_k e_k on the selection split (at
    coverage tau there too) is kept. For `objective="worst"` beta follows the exponentiated gradient
    of `fit_worst` at a pace scaled to the coverage (beta_k <- beta_k * exp(step / tau * e_k)), and the
    round with the lowest max_k e_k on the selection split is kept (its record is `rule.history`, with
    `coverage` the selection split's). The errors of the accepted shrink with the coverage (the least
    confident are rejected first), and a fixed step's move with them: at tau = 0.2 every e_k is a few
    hundredths, beta moves a few percent a round and `rounds` do not reach the worst-group optimum's
    weights; step / tau keeps the paper's step at full coverage.
    Every e_k that a choice or the update of beta reads is judged by its upper confidence bound on the
    selection split at one-sided confidence `evidence` (`argse.selective.metrics.error_bound`; see
    `FitOptions`, whose fields `options` and `overrides` set): at a low coverage the rule that accepts
    one tail sample, correctly, is not mistaken for one with a perfect tail.
    Finally mu is shifted by a common amount so that the rule, with cost 0, accepts exactly the top
    share tau of the selection split (samples tied at the threshold are accepted together). Where
    that rule accepts fewer than `MIN_GROUP_ACCEPTED` samples of a group that has them on the
    selection split, the same rule with one threshold per predicted group, each accepting the top
    share tau of its group there (`fit_group_thresholds`' family), competes with it, judged the same
    way; that rule always accepts a share of every group, so the fit reaches the coverage without
    emptying a group wherever another rule of the family can.

    `coverages` is one tau or a sequence, each in (0, 1]; the result is a list in the same order.
    """
    options = FitOptions.of(options, overrides)
    objective = check.objective(objective)
    taus = [coverages] if isinstance(coverages, (int, float)) else list(coverages)
    if not taus or any(not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0 for v in taus):
        raise ValueError(f"coverages must be one or more numbers in (0, 1]; got {coverages!r}.")
    problem = prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel,
                              options.evidence)
    k = problem.n_groups
    level = torch.tensor([float(v) for v in taus], dtype=torch.float64, device=problem.device)
    pace = options.step / level[:, None]  # the step at coverage tau: step / tau (see the docstring)
    record = exponentiated_gradient(lambda beta, init: _solve_at_levels(problem, options, level, beta, init),
                                    problem.uniform_beta(len(taus)), pace,
                                    options.rounds if objective == "worst" else 1)

    rows = [solved for _, solved in record]
    histories = [WorstFitHistory.of_rounds(
        beta=torch.stack([b[j] for b, _ in record]), alpha=torch.stack([s.alpha[j] for s in rows]),
        mu=torch.stack([s.mu[j] for s in rows]), group_error=torch.stack([s.group_error[j] for s in rows]),
        judged_error=torch.stack([s.judged_error[j] for s in rows]),
        coverage=torch.full((len(rows),), tau, dtype=torch.float64),
        worst_risk=torch.stack([s.judged_error[j].max() for s in rows])) for j, tau in enumerate(level.tolist())]
    chosen = [(record[h.best_round][0][j], record[h.best_round][1].alpha[j], record[h.best_round][1].mu[j])
              for j, h in enumerate(histories)]
    beta, alpha, mu = (torch.stack(part) for part in zip(*chosen))
    if options.search != "none":
        alpha, mu = _search_at_levels(problem, options, objective, level, beta, alpha, mu)
    rules = []
    for j, tau in enumerate(level.tolist()):  # a loop over target coverages
        coef = k * beta[j] / alpha[j]
        _, margin, _ = margins(problem.sel.stats, coef[None], mu[j][None])
        shifted = mu[j] - threshold_at_level(margin[0], problem.sel.weight, tau)
        thresholds = group_floor(problem, objective, coef, shifted, beta[j], tau)
        rules.append(PluginRule(alpha=alpha[j].cpu(), mu=shifted.cpu(), beta=beta[j].cpu(), cost=0.0,
                                class_to_group=problem.class_to_group.cpu(),
                                history=histories[j] if objective == "worst" else None,
                                thresholds=None if thresholds is None else thresholds.cpu()))
    return rules


def group_floor(problem: Problem, objective: str, coef: torch.Tensor, mu: torch.Tensor, beta: torch.Tensor,
                tau: float) -> Optional[torch.Tensor]:
    """Per-group thresholds [K] for the rule (coef, mu) at coverage tau when they judge better on the
    selection split than its single threshold 0, else None. They are tried only where the single
    threshold accepts fewer than `MIN_GROUP_ACCEPTED` samples of a group that has at least that many
    there: each predicted group then accepts its own top share tau (by margin), so no group that the
    rule predicts is left empty, and the overall coverage stays tau."""
    sel = problem.sel
    group, margin, _ = margins(sel.stats, coef[None], mu[None])
    group, margin = group[0], margin[0]
    counts = (margin >= 0).to(torch.float64) @ sel.members
    present = sel.members.sum(dim=0)
    if not bool((counts < torch.clamp(present, max=MIN_GROUP_ACCEPTED)).any()):
        return None
    thresholds = torch.zeros(problem.n_groups, dtype=torch.float64, device=margin.device)
    for g in range(problem.n_groups):  # a loop over groups, not samples
        members = group == g
        if bool(members.any()) and float(sel.weight[members].sum()) > 0:
            thresholds[g] = threshold_at_level(margin[members], sel.weight[members], tau)
    _, _, wrong = margins(sel.stats, coef[None], mu[None], sel.wrong)
    accept = torch.stack([margin >= 0, margin >= thresholds[group]])
    judged = tally(sel, accept, wrong.expand(2, -1)).judged(problem.evidence)
    score = judged.max(dim=1).values if objective == "worst" else judged @ beta
    return thresholds if float(score[1]) < float(score[0]) else None



def fit_group_thresholds(
    rule: PluginRule,
    eta: check.ArrayLike,
    target_coverage: Union[float, Sequence[float], check.ArrayLike],
    *,
    weights: Optional[check.ArrayLike] = None,
) -> PluginRule:
    """The rule with one threshold per predicted group, so that each group reaches a target coverage.

    Among the samples of `eta` whose predicted class lies in group k, threshold t_k is the weighted
    quantile of the margins such that a share of at least `target_coverage[k]` has margin >= t_k (a
    float applies to every group). A target of 0 gives t_k = +inf (reject the group); a group that is
    never predicted keeps -rule.cost. The returned rule accepts iff margin >= t_(predicted group); the
    cost no longer enters its decisions.
    """
    if not isinstance(rule, PluginRule):
        raise ValueError(f"rule must be a PluginRule; got {type(rule).__name__}.")
    n_groups = rule.n_groups
    if isinstance(target_coverage, (int, float)):
        target = torch.full((n_groups,), float(target_coverage), dtype=torch.float64)
    else:
        target = check.vector(target_coverage, "target_coverage", n_groups, torch.device("cpu"))
    if not bool(torch.isfinite(target).all()) or bool((target < 0).any()) or bool((target > 1).any()):
        raise ValueError("target_coverage must be a coverage in [0, 1] (one float, or one per group).")
    decision = rule.with_thresholds(None).predict(eta)
    w = check.weights(weights, "weights", decision.margin.shape[0], decision.margin.device)
    thresholds = torch.full((n_groups,), -rule.cost, dtype=torch.float64)
    for k in range(n_groups):  # a loop over groups, not samples
        members = decision.group == k
        mass = float(w[members].sum())
        if mass <= 0:
            continue
        if float(target[k]) <= 0:
            thresholds[k] = math.inf
            continue
        margin, order = decision.margin[members].sort(descending=True, stable=True)
        cum = w[members][order].cumsum(dim=0) / mass
        take = min(int((cum < float(target[k]) - 1e-12).sum()) + 1, margin.shape[0])
        thresholds[k] = float(margin[take - 1])
    return rule.with_thresholds(thresholds)
