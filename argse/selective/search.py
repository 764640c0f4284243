"""A direct search of the plug-in rule family for the rule its criterion prefers (docs/design.md, *The
rule*).

The fixed point satisfies the paper's first-order conditions on the fitting split; the criterion a fit
is judged by (sum_k beta_k e_k with each e_k judged by its upper bound, plus cost * P(reject) at a
cost) can be lower elsewhere in the family, and at full coverage, where the rule is the argmax of
reweighted posteriors, the fixed point only ever offers the one reweighting its first-order
conditions give. The search starts from the fixed point's rule and moves only to rules that its
criterion judges better.

Coordinates. Dividing every score of a rule by the first group's coefficient, and shifting every mu by
the first group's, moves each margin by the same affine map, so the decisions at a coverage do not
change; for k = 1..K-1 the 2(K - 1) numbers

    u_k = log(coef_k / coef_0),    m_k = (mu_k - mu_0) / coef_k

(coef_k = K beta_k / alpha_k) span the family at a coverage. m_k is on the scale of an error (at the
fixed point mu_k = coef_k e_k). At a cost, the threshold t on the normalised margin is one more
coordinate.

The search is coordinate-wise and coarse to fine: in each sweep every coordinate's line is tried on a
grid of `POINTS` values across its span, all at once, and the best rule found moves the search; after
`SWEEPS` sweeps (or a sweep that finds nothing better) the spans shrink to one grid step, `LEVELS`
times. A batch of T problems (one per target coverage) is searched together.

Smoothed. The default fit searches a smoothed criterion (`smoothed`): each rule's criterion averaged
with its neighbours' one width away along each coordinate of the family's shape, so that a narrow dip
that the fitting and selection splits' noise digs is not taken for the family's best rule.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

#: The first spans: u over a factor of 16 either way, m over +-1 (an error's scale), t over +-0.5.
SPAN_U, SPAN_M, SPAN_T = math.log(16.0), 1.0, 0.5
#: Grid points per line (odd: the current value is one), sweeps per level, levels of refinement.
POINTS, SWEEPS, LEVELS = 9, 2, 4
#: Candidate rules scored at once (`_in_chunks`).
CHUNK = 32

#: (theta [R, D], owner [R]: the problem each row belongs to) -> the criterion [R], lower is better
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The neighbourhood a smoothed criterion averages over (`smoothed`): each u_k a factor of sqrt(2)
#: either way, each m_k 0.02 either way (an error's scale); a cost fit's threshold is not smoothed.
SMOOTH_U, SMOOTH_M = math.log(2.0) / 2, 0.02
#: Levels of a smoothed search: the fourth level's steps (a 1.1% change of a coefficient ratio, 0.004
#: of m) are far inside the neighbourhood the average spans, and it changed the fashion-mnist-lt areas
#: by less than their noise (docs/design.md, *What the search is judged on*).
SMOOTH_LEVELS = 3


def coordinates(coef: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """theta [..., 2(K-1)] = (u, m) of rules (coef, mu [..., K]); coef must be positive."""
    u = torch.log(coef[..., 1:] / coef[..., :1])
    m = (mu[..., 1:] - mu[..., :1]) / coef[..., 1:]
    return torch.cat([u, m], dim=-1)


def rule_of(theta: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef, mu) [..., K] of coordinates theta [..., 2(K-1)] (its first 2(K-1) entries), with coef_0 =
    1 and mu_0 = 0."""
    u, m = theta[..., :n_groups - 1], theta[..., n_groups - 1:2 * (n_groups - 1)]
    ones = torch.ones_like(u[..., :1])
    coef = torch.cat([ones, torch.exp(u)], dim=-1)
    return coef, torch.cat([torch.zeros_like(ones), torch.exp(u) * m], dim=-1)


def spans(n_groups: int, threshold: bool, device: torch.device) -> torch.Tensor:
    """The first span of each coordinate: u, m (and t when `threshold`)."""
    values = [SPAN_U] * (n_groups - 1) + [SPAN_M] * (n_groups - 1) + ([SPAN_T] if threshold else [])
    return torch.tensor(values, dtype=torch.float64, device=device)


