"""The paper's evaluation protocol: refit the rule for each rejection cost, evaluate it on test, and
summarise the (coverage, risk) points by their AURC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from argse.selective import _validate as check
from argse.selective.fit import FitOptions, _fit_objective, _prepare, _prepare_problem, _Split
from argse.selective.metrics import area_under, selective_errors
from argse.selective.rule import PluginRule, margins


@dataclass(frozen=True)
class CostSweep:
    """One point per cost, measured on the test split, and the areas under the resulting curves."""

    costs: torch.Tensor  #: [M] the costs, in the order given
    coverage: torch.Tensor  #: [M] P(accept) on test
    balanced: torch.Tensor  #: [M] balanced error on test
    worst: torch.Tensor  #: [M] worst-group error on test
    aurc_balanced: float  #: `aurc` of (coverage, balanced) over [min_coverage, 1]
    aurc_worst: float  #: `aurc` of (coverage, worst) over [min_coverage, 1]
    rules: tuple[PluginRule, ...]  #: the fitted rule of each cost


def cost_sweep(
    eta_fit: check.ArrayLike,
    y_fit: check.ArrayLike,
    eta_sel: check.ArrayLike,
    y_sel: check.ArrayLike,
    eta_test: check.ArrayLike,
    y_test: check.ArrayLike,
    class_to_group: check.ArrayLike,
    costs: Sequence[float],
    objective: str = "balanced",
    *,
    weights_fit: Optional[check.ArrayLike] = None,
    weights_sel: Optional[check.ArrayLike] = None,
    weights_test: Optional[check.ArrayLike] = None,
    min_coverage: float = 0.0,
    rounds: int = 20,
    step: float = 2.0,
    n_starts: int = 12,
    max_iter: int = 30,
) -> CostSweep:
    """For each cost, fit the rule on (fit, sel) with `fit_balanced` (objective "balanced") or
    `fit_worst` (objective "worst"), evaluate it on test, and return the points with their AURCs.
    `rounds` and `step` apply to "worst" only."""
    objective = check.objective(objective)
    min_coverage = float(min_coverage)
    if not 0.0 <= min_coverage < 1.0:
        raise ValueError(f"min_coverage must lie in [0, 1); got {min_coverage}.")
    cost_list = [check.cost(c, "costs") for c in check.as_tensor(costs, "costs").flatten().tolist()]
    if not cost_list:
        raise ValueError("costs must hold at least one cost >= 0.")
    problem = _prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel)
    c2g, n_groups, device = problem.class_to_group, problem.n_groups, problem.fit.weight.device
    test = _prepare(eta_test, y_test, weights_test, ("eta_test", "y_test", "weights_test"), c2g, n_groups, device)
    y_test_t = check.labels(y_test, "y_test", None, c2g.shape[0], device)
    options = FitOptions(rounds=rounds, step=step, n_starts=n_starts, max_iter=max_iter)
    rules, points = [], []
    for c in cost_list:  # a loop over costs
        rule = _fit_objective(problem, objective, c, options)
        accept, pred = _decide(rule, test)
        errors = selective_errors(pred, accept, y_test_t, c2g, test.weight)
        rules.append(rule)
        points.append((errors.coverage, errors.balanced_error, errors.worst_error))
    table = torch.tensor(points, dtype=torch.float64)
    coverage, balanced, worst = table[:, 0], table[:, 1], table[:, 2]
    return CostSweep(
        costs=torch.tensor(cost_list, dtype=torch.float64),
        coverage=coverage,
        balanced=balanced,
        worst=worst,
        aurc_balanced=area_under(coverage, balanced, min_coverage),
        aurc_worst=area_under(coverage, worst, min_coverage),
        rules=tuple(rules),
    )


def _decide(rule: PluginRule, split: _Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept mask and predictions of `rule` on a prepared split (its statistics are reused)."""
    device = split.weight.device
    group, margin, _ = margins(split.stats, rule.coef.to(device)[None], rule.mu.to(device)[None])
    accept = margin[0] >= -rule.cost
    pred = split.stats.top_class.gather(0, group)[0]
    return accept, pred
