"""The paper's machinery (docs/design.md, *The rule*): the joint (alpha, mu) fixed point from several
starts, iterated on the fitting split S1 with each iterate judged on the selection split S2, and the
exponentiated gradient over the group weights beta of the worst-group objective.

Both loops serve the fits at a cost (`argse.selective.fit`) and at a coverage
(`argse.selective.coverage`): what differs between them (where the threshold comes from, how S2
judges an iterate) is the `evaluate` or `solve` function they are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from argse.selective.cut import accept_top
from argse.selective.problem import Split, Tally, tally
from argse.selective.rule import margins

#: Initial "head/tail" tilts of the starts: alpha_k proportional to P(y in G_k) ** tilt.
START_TILTS = (0.0, 0.5, 1.0)
#: alpha is kept above this so a group with no accepted mass does not divide by zero.
ALPHA_FLOOR = 1e-6

#: (coef [R, K], mu [R, K], owner [R]) -> (score on S2 [R], the tally on S1 [R, K], the tally on S2 [R, K])
Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Tally, Tally]]


def fixed_point_map(fit_tally: Tally, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the map on the fitting split: alpha_k = K * P(accept, y in G_k), mu_k = K * beta_k *
    e_k / alpha_k (the errors as measured: this is the paper's first-order condition, not a choice)."""
    n_groups = fit_tally.accepted.shape[1]
    alpha = (n_groups * fit_tally.accepted).clamp_min(ALPHA_FLOOR)
    mu = n_groups * beta * fit_tally.errors() / alpha
    return alpha, mu


def start_schedule(n_starts: int) -> list[tuple[float, float]]:
    """The (acceptance level, tilt) of each start: tilts cycle through START_TILTS, levels rise to 1."""
    n_levels = math.ceil(n_starts / len(START_TILTS))
    return [((i // len(START_TILTS) + 1) / n_levels, START_TILTS[i % len(START_TILTS)]) for i in range(n_starts)]


def starts(split: Split, beta: torch.Tensor, n_starts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (alpha, mu) [T, S, K] for the group weights `beta` [T, K] of T problems: accept the
    top-q share of S1 by the margin of the rule with alpha ~ prior ** tilt and mu = 0, then apply the
    fixed-point map to that acceptance set. All T problems in one pass over the samples."""
    t, k = beta.shape
    schedule = torch.tensor(start_schedule(n_starts), dtype=torch.float64, device=beta.device)
    tilts, which = schedule[:, 1].unique(return_inverse=True)
    coef = (beta[:, None, :] / split.prior.clamp_min(1e-12)[None, None, :] ** tilts[None, :, None]).reshape(-1, k)
    _, margin, wrong = margins(split.stats, coef, torch.zeros_like(coef), split.wrong)
    rows = (torch.arange(t, device=beta.device)[:, None] * len(tilts) + which[None, :]).flatten()  # [T * S]
    accept = accept_top(margin[rows], split.weight, schedule[:, 0].repeat(t))
    alpha, mu = fixed_point_map(tally(split, accept, wrong[rows]), beta.repeat_interleave(n_starts, dim=0))
    return alpha.view(t, n_starts, k), mu.view(t, n_starts, k)


@dataclass(frozen=True)
class Iterate:
    """The iterate each of T problems keeps: alpha, mu [T, K], its score [T] and its tally on S2."""

    alpha: torch.Tensor
    mu: torch.Tensor
    score: torch.Tensor
    sel: Tally


def iterate(split: Split, beta: torch.Tensor, n_starts: int, max_iter: int, evaluate: Evaluate,
            init: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Iterate:
    """T fixed points at once (beta [T, K], one problem per row): from `n_starts` starts on the fitting
    `split` (plus `init`, [T, K] each), iterate the map for at most `max_iter` steps; each problem
    keeps the iterate with the lowest score that `evaluate` gives it on S2.

    The map is deterministic, so a state met before (a converged start, a cycle, two starts that
    merged) has nothing new to offer and is dropped: the batch shrinks as starts converge or merge."""
    t, k = beta.shape
    alpha, mu = starts(split, beta, n_starts)  # [T, S, K]
    if init is not None:
        alpha = torch.cat([alpha, init[0][:, None]], dim=1)
        mu = torch.cat([mu, init[1][:, None]], dim=1)
    s = alpha.shape[1]
    owner = torch.arange(t, device=beta.device).repeat_interleave(s)
    alpha, mu = alpha.reshape(t * s, k), mu.reshape(t * s, k)
    best_alpha, best_mu = alpha.view(t, s, k)[:, 0].clone(), mu.view(t, s, k)[:, 0].clone()
    best_score = torch.full((t,), math.inf, dtype=torch.float64, device=beta.device)
    kept: list[Optional[Tally]] = [None] * t
    seen: set[bytes] = set()
    for _ in range(max_iter):
        keys = [row.numpy().tobytes() for row in torch.cat([owner[:, None].double(), alpha, mu], dim=1).cpu()]
        fresh = [i for i, key in enumerate(keys) if key not in seen and keys.index(key) == i]
        if not fresh:
            break
        seen.update(keys)
        if len(fresh) < len(keys):
            alpha, mu, owner = alpha[fresh], mu[fresh], owner[fresh]
        beta_rows = beta[owner]
        score, fit_tally, sel_tally = evaluate(k * beta_rows / alpha, mu, owner)
        lowest = torch.full_like(best_score, math.inf).scatter_reduce(0, owner, score, "amin")
        for i in (score == lowest[owner]).nonzero().flatten().tolist():  # at most a few rows per problem
            j = int(owner[i])
            if float(score[i]) < float(best_score[j]):
                best_alpha[j], best_mu[j], best_score[j] = alpha[i], mu[i], score[i]
                kept[j] = sel_tally.rows(slice(i, i + 1))
        alpha, mu = fixed_point_map(fit_tally, beta_rows)
    sel = Tally(*(torch.cat([getattr(one, name) for one in kept]) for name in ("accepted", "wrong", "accepted_sq")))
    return Iterate(alpha=best_alpha, mu=best_mu, score=best_score, sel=sel)


@dataclass(frozen=True)
class Solved:
    """A cost-sensitive or coverage-constrained fit for given group weights, shapes [..., K] / [...]."""

    alpha: torch.Tensor
    mu: torch.Tensor
    group_error: torch.Tensor  # on S2, as measured
    judged_error: torch.Tensor  # on S2, as the choice judged it (`error_bound`)
    coverage: torch.Tensor  # on S2
    risk: torch.Tensor  # the objective on S2 with the judged errors


def exponentiated_gradient(solve: Callable[[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]], Solved],
                           beta: torch.Tensor, pace: Union[float, torch.Tensor],
                           rounds: int) -> list[tuple[torch.Tensor, Solved]]:
    """The worst group's rounds (Algorithm 2): round t solves for the group weights beta^t (from the
    previous round's rule as one more start) and sets beta_k <- beta_k * exp(pace * e_k), normalised,
    with e_k judged on S2. `beta` [..., K] starts them; returns (beta^t, solved^t) per round."""
    record, init = [], None
    for _ in range(rounds):
        solved = solve(beta, init)
        record.append((beta, solved))
        init = (solved.alpha, solved.mu)
        beta = beta * torch.exp(pace * solved.judged_error)
        beta = beta / beta.sum(dim=-1, keepdim=True)
    return record
