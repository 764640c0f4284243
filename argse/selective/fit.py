"""Fitting the plug-in rejector: balanced error (Algorithm 1), worst-group error (Algorithm 2), and
optional per-group thresholds. The maths is docs/design.md, *The rule*.

Everything works on the per-group sufficient statistics (`GroupStats`): they are computed once per
split, and a batch of S candidate rules is then evaluated in O(S * N * K) tensor operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from argse.selective import _validate as check
from argse.selective.metrics import EVIDENCE_LEVEL, MIN_GROUP_ACCEPTED, _ratio, error_bound, l2r_risk
from argse.selective.rule import GroupStats, PluginRule, WorstFitHistory, group_stats, margins

#: Initial "head/tail" tilts of the starts: alpha_k proportional to P(y in G_k) ** tilt.
START_TILTS = (0.0, 0.5, 1.0)
#: alpha is kept above this so a group with no accepted mass does not divide by zero.
ALPHA_FLOOR = 1e-6


@dataclass(frozen=True)
class FitOptions:
    """The fitting options shared by `fit_rule` and `fit_at_coverage` (`rounds` and `step`, of the
    exponentiated gradient, apply to the worst-group objective only). `evidence` is the one-sided
    confidence of the upper bound that every choice on the selection split judges a group's error by
    (`argse.selective.metrics.error_bound`); None judges the errors as measured, which is right only
    when the weighted rows are a whole population rather than a sample of one."""

    rounds: int = 20
    step: float = 2.0
    n_starts: int = 12
    max_iter: int = 30
    evidence: Optional[float] = EVIDENCE_LEVEL


@dataclass(frozen=True)
class _Split:
    """A validated split reduced to what the rule needs; weights are normalised to sum to 1."""

    stats: GroupStats
    wrong: torch.Tensor  # [K, N] bool: the top class of group k is not the label
    by_group: torch.Tensor  # [N, W] float64: w_i * [g(y_i) == k] (W = K, or 2K for a stacked pair)
    weight: torch.Tensor  # [N] float64

    @property
    def members(self) -> torch.Tensor:
        """[N, W] 1.0 where sample i counts in mass column k (its group, with a positive weight)."""
        return (self.by_group > 0).to(torch.float64)

    @property
    def by_group_sq(self) -> torch.Tensor:
        """[N, W] w_i^2 * [g(y_i) == k]: what the effective accepted count of a group needs."""
        return self.by_group * self.weight[:, None]

    @property
    def prior(self) -> torch.Tensor:
        """[W] P(y in G_k)."""
        return self.by_group.sum(dim=0)


def _prepare(
    eta: Any, y: Any, weights: Any, names: tuple[str, str, str], c2g: torch.Tensor, n_groups: int,
    device: Optional[torch.device] = None,
) -> _Split:
    eta = check.posteriors(eta, names[0], c2g.shape[0], device)
    y = check.labels(y, names[1], eta.shape[0], c2g.shape[0], eta.device)
    w = check.weights(weights, names[2], eta.shape[0], eta.device)
    w = w / w.sum()
    stats = group_stats(eta, c2g, n_groups)
    by_group = torch.nn.functional.one_hot(c2g.to(eta.device)[y], n_groups).to(torch.float64) * w[:, None]
    return _Split(stats=stats, wrong=stats.top_class != y[None, :], by_group=by_group, weight=w)


def _stack(fit: _Split, sel: _Split) -> _Split:
    """S1 and S2 as one split whose first K mass columns are S1's and last K are S2's, so that one
    pass over the samples evaluates a batch of rules on both."""
    return _Split(
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
class _Problem:
    """The fitting split S1, the selection split S2, both stacked, the groups, and the confidence the
    errors measured on S2 are judged at (`FitOptions.evidence`)."""

    fit: _Split
    sel: _Split
    both: _Split
    class_to_group: torch.Tensor
    n_groups: int
    evidence: Optional[float] = EVIDENCE_LEVEL


def _prepare_problem(
    eta_fit: Any, y_fit: Any, eta_sel: Any, y_sel: Any, class_to_group: Any, weights_fit: Any, weights_sel: Any,
    evidence: Optional[float] = EVIDENCE_LEVEL,
) -> _Problem:
    device = eta_fit.device if isinstance(eta_fit, torch.Tensor) else None
    c2g, n_groups = check.class_to_group(class_to_group, device)
    fit = _prepare(eta_fit, y_fit, weights_fit, ("eta_fit", "y_fit", "weights_fit"), c2g, n_groups, device)
    sel = _prepare(eta_sel, y_sel, weights_sel, ("eta_sel", "y_sel", "weights_sel"), c2g, n_groups,
                   fit.weight.device)
    return _Problem(fit=fit, sel=sel, both=_stack(fit, sel), class_to_group=c2g, n_groups=n_groups,
                    evidence=check.evidence(evidence))


@dataclass(frozen=True)
class _Tally:
    """What S decisions accept, per mass column, all [S, W]: the accepted weight, the accepted-and-wrong
    weight and the accepted squared weight (for the effective count of `error_bound`)."""

    accepted: torch.Tensor
    wrong: torch.Tensor
    accepted_sq: torch.Tensor

    def columns(self, which: slice) -> "_Tally":
        return _Tally(self.accepted[:, which], self.wrong[:, which], self.accepted_sq[:, which])

    def errors(self) -> torch.Tensor:
        """e_k as measured: P(wrong | accept, y in G_k); 1.0 for a group with no accepted mass."""
        return _group_errors(self.accepted, self.wrong)

    def judged(self, evidence: Optional[float]) -> torch.Tensor:
        """e_k as a choice judges it: the upper confidence bound of `error_bound` at one-sided
        confidence `evidence` (None: as measured)."""
        if evidence is None:
            return self.errors()
        return error_bound(self.accepted, self.wrong, self.accepted_sq, evidence)


def _masses(split: _Split, accept: torch.Tensor, wrong: torch.Tensor) -> _Tally:
    """The `_Tally` of S decisions [S, N] (accept masks, and the `wrong` flags of their predictions)."""
    s = accept.shape[0]
    flags = torch.cat([accept, accept & wrong]).view(torch.uint8).to(torch.float64)
    both = flags @ split.by_group
    return _Tally(both[:s], both[s:], flags[:s] @ split.by_group_sq)


def _evaluate(split: _Split, coef: torch.Tensor, mu: torch.Tensor, cost: float) -> _Tally:
    """`_masses` of S rules (coef, mu [S, K]) with a single cost."""
    _, margin, wrong = margins(split.stats, coef, mu, split.wrong)
    return _masses(split, margin >= -cost, wrong)


def _group_errors(accepted: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """e_k = P(wrong | accept, y in G_k); 1.0 for a group with no accepted mass."""
    return _ratio(wrong, accepted, 1.0)


def _fixed_point(tally: _Tally, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the map on the fitting split: alpha_k = K * P(accept, y in G_k), mu_k = K * beta_k *
    e_k / alpha_k (the errors as measured: this is the paper's first-order condition, not a choice)."""
    n_groups = tally.accepted.shape[1]
    alpha = (n_groups * tally.accepted).clamp_min(ALPHA_FLOOR)
    mu = n_groups * beta * tally.errors() / alpha
    return alpha, mu


