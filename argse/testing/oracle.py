"""The exhaustive search over the K = 2 plug-in rule family that the fit tests compare against,
written independently of the library (one copy, shared by the tests that need an optimum).

A problem is given as cells: posteriors eta [G, C] and the joint mass p(cell, class) [G, C]. A
population is its own cells; a sample of N rows (eta, y, w) is the cells `sample_cells` gives (one
cell per row, its mass on its label). Dividing a rule's margin by the head's coefficient leaves three
numbers: rho = coef_1 / coef_0 (the tail's coefficient over the head's), delta = (mu_1 - mu_0) /
coef_0, and the threshold. The searches try every rho of a grid and every delta of a grid that may
depend on rho, and, for each, the threshold exactly: the cells sorted by margin, every cut.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


def sample_cells(eta: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of a weighted sample: row i is a cell whose mass w_i / sum w sits on its label y_i."""
    w = torch.ones(eta.shape[0], dtype=torch.float64) if w is None else w.to(torch.float64)
    joint = torch.nn.functional.one_hot(y, eta.shape[1]).to(torch.float64) * (w / w.sum())[:, None]
    return eta.to(torch.float64), joint


def sweep(cells, class_to_group: torch.Tensor, rhos: Sequence[float],
          deltas: Callable[[float], Sequence[float]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For every rule (rho, delta) of the grids, the cells in decreasing order of its margin: yields,
    per rho, (margin [D, G] sorted, accepted mass [D, G, 2] and accepted-and-wrong mass [D, G, 2] of
    each group when the cells up to that one are accepted)."""
    eta, joint = cells
    onehot = torch.nn.functional.one_hot(class_to_group, 2).to(torch.float64)
    group_mass, group_share = joint @ onehot, eta @ onehot  # [G, 2] p(cell, y in G_k), P(y in G_k | cell)
    head, tail = (class_to_group == 0).nonzero().flatten(), (class_to_group == 1).nonzero().flatten()
    top = torch.stack([eta[:, head].max(dim=1).values, eta[:, tail].max(dim=1).values], dim=1)
    top_class = torch.stack([head[eta[:, head].argmax(dim=1)], tail[eta[:, tail].argmax(dim=1)]], dim=1)
    for rho in rhos:
        pick_tail = rho * top[:, 1] > top[:, 0]
        pred = torch.where(pick_tail, top_class[:, 1], top_class[:, 0])
        right = torch.nn.functional.one_hot(pred, eta.shape[1]).to(torch.float64) * joint
        wrong_mass = group_mass - right @ onehot
        base = torch.maximum(top[:, 0], rho * top[:, 1]) - group_share[:, 0] - rho * group_share[:, 1]
        d = torch.as_tensor(np.asarray(deltas(float(rho)), dtype=np.float64))
        margin, order = (base[None] + d[:, None] * group_share[None, :, 1]).sort(dim=1, descending=True)
        yield margin, group_mass[order].cumsum(dim=1), wrong_mass[order].cumsum(dim=1)


def _errors(accepted: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """Group errors; 1.0 for a group with nothing accepted."""
    return torch.where(accepted > 0, wrong / accepted.clamp_min(1e-300), torch.ones_like(accepted))


def _objective(errors: torch.Tensor, kind: str) -> torch.Tensor:
    return errors.mean(dim=-1) if kind == "balanced" else errors.max(dim=-1).values


def best_at_coverage(cells, class_to_group: torch.Tensor, taus: Sequence[float], kind: str, rhos: Sequence[float],
                     deltas: Callable[[float], Sequence[float]], more: Sequence[tuple[object, float]] = ()) -> torch.Tensor:
    """The lowest balanced (or worst-group) error [T] among the rules of the grids that accept a share
    of at least tau: each at the first cut, in margin order, whose accepted mass reaches tau. With
    `more` ((cells, share) of other samples; `cells` then has the share left over), each sample is cut
    at tau on its own and the errors are those of all the samples together, each one's masses scaled
    by its share."""
    samples = [(cells, 1.0 - sum(share for _, share in more)), *more]
    tau = torch.tensor(list(taus), dtype=torch.float64)
    best = torch.full((len(tau),), math.inf, dtype=torch.float64)
    for swept in zip(*(sweep(one, class_to_group, rhos, deltas) for one, _ in samples)):
        accepted, wrong = 0.0, 0.0
        for (_, acc, bad), (_, share) in zip(swept, samples):
            cut = (acc.sum(dim=2)[:, None, :] < tau[None, :, None] - 1e-12).sum(dim=2)  # [D, T]
            at = cut.clamp_max(acc.shape[1] - 1)[..., None].expand(-1, -1, 2)
            accepted = accepted + share * acc.gather(1, at)
            wrong = wrong + share * bad.gather(1, at)
        value = _objective(_errors(accepted, wrong), kind)  # [D, T]
        best = torch.minimum(best, value.min(dim=0).values)
    return best


def best_at_cost(cells, class_to_group: torch.Tensor, cost: float, kind: str, rhos: Sequence[float],
                 deltas: Callable[[float], Sequence[float]]) -> float:
    """The lowest L2R risk (balanced or worst-group error + cost * P(reject)) over the rules of the
    grids, the threshold at every cut between distinct margins."""
    best = math.inf
    for margin, accepted, wrong in sweep(cells, class_to_group, rhos, deltas):
        risk = _objective(_errors(accepted, wrong), kind) + cost * (1 - accepted.sum(dim=-1))
        risk[:, :-1] = torch.where(margin[:, 1:] == margin[:, :-1], math.inf, risk[:, :-1])  # no cut inside ties
        best = min(best, float(risk.min()))
    return best