def smoothed(score: Score, n_groups: int, dims: int, scale: torch.Tensor | None = None) -> Score:
    """`score` averaged over each rule and its 4(K - 1) neighbours one width away along each u_k and m_k
    (`SMOOTH_U`, `SMOOTH_M`), for coordinates of `dims` entries (2(K - 1), and the threshold after
    them); with `scale` [T], problem t's widths times scale[t] (0: its criterion as it is). A rule
    whose criterion dips where its neighbours' do not is one that the selection split's noise
    favours; the average prefers the rules that are good together with their neighbours
    (docs/design.md, *What the search is judged on*)."""
    shape = 2 * (n_groups - 1)
    width = torch.tensor([SMOOTH_U] * (n_groups - 1) + [SMOOTH_M] * (n_groups - 1), dtype=torch.float64)
    steps = torch.zeros(shape, dims, dtype=torch.float64)
    steps[:, :shape] = torch.diag(width)
    offsets = torch.cat([torch.zeros(1, dims, dtype=torch.float64), steps, -steps])  # [J, D]

    def averaged(theta: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        near = offsets.to(theta.device)
        j = near.shape[0]
        moved = theta[:, None, :] + near[None] * (1.0 if scale is None else scale[owner][:, None, None])
        values = score(moved.reshape(-1, dims), owner.repeat_interleave(j))
        return values.view(-1, j).mean(dim=1)

    return averaged


def search(score: Score, theta: torch.Tensor, span: torch.Tensor, first_level: int = 0,
           levels: int = LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse-to-fine coordinate search of the module docstring, for T problems at once from
    theta [T, D] with first spans `span` [D] (from `first_level` on: a start known to be close, such
    as the previous round's rule, skips the coarse levels): the best coordinates found [T, D] and their
    criterion [T]. A problem moves only to a rule whose criterion is strictly lower."""
    t, d = theta.shape
    theta = theta.clone()
    best = score(theta, torch.arange(t, device=theta.device))
    offsets = torch.linspace(-1.0, 1.0, POINTS, dtype=torch.float64, device=theta.device)
    offsets = offsets[offsets != 0]  # the current rule's criterion is `best` already
    step = span * (2.0 / (POINTS - 1)) ** first_level
    axis = torch.eye(d, dtype=torch.float64, device=theta.device)  # [D, D]
    for _ in range(first_level, levels):
        # A problem that did not move in a sweep would see the same lines again in the next one.
        active = torch.arange(t, device=theta.device)
        for _ in range(SWEEPS):
            moves = (axis[:, None, :] * step[None, None, :]) * offsets[None, :, None]  # [D, P - 1, D]
            candidates = (theta[active, None, None, :] + moves[None]).reshape(-1, d * (POINTS - 1), d)
            owner = active.repeat_interleave(d * (POINTS - 1))
            values = _in_chunks(score, candidates.reshape(-1, d), owner).view(-1, d * (POINTS - 1))
            value, which = values.min(dim=1)
            better = value < best[active]
            if not bool(better.any()):
                break
            theta[active[better]] = candidates[better, which[better]]
            best[active[better]] = value[better]
            active = active[better]
        step = step * 2.0 / (POINTS - 1)
    return theta, best


def _in_chunks(score: Score, theta: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """`score` of the rows of theta, `CHUNK` rows at a time: a criterion makes several passes over a
    [rows, N] margin matrix, and a chunk's stays in the processor's cache between them (with the
    smoothed criterion, the evaluate stage's comparison took 12.6 s instead of 15.9 s on an Intel Xeon,
    `python bench/evaluate_time.py`)."""
    if theta.shape[0] <= CHUNK:
        return score(theta, owner)
    return torch.cat([score(theta[i:i + CHUNK], owner[i:i + CHUNK]) for i in range(0, theta.shape[0], CHUNK)])