def start_schedule(n_starts: int) -> list[tuple[float, float]]:
    """The (acceptance level, tilt) of each start: tilts cycle through START_TILTS, levels rise to 1."""
    n_levels = math.ceil(n_starts / len(START_TILTS))
    return [((i // len(START_TILTS) + 1) / n_levels, START_TILTS[i % len(START_TILTS)]) for i in range(n_starts)]


def _starts(split: _Split, beta: torch.Tensor, n_starts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (alpha, mu) [S, K]: accept the top-q share of S1 by the margin of the rule with
    alpha ~ prior ** tilt and mu = 0, then apply the fixed-point map to that acceptance set."""
    schedule = torch.tensor(start_schedule(n_starts), dtype=torch.float64, device=beta.device)
    tilts, which = schedule[:, 1].unique(return_inverse=True)
    coef = beta / split.prior.clamp_min(1e-12)[None, :] ** tilts[:, None]
    _, margin, wrong = margins(split.stats, coef, torch.zeros_like(coef), split.wrong)
    accept = _accept_top(margin[which], split.weight, schedule[:, 0])
    return _fixed_point(_masses(split, accept, wrong[which]), beta)


def top_share_cut(values: torch.Tensor, weight: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The value [S] of the last sample taken when the samples are taken in decreasing order of each
    row of `values` [S, N] until their share of `weight` [N] reaches `level[s]`. Accepting every sample
    at or above it accepts that top share (samples tied with the last one taken come with it, so the
    share may exceed the level)."""
    if values.device.type == "cpu":
        return torch.from_numpy(_top_share_cut_cpu(values.numpy(), weight.numpy(), level.numpy()))
    order = values.argsort(dim=1, descending=True)
    cum = weight[order].cumsum(dim=1) / weight.sum()
    take = ((cum < level[:, None] - 1e-12).sum(dim=1) + 1).clamp_max(values.shape[1])
    return values.gather(1, order.gather(1, (take - 1)[:, None]))[:, 0]


#: `_top_share_cut_cpu`: the strided sample per row that brackets the cut, and the sample positions
#: kept on either side of the sample's own cut (a bracket that misses is caught, and that row sorted).
_SAMPLE, _BRACKET = 256, 12


def _top_share_cut_cpu(values: np.ndarray, weight: np.ndarray, level: np.ndarray) -> np.ndarray:
    """`top_share_cut` without sorting whole rows, which was most of a fit's time on the CPU. A
    strided sample of each row, sorted, brackets the value where the share taken from the top reaches
    the level; one pass over the row counts the weight above the bracket and collects the samples in
    it, and only those are sorted and walked as a full sort would walk them. A row whose bracket
    misses the cut (the weight above it already reaches the level, or with the bracket it does not)
    is sorted whole. The value is the one a full sort gives (the running share is summed in another
    order, which could only matter within rounding of the level less 1e-12). bench/top_share_cut.py
    measures it against the full sort."""
    rows, n = values.shape
    total, goal = weight.sum(), level - 1e-12
    step = n // _SAMPLE
    if rows == 0 or step < 2:
        return _walk_whole(values, weight, goal, total)
    sample = values[:, ::step]
    order = np.argsort(-sample, axis=1)
    ranked = np.take_along_axis(sample, order, axis=1)
    share = np.cumsum(weight[::step][order], axis=1) / weight[::step].sum()
    at = (share < goal[:, None]).sum(axis=1)
    every, last = np.arange(rows), sample.shape[1] - 1
    high = np.where(at - _BRACKET >= 0, ranked[every, np.clip(at - _BRACKET, 0, last)], np.inf)
    low = np.where(at + _BRACKET <= last, ranked[every, np.clip(at + _BRACKET, 0, last)], -np.inf)
    over = values > high[:, None]
    above = np.where(over, weight, 0.0).sum(axis=1)
    inside = (values >= low[:, None]) & ~over
    row, col = np.nonzero(inside)
    count = np.bincount(row, minlength=rows)
    held = above + np.where(inside, weight, 0.0).sum(axis=1)
    missed = (above / total >= goal) | (held / total < goal) | (count == 0)
    place = np.arange(row.size) - (np.cumsum(count) - count)[row]
    width = max(int(count.max()), 1)
    candidates = np.full((rows, width), -np.inf, dtype=values.dtype)
    candidate_weight = np.zeros((rows, width))
    candidates[row, place], candidate_weight[row, place] = values[row, col], weight[col]
    cut = _walk(candidates, candidate_weight, above, np.maximum(count, 1), goal, total)
    if missed.any():
        cut[missed] = _walk_whole(values[missed], weight, goal[missed], total)
    return cut


def _walk_whole(values: np.ndarray, weight: np.ndarray, goal: np.ndarray, total: float) -> np.ndarray:
    """`_walk` over whole rows: every sample a candidate, none above them."""
    rows, n = values.shape
    return _walk(values, np.broadcast_to(weight, (rows, n)), np.zeros(rows), np.full(rows, n), goal, total)


def _walk(candidates: np.ndarray, weight: np.ndarray, above: np.ndarray, count: np.ndarray, goal: np.ndarray,
          total: float) -> np.ndarray:
    """The cut of each row of `candidates` [S, M] (the first count[s] real, the rest padding below
    them), `above[s]` being the weight of the row's samples above them: sort, accumulate the share
    from the top, and take the first candidate where it reaches the goal (the last if none does)."""
    order = np.argsort(-candidates, axis=1)
    share = (above[:, None] + np.cumsum(np.take_along_axis(weight, order, axis=1), axis=1)) / total
    take = np.minimum((share < goal[:, None]).sum(axis=1), count - 1)
    every = np.arange(candidates.shape[0])
    return candidates[every, order[every, take]]


def _accept_top(margin: torch.Tensor, weight: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Accept masks [S, N] of S margins [S, N]: the top share `level[s]` of the weight (`top_share_cut`)."""
    return margin >= top_share_cut(margin, weight, level)[:, None]


@dataclass(frozen=True)
class _Fit:
    alpha: torch.Tensor  # [K]
    mu: torch.Tensor  # [K]
    group_error: torch.Tensor  # [K] on S2, as measured
    judged_error: torch.Tensor  # [K] on S2, as the choice judged it (`error_bound`)
    coverage: float  # on S2
    risk: float  # sum_k beta_k e_k + cost * P(reject) on S2, with the judged errors


def _line_search(problem: _Problem, beta: torch.Tensor, cost: float, alpha: torch.Tensor, mu: torch.Tensor) -> _Fit:
    """Exact line search on S2 over a common shift of mu, which moves every margin by the same amount
    (the rows of eta sum to 1): the acceptance count, among those a threshold can realise, with the
    lowest risk sum_k beta_k e_k + cost * P(reject), each e_k judged by its upper bound
    (`error_bound`). Returns the rule with mu shifted to it."""
    sel = problem.sel
    coef = alpha.shape[0] * beta / alpha
    _, margin, wrong = margins(sel.stats, coef[None], mu[None], sel.wrong)
    margin, order = margin[0].sort(descending=True, stable=True)
    mass = sel.by_group[order]
    tally = _Tally(mass.cumsum(dim=0), (mass * wrong[0, order, None]).cumsum(dim=0),
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
    return _Fit(alpha=alpha, mu=mu - cost - threshold, group_error=errors[n], judged_error=judged[n],
                coverage=float(coverage[n]), risk=float(risk[n]))


def _fit_cost_sensitive(
    problem: _Problem, beta: torch.Tensor, cost: float, n_starts: int, max_iter: int,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> _Fit:
    """Joint (alpha, mu) fixed point on S1 from several starts, keeping the iterate with the lowest
    L2R risk sum_k beta_k e_k + cost * P(reject) on S2 (each e_k judged by its upper bound,
    `error_bound`); then the exact threshold line search on S2.

    The map is deterministic, so a state met before (a converged start, a cycle, two starts that
    merged) has nothing new to offer and is dropped."""
    k = problem.n_groups
    alpha, mu = _starts(problem.fit, beta, n_starts)
    if init is not None:
        alpha = torch.cat([alpha, init[0][None]])
        mu = torch.cat([mu, init[1][None]])
    best_alpha, best_mu, best_risk = alpha[0], mu[0], math.inf
    seen: set[bytes] = set()
    for _ in range(max_iter):
        keys = [row.numpy().tobytes() for row in torch.cat([alpha, mu], dim=1).cpu()]
        fresh = [i for i, key in enumerate(keys) if key not in seen and keys.index(key) == i]
        if not fresh:
            break
        seen.update(keys)
        if len(fresh) < len(keys):
            alpha, mu = alpha[fresh], mu[fresh]
        tally = _evaluate(problem.both, k * beta / alpha, mu, cost)
        sel = tally.columns(slice(k, None))
        risk = l2r_risk(sel.judged(problem.evidence) @ beta, sel.accepted.sum(dim=1), cost)
        i = int(risk.argmin())
        if float(risk[i]) < best_risk:
            best_alpha, best_mu, best_risk = alpha[i], mu[i], float(risk[i])
        alpha, mu = _fixed_point(tally.columns(slice(None, k)), beta)
    return _line_search(problem, beta, cost, best_alpha, best_mu)


def _check_options(n_starts: int, max_iter: int, rounds: int = 1, step: float = 0.0) -> None:
    """The fitting options (`rounds` and `step` of the exponentiated gradient where it runs)."""
    if int(n_starts) != n_starts or n_starts < 1:
        raise ValueError(f"n_starts must be an integer >= 1; got {n_starts!r}.")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1; got {max_iter!r}.")
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1; got {rounds!r}.")
    if not math.isfinite(float(step)) or float(step) < 0:
        raise ValueError(f"step must be a finite number >= 0; got {step}.")


def _check_beta(beta: Any, n_groups: int, device: torch.device) -> torch.Tensor:
    if beta is None:
        return torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64, device=device)
    b = check.vector(beta, "beta", n_groups, device)
    if not bool(torch.isfinite(b).all()) or bool((b < 0).any()) or abs(float(b.sum()) - 1.0) > check.SUM_TOLERANCE:
        raise ValueError("beta must be non-negative group weights summing to 1.")
    return b / b.sum()


def _balanced(problem: _Problem, cost: float, beta: torch.Tensor, n_starts: int, max_iter: int) -> PluginRule:
    result = _fit_cost_sensitive(problem, beta, cost, n_starts, max_iter)
    return PluginRule(alpha=result.alpha.cpu(), mu=result.mu.cpu(), beta=beta.cpu(), cost=cost,
                      class_to_group=problem.class_to_group.cpu())


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
    n_starts: int = 12,
    max_iter: int = 30,
    evidence: Optional[float] = EVIDENCE_LEVEL,
) -> PluginRule:
    """The plug-in rejector for the balanced (or, with `beta`, the beta-weighted) L2R risk.

    The paper's Algorithm 1 with the joint fixed point of docs/design.md, *The rule*: from `n_starts` initial
    acceptance sets, iterate alpha_k = K * P(accept, y in G_k) and mu_k = K * beta_k * e_k / alpha_k on
    the fitting split (eta_fit, y_fit) for at most `max_iter` steps; keep the iterate with the lowest
    risk sum_k beta_k * e_k + cost * P(reject) on the selection split (eta_sel, y_sel), and finally
    shift its mu by a common amount (which moves the acceptance threshold) to the exact best
    threshold on the selection split. `beta=None` is uniform (1/K each), i.e. the balanced error.
    Start i accepts the top share q_i of S1 ranked by the rule with alpha ~ P(y in G_k) ** tilt_i and
    mu = 0 (`start_schedule`). Weights are normalised per split; all statistics are weighted.
    Each e_k that a choice on the selection split reads is judged by its upper confidence bound at
    one-sided confidence `evidence` (`argse.selective.metrics.error_bound`; see `FitOptions`).
    """
    _check_options(n_starts, max_iter)
    cost = check.cost(cost)
    problem = _prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel, evidence)
    b = _check_beta(beta, problem.n_groups, problem.fit.weight.device)
    return _balanced(problem, cost, b, int(n_starts), int(max_iter))


def _worst(problem: _Problem, cost: float, rounds: int, step: float, n_starts: int, max_iter: int) -> PluginRule:
    n_groups = problem.n_groups
    beta = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64, device=problem.fit.weight.device)
    rows: list[tuple[torch.Tensor, _Fit, float]] = []
    init = None
    for _ in range(rounds):
        result = _fit_cost_sensitive(problem, beta, cost, n_starts, max_iter, init)
        worst = l2r_risk(float(result.judged_error.max()), result.coverage, cost)
        rows.append((beta, result, worst))
        init = (result.alpha, result.mu)
        beta = beta * torch.exp(step * result.judged_error)
        beta = beta / beta.sum()
    risks = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    best = int(risks.argmin())
    history = WorstFitHistory(
        beta=torch.stack([row[0] for row in rows]).cpu(),
        alpha=torch.stack([row[1].alpha for row in rows]).cpu(),
        mu=torch.stack([row[1].mu for row in rows]).cpu(),
        group_error=torch.stack([row[1].group_error for row in rows]).cpu(),
        coverage=torch.tensor([row[1].coverage for row in rows], dtype=torch.float64),
        worst_risk=risks,
        best_round=best,
        judged_error=torch.stack([row[1].judged_error for row in rows]).cpu(),
    )
    beta_best, chosen, _ = rows[best]
    return PluginRule(alpha=chosen.alpha.cpu(), mu=chosen.mu.cpu(), beta=beta_best.cpu(), cost=cost,
                      class_to_group=problem.class_to_group.cpu(), history=history)


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
    rounds: int = 20,
    step: float = 2.0,
    n_starts: int = 12,
    max_iter: int = 30,
    evidence: Optional[float] = EVIDENCE_LEVEL,
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
                    weights_sel=weights_sel, options=FitOptions(rounds, step, n_starts, max_iter, evidence))


def _fit_objective(problem: _Problem, objective: str, cost: float, options: FitOptions) -> PluginRule:
    """The one place an objective picks its fit: Algorithm 2 for "worst", Algorithm 1 (beta uniform)
    for "balanced"."""
    if objective == "worst":
        return _worst(problem, cost, int(options.rounds), float(options.step), int(options.n_starts),
                      int(options.max_iter))
    beta = torch.full((problem.n_groups,), 1.0 / problem.n_groups, dtype=torch.float64, device=problem.fit.weight.device)
    return _balanced(problem, cost, beta, int(options.n_starts), int(options.max_iter))


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
    options: FitOptions = FitOptions(),
) -> PluginRule:
    """The plug-in rejector for `objective`: `fit_worst` for "worst", `fit_balanced` for "balanced"
    (which ignores `options.rounds` and `options.step`), with the same arguments."""
    objective = check.objective(objective)
    _check_options(options.n_starts, options.max_iter, *((options.rounds, options.step) if objective == "worst" else ()))
    cost = check.cost(cost)
    problem = _prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel,
                               options.evidence)
    return _fit_objective(problem, objective, cost, options)


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


# --------------------------------------------------------------------------------------------------
# Fitting at a coverage: the operating points of the coverage-matched comparison (docs/design.md, *The rule*)


@dataclass(frozen=True)
class _LevelFit:
    alpha: torch.Tensor  # [T, K]
    mu: torch.Tensor  # [T, K]
    group_error: torch.Tensor  # [T, K] on S2, at the level, as measured
    judged_error: torch.Tensor  # [T, K] on S2, at the level, as the choice judged it (`error_bound`)
    risk: torch.Tensor  # [T] sum_k beta_k e_k on S2, at the level, with the judged errors


def _at_level(split: _Split, coef: torch.Tensor, mu: torch.Tensor, level: torch.Tensor) -> _Tally:
    """`_masses` of S rules (coef, mu [S, K]), each accepting the top share level[s] of the split."""
    _, margin, wrong = margins(split.stats, coef, mu, split.wrong)
    return _masses(split, _accept_top(margin, split.weight, level), wrong)


def _fit_at_levels(
    problem: _Problem, beta: torch.Tensor, level: torch.Tensor, n_starts: int, max_iter: int,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> _LevelFit:
    """T coverage-constrained fits at once (beta [T, K], level [T]): the joint (alpha, mu) fixed point
    on S1 with the acceptance set held at the top share level[t] of S1 (the threshold, hence the
    common shift of mu, is set by the level, not by a cost), from several starts (plus `init`, [T, K]
    each); each problem keeps the iterate with the lowest sum_k beta_k e_k on S2 (each e_k judged by
    its upper bound, `error_bound`), where S2's threshold is likewise set to accept the top share
    level[t].

    As in `_fit_cost_sensitive`, a state met before has nothing new to offer and is dropped, so the
    batch shrinks as starts converge or merge."""
    t, k = beta.shape
    starts = [_starts(problem.fit, beta[i], n_starts) for i in range(t)]
    alpha = torch.stack([a for a, _ in starts])  # [T, S, K]
    mu = torch.stack([m for _, m in starts])
    if init is not None:
        alpha = torch.cat([alpha, init[0][:, None]], dim=1)
        mu = torch.cat([mu, init[1][:, None]], dim=1)
    s = alpha.shape[1]
    owner = torch.arange(t, device=beta.device).repeat_interleave(s)
    alpha, mu = alpha.reshape(t * s, k), mu.reshape(t * s, k)
    best_alpha, best_mu = alpha.view(t, s, k)[:, 0].clone(), mu.view(t, s, k)[:, 0].clone()
    best_error = torch.ones(t, k, dtype=torch.float64, device=beta.device)
    best_judged = torch.ones(t, k, dtype=torch.float64, device=beta.device)
    best_risk = torch.full((t,), math.inf, dtype=torch.float64, device=beta.device)
    seen: set[bytes] = set()
    for _ in range(max_iter):
        keys = [row.numpy().tobytes() for row in torch.cat([owner[:, None].double(), alpha, mu], dim=1).cpu()]
        fresh = [i for i, key in enumerate(keys) if key not in seen and keys.index(key) == i]
        if not fresh:
            break
        seen.update(keys)
        if len(fresh) < len(keys):
            alpha, mu, owner = alpha[fresh], mu[fresh], owner[fresh]
        beta_rows, level_rows = beta[owner], level[owner]
        coef = k * beta_rows / alpha
        tally = _at_level(problem.sel, coef, mu, level_rows)
        errors, judged = tally.errors(), tally.judged(problem.evidence)
        risk = (judged * beta_rows).sum(dim=1)
        lowest = torch.full_like(best_risk, math.inf).scatter_reduce(0, owner, risk, "amin")
        for i in (risk == lowest[owner]).nonzero().flatten().tolist():  # at most a few rows per problem
            j = int(owner[i])
            if float(risk[i]) < float(best_risk[j]):
                best_alpha[j], best_mu[j], best_risk[j] = alpha[i], mu[i], risk[i]
                best_error[j], best_judged[j] = errors[i], judged[i]
        alpha, mu = _fixed_point(_at_level(problem.fit, coef, mu, level_rows), beta_rows)
    return _LevelFit(alpha=best_alpha, mu=best_mu, group_error=best_error, judged_error=best_judged, risk=best_risk)


def _threshold_at_level(margin: torch.Tensor, weight: torch.Tensor, level: float) -> float:
    """A threshold that accepts exactly the top share `level` of the weight (ties taken together):
    halfway between the last margin taken and the next lower distinct one, so that float error in a
    shifted margin cannot flip a decision."""
    cut = top_share_cut(margin[None], weight, torch.tensor([level], dtype=torch.float64, device=margin.device))[0]
    lower = margin[margin < cut]
    if lower.numel() == 0:  # everything accepted: keep a little room below the lowest margin
        return float(cut - 1e-9 * (1.0 + cut.abs()))
    return float((cut + lower.max()) / 2)


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
    rounds: int = 20,
    step: float = 2.0,
    n_starts: int = 12,
    max_iter: int = 30,
    evidence: Optional[float] = EVIDENCE_LEVEL,
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
    `FitOptions`): at a low coverage the rule that accepts one tail sample, correctly, is not mistaken
    for one with a perfect tail.
    Finally mu is shifted by a common amount so that the rule, with cost 0, accepts exactly the top
    share tau of the selection split (samples tied at the threshold are accepted together). Where
    that rule accepts fewer than `MIN_GROUP_ACCEPTED` samples of a group that has them on the
    selection split, the same rule with one threshold per predicted group, each accepting the top
    share tau of its group there (`fit_group_thresholds`' family), competes with it, judged the same
    way; that rule always accepts a share of every group, so the fit reaches the coverage without
    emptying a group wherever another rule of the family can.

    `coverages` is one tau or a sequence, each in (0, 1]; the result is a list in the same order.
    """
    _check_options(n_starts, max_iter, rounds, step)
    objective = check.objective(objective)
    taus = [coverages] if isinstance(coverages, (int, float)) else list(coverages)
    if not taus or any(not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0 for v in taus):
        raise ValueError(f"coverages must be one or more numbers in (0, 1]; got {coverages!r}.")
    problem = _prepare_problem(eta_fit, y_fit, eta_sel, y_sel, class_to_group, weights_fit, weights_sel, evidence)
    device, k = problem.fit.weight.device, problem.n_groups
    level = torch.tensor([float(v) for v in taus], dtype=torch.float64, device=device)
    beta = torch.full((len(taus), k), 1.0 / k, dtype=torch.float64, device=device)

    fits: list[tuple[torch.Tensor, _LevelFit]] = []
    init = None
    pace = float(step) / level[:, None]  # the step at coverage tau: step / tau (see the docstring)
    for _ in range(rounds if objective == "worst" else 1):
        result = _fit_at_levels(problem, beta, level, int(n_starts), int(max_iter), init)
        fits.append((beta, result))
        init = (result.alpha, result.mu)
        beta = beta * torch.exp(pace * result.judged_error)
        beta = beta / beta.sum(dim=1, keepdim=True)

    rules = []
    for j, tau in enumerate(level.tolist()):  # a loop over target coverages
        worst = torch.stack([f.judged_error[j].max() for _, f in fits])
        best = int(worst.argmin())
        beta_j, chosen = fits[best][0][j], fits[best][1]
        alpha, mu = chosen.alpha[j], chosen.mu[j]
        coef = k * beta_j / alpha
        _, margin, _ = margins(problem.sel.stats, coef[None], mu[None])
        mu = mu - _threshold_at_level(margin[0], problem.sel.weight, tau)
        thresholds = _group_floor(problem, objective, coef, mu, beta_j, tau)
        history = None
        if objective == "worst":
            history = WorstFitHistory(
                beta=torch.stack([b[j] for b, _ in fits]).cpu(),
                alpha=torch.stack([f.alpha[j] for _, f in fits]).cpu(),
                mu=torch.stack([f.mu[j] for _, f in fits]).cpu(),
                group_error=torch.stack([f.group_error[j] for _, f in fits]).cpu(),
                coverage=torch.full((len(fits),), tau, dtype=torch.float64),
                worst_risk=worst.cpu(),
                best_round=best,
                judged_error=torch.stack([f.judged_error[j] for _, f in fits]).cpu(),
            )
        rules.append(PluginRule(alpha=alpha.cpu(), mu=mu.cpu(), beta=beta_j.cpu(), cost=0.0,
                                class_to_group=problem.class_to_group.cpu(), history=history,
                                thresholds=None if thresholds is None else thresholds.cpu()))
    return rules


def _group_floor(problem: _Problem, objective: str, coef: torch.Tensor, mu: torch.Tensor, beta: torch.Tensor,
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
            thresholds[g] = _threshold_at_level(margin[members], sel.weight[members], tau)
    _, _, wrong = margins(sel.stats, coef[None], mu[None], sel.wrong)
    accept = torch.stack([margin >= 0, margin >= thresholds[group]])
    judged = _masses(sel, accept, wrong.expand(2, -1)).judged(problem.evidence)
    score = judged.max(dim=1).values if objective == "worst" else judged @ beta
    return thresholds if float(score[1]) < float(score[0]) else None
