"""Fitting the plug-in rejector at a cost: balanced error (Algorithm 1) and worst-group error
(Algorithm 2). The maths is docs/design.md, *The rule*; the fits at a coverage are
`argse.selective.coverage`.

A fit reads the fitting split S1 (eta_fit, y_fit) and the selection split S2 (eta_sel, y_sel), both
weighted; `FitOptions` declares its options once, and every public fit takes them as an `options`
object, as keyword overrides of one, or both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from argse.selective import checks as check
from argse.selective.fixed_point import Solved, exponentiated_gradient, iterate
from argse.selective.metrics import EVIDENCE_LEVEL, l2r_risk
from argse.selective.problem import Problem, Tally, at_cost, pooled, prepare_problem
from argse.selective.rule import PluginRule, WorstFitHistory, margins
from argse.selective.search import coordinates, rule_of, search, smoothed, spans


#: How a fit chooses its rule within the family (docs/design.md, *The rule*): "smoothed", the fixed
#: point's rule moved by the direct search of the family (`argse.selective.search`) to the rule whose
#: criterion, judged on the fitting and selection splits together and averaged over its neighbouring
#: rules (`argse.selective.search.smoothed`), is lowest; "pooled", the same without the average;
#: "selection", without the average and judged on the selection split alone (the choice when the
#: posteriors were fitted on the fitting split, as a gate is); "none", the fixed point's rule alone
#: (the paper's algorithm).
SEARCHES = ("smoothed", "pooled", "selection", "none")


#: A fit at a cost searches in each of its rounds (`fit_worst`: 20), each search cheap enough for
#: `fit_worst` at N = 10,000, C = 100 to stay well under a second (bench/selective.py): three levels of
#: the search from the first round's rule, and from a later round's, which starts from the previous
#: round's rule as one of its iterates, only the finest.
COST_LEVELS, ROUND_LEVEL = 3, 2


@dataclass(frozen=True)
class FitOptions:
    """The fitting options of every fit (`rounds` and `step`, of the exponentiated gradient, apply to
    the worst-group objective only). `evidence` is the one-sided confidence of the upper bound that
    every choice on the selection split judges a group's error by
    (`argse.selective.metrics.error_bound`); None judges the errors as measured, which is right only
    when the weighted rows are a whole population rather than a sample of one; a function of a
    `argse.selective.problem.Tally` judges by what it gives. Invalid values are rejected with a
    sentence that names the option."""

    rounds: int = 20
    step: float = 2.0
    n_starts: int = 12
    max_iter: int = 30
    evidence: Optional[float] = EVIDENCE_LEVEL
    search: str = "smoothed"

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}; got {self.search!r}.")
        for name in ("rounds", "n_starts", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
            object.__setattr__(self, name, int(value))
        try:
            step = float(self.step)
        except (TypeError, ValueError):
            raise ValueError(f"step must be a finite number >= 0; got {self.step!r}.") from None
        if not math.isfinite(step) or step < 0:
            raise ValueError(f"step must be a finite number >= 0; got {self.step!r}.")
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "evidence", check.evidence(self.evidence))

    @classmethod
    def of(cls, options: Optional["FitOptions"], overrides: dict[str, Any]) -> "FitOptions":
        """`options` (the defaults when None) with `overrides` (FitOptions fields) replaced."""
        if options is not None and not isinstance(options, FitOptions):
            raise ValueError(f"options must be a FitOptions; got {type(options).__name__}.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in overrides if name not in names]
        if unknown:
            raise ValueError(f"unknown fit option {unknown[0]!r}; the options are {', '.join(names)}.")
        return dataclasses.replace(options or cls(), **overrides)


def _line_search(problem: Problem, beta: torch.Tensor, cost: float, alpha: torch.Tensor, mu: torch.Tensor) -> Solved:
    """Exact line search on S2 over a common shift of mu, which moves every margin by the same amount
    (the rows of eta sum to 1): the acceptance count, among those a threshold can realise, with the
    lowest risk sum_k beta_k e_k + cost * P(reject), each e_k judged by its upper bound
    (`error_bound`). Returns the rule with mu shifted to it."""
    sel = problem.sel
    coef = alpha.shape[0] * beta / alpha
    _, margin, wrong = margins(sel.stats, coef[None], mu[None], sel.wrong)
    margin, order = margin[0].sort(descending=True, stable=True)
    mass = sel.by_group[order]
    tally = Tally(mass.cumsum(dim=0), (mass * wrong[0, order, None]).cumsum(dim=0),
                  sel.by_group_sq[order].cumsum(dim=0))
    errors, judged = tally.errors(), tally.judged(problem.evidence)
    coverage = tally.accepted.sum(dim=1)
    risk = l2r_risk(judged @ beta, coverage, cost)
    run_end = torch.ones_like(margin, dtype=torch.bool)
    run_end[:-1] = margin[1:] != margin[:-1]
    n = int(torch.where(run_end, risk, torch.full_like(risk, math.inf)).argmin())
    if n + 1 == margin.shape[0]:  # accept everything: keep a little room below the lowest margin
        threshold = margin[n] - 1e-9 * (1.0 + margin[n].abs())
    else:
        threshold = (margin[n] + margin[n + 1]) / 2
    return Solved(alpha=alpha, mu=mu - cost - threshold, group_error=errors[n], judged_error=judged[n],
                  coverage=coverage[n], risk=risk[n])


def _solve_at_cost(problem: Problem, cost: float, options: FitOptions, beta: torch.Tensor,
                   init: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Solved:
    """The cost-sensitive rule for group weights `beta` [K]: the joint (alpha, mu) fixed point on S1
    from several starts (`iterate`), keeping the iterate with the lowest L2R risk sum_k beta_k e_k +
    cost * P(reject) on S2 (each e_k judged by its upper bound, `error_bound`); unless
    `options.search` is "none", the direct search of the family and its threshold from there, with
    the same risk judged as `options.search` says (`argse.selective.search`); then the exact
    threshold line search on S2."""
    k = problem.n_groups

    def evaluate(coef: torch.Tensor, mu: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, Tally, Tally]:
        tally = at_cost(problem.both, coef, mu, cost)  # S1 and S2 in one pass
        sel = tally.columns(slice(k, None))
        return l2r_risk(sel.judged(problem.evidence) @ beta, sel.accepted.sum(dim=1), cost), \
            tally.columns(slice(None, k)), sel

    start = None if init is None else (init[0][None], init[1][None])
    best = iterate(problem.fit, beta[None], options.n_starts, options.max_iter, evaluate, start)
    alpha, mu = best.alpha[0], best.mu[0]
    coef = k * beta / alpha
    if options.search != "none" and bool((coef > 0).all()):

        def score(theta: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
            coef, mu = rule_of(theta, k)
            mu = mu - theta[:, -1:] - cost
            if options.search != "selection":
                both = at_cost(problem.both, coef, mu, cost)
                sel = pooled(both.columns(slice(None, k)), both.columns(slice(k, None)), problem.fit_share)
            else:
                sel = at_cost(problem.sel, coef, mu, cost)
            return l2r_risk(sel.judged(problem.evidence) @ beta, sel.accepted.sum(dim=1), cost)

        if options.search == "smoothed":
            score = smoothed(score, k, 2 * k - 1)
        threshold = (-cost - mu[:1]) / coef[:1]  # accept margin >= -cost, on the margin normalised to coef_0 = 1
        theta, _ = search(score, torch.cat([coordinates(coef, mu), threshold])[None], spans(k, True, problem.device),
                          first_level=0 if init is None else ROUND_LEVEL, levels=COST_LEVELS)
        coef, mu = rule_of(theta[0], k)
        alpha, mu = k * beta / coef, mu - theta[0, -1] - cost
    return _line_search(problem, beta, cost, alpha, mu)


def _check_beta(beta: Any, problem: Problem) -> torch.Tensor:
    if beta is None:
        return problem.uniform_beta()
    b = check.vector(beta, "beta", problem.n_groups, problem.device)
    if not bool(torch.isfinite(b).all()) or bool((b < 0).any()) or abs(float(b.sum()) - 1.0) > check.SUM_TOLERANCE:
        raise ValueError("beta must be non-negative group weights summing to 1.")
    return b / b.sum()


def _fit(problem: Problem, objective: str, cost: float, options: FitOptions,
         beta: Optional[torch.Tensor] = None) -> PluginRule:
    """The one place an objective picks its fit at a cost: Algorithm 2 (the exponentiated gradient
    over beta, from uniform) for "worst", Algorithm 1 (beta uniform, or `beta`) for "balanced"."""
    c2g = problem.class_to_group.cpu()
    if objective == "balanced":
        beta = problem.uniform_beta() if beta is None else beta
        solved = _solve_at_cost(problem, cost, options, beta)
        return PluginRule(alpha=solved.alpha.cpu(), mu=solved.mu.cpu(), beta=beta.cpu(), cost=cost, class_to_group=c2g)
    record = exponentiated_gradient(lambda b, init: _solve_at_cost(problem, cost, options, b, init),
                                    problem.uniform_beta(), options.step, options.rounds)
    rows = [solved for _, solved in record]
    history = WorstFitHistory.of_rounds(
        beta=torch.stack([b for b, _ in record]), alpha=torch.stack([s.alpha for s in rows]),
        mu=torch.stack([s.mu for s in rows]), group_error=torch.stack([s.group_error for s in rows]),
        judged_error=torch.stack([s.judged_error for s in rows]), coverage=torch.stack([s.coverage for s in rows]),
        worst_risk=torch.tensor([l2r_risk(float(s.judged_error.max()), float(s.coverage), cost) for s in rows],
                                dtype=torch.float64))
    beta, chosen = record[history.best_round]
    return PluginRule(alpha=chosen.alpha.cpu(), mu=chosen.mu.cpu(), beta=beta.cpu(), cost=cost, class_to_group=c2g,
                      history=history)


def fit_rule(
    objective: str,
    eta_fit: check.ArrayLike,
    y_fit: check.ArrayLike,
    eta_sel: check.ArrayLike,
    y_sel: check.ArrayLike,
    class_to_group: check.ArrayLike,
    cost: float,
    *,
    weights_fit: Optional[check.ArrayLike] = None,
    weights_sel: Optional[check.ArrayLike] = None,
    options: Optional[FitOptions] = None,
    **overrides: Any,
) -> PluginRule:
    """The plug-in rejector for `objective` at `cost`: `fit_worst` for "worst", `fit_balanced` for
    "balanced" (which ignores `rounds` and `step`), with the same arguments. `options` is a
    `FitOptions` (the defaults when None); `overrides` replace any of its fields."""
    objective = check.objective(objective)
    options = FitOptions.of(options, overrides)
    cost = check.cost(cost)
    problem = prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel,
                              options.evidence)
    return _fit(problem, objective, cost, options)


def fit_balanced(
    eta_fit: check.ArrayLike,
    y_fit: check.ArrayLike,
    eta_sel: check.ArrayLike,
    y_sel: check.ArrayLike,
    class_to_group: check.ArrayLike,
    cost: float,
    *,
    weights_fit: Optional[check.ArrayLike] = None,
    weights_sel: Optional[check.ArrayLike] = None,
    beta: Optional[check.ArrayLike] = None,
    options: Optional[FitOptions] = None,
    **overrides: Any,
) -> PluginRule:
    """The plug-in rejector for the balanced (or, with `beta`, the beta-weighted) L2R risk.

    The paper's Algorithm 1 with the joint fixed point of docs/design.md, *The rule*: from `n_starts`
    initial acceptance sets, iterate alpha_k = K * P(accept, y in G_k) and mu_k = K * beta_k * e_k /
    alpha_k on the fitting split (eta_fit, y_fit) for at most `max_iter` steps; keep the iterate with
    the lowest risk sum_k beta_k * e_k + cost * P(reject) on the selection split (eta_sel, y_sel),
    and finally shift its mu by a common amount (which moves the acceptance threshold) to the exact
    best threshold on the selection split. `beta=None` is uniform (1/K each), i.e. the balanced error.
    Start i accepts the top share q_i of S1 ranked by the rule with alpha ~ P(y in G_k) ** tilt_i and
    mu = 0 (`argse.selective.fixed_point.start_schedule`). Weights are normalised per split; all
    statistics are weighted. Each e_k that a choice on the selection split reads is judged by its upper
    confidence bound at one-sided confidence `evidence` (`argse.selective.metrics.error_bound`; see
    `FitOptions`, whose fields `options` and `overrides` set).
    """
    options = FitOptions.of(options, overrides)
    cost = check.cost(cost)
    problem = prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel,
                              options.evidence)
    return _fit(problem, "balanced", cost, options, _check_beta(beta, problem))


def fit_worst(
    eta_fit: check.ArrayLike,
    y_fit: check.ArrayLike,
    eta_sel: check.ArrayLike,
    y_sel: check.ArrayLike,
    class_to_group: check.ArrayLike,
    cost: float,
    *,
    weights_fit: Optional[check.ArrayLike] = None,
    weights_sel: Optional[check.ArrayLike] = None,
    options: Optional[FitOptions] = None,
    **overrides: Any,
) -> PluginRule:
    """The plug-in rejector for the worst-group L2R risk max_k e_k + cost * P(reject).

    Algorithm 2 of Narasimhan, Menon, Jitkrittum, Gupta, Kumar, "Learning to Reject Meets Long-tail
    Learning", ICLR 2024: exponentiated gradient over the group weights beta. Start from beta^0
    uniform; in round t, fit the cost-sensitive rule for beta^t as `fit_balanced(..., beta=beta^t)`
    does (joint alpha/mu fixed point on the fitting split, several starts plus the previous round's
    rule, selection on the selection split), measure its group errors e_k on the selection split, and
    update beta_k <- beta_k * exp(step * e_k), normalised. After `rounds` rounds, return the round whose
    rule has the lowest worst-group L2R risk max_k e_k + cost * P(reject) on the selection split.
    Wherever a choice is made on the selection split (the iterate, the threshold, the round) and in the
    update of beta, e_k is judged by its upper confidence bound at one-sided confidence `evidence`
    (`argse.selective.metrics.error_bound`; see `FitOptions`), so a group accepted on a handful of
    samples never looks better than one with real evidence.

    The returned `PluginRule` carries the per-round record in `rule.history` (a `WorstFitHistory`:
    beta, alpha, mu, group errors as measured and as judged, coverage and worst risk per round on the
    selection split, and `best_round`); `rule.history.rows()` gives plain dicts for logging.
    """
    return fit_rule("worst", eta_fit, y_fit, eta_sel, y_sel, class_to_group, cost, weights_fit=weights_fit,
                    weights_sel=weights_sel, options=options, **overrides)
