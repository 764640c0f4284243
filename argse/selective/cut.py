"""Where the top share of a weight is reached: the cut a coverage sets on a score.

A rule fitted for a coverage accepts the samples whose margin is at or above the value where the
samples, taken in decreasing order of margin, reach that share of the split's weight. Every
coverage-constrained choice in `argse.selective` finds its threshold here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def top_share_cut(values: torch.Tensor, weight: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The value [S] of the last sample taken when the samples are taken in decreasing order of each
    row of `values` [S, N] until their share of `weight` [N] reaches `level[s]`. Accepting every sample
    at or above it accepts that top share (samples tied with the last one taken come with it, so the
    share may exceed the level)."""
    if values.device.type == "cpu":
        arrays = values.numpy(), weight.numpy(), level.numpy()
        for observe in CUT_OBSERVERS:
            observe(*arrays)
        return torch.from_numpy(top_share_cut_cpu(*arrays))
    order = values.argsort(dim=1, descending=True)
    cum = weight[order].cumsum(dim=1) / weight.sum()
    take = ((cum < level[:, None] - 1e-12).sum(dim=1) + 1).clamp_max(values.shape[1])
    return values.gather(1, order.gather(1, (take - 1)[:, None]))[:, 0]


#: Functions given the inputs (values, weight, level) of every cut :func:`top_share_cut` makes on the
#: CPU, before it is made: how bench/top_share_cut.py records the calls a real fit makes. Empty unless a
#: caller appends one.
CUT_OBSERVERS: list[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = []

#: `top_share_cut_cpu`: the strided sample per row that brackets the cut, and the sample positions
#: kept on either side of the sample's own cut (a bracket that misses is caught, and that row sorted).
_SAMPLE, _BRACKET = 256, 12


def top_share_cut_cpu(values: np.ndarray, weight: np.ndarray, level: np.ndarray) -> np.ndarray:
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


def accept_top(margin: torch.Tensor, weight: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Accept masks [S, N] of S margins [S, N]: the top share `level[s]` of the weight (`top_share_cut`)."""
    return margin >= top_share_cut(margin, weight, level)[:, None]


def threshold_at_level(margin: torch.Tensor, weight: torch.Tensor, level: float) -> float:
    """A threshold that accepts exactly the top share `level` of the weight (ties taken together):
    halfway between the last margin taken and the next lower distinct one, so that float error in a
    shifted margin cannot flip a decision."""
    cut = top_share_cut(margin[None], weight, torch.tensor([level], dtype=torch.float64, device=margin.device))[0]
    lower = margin[margin < cut]
    if lower.numel() == 0:  # everything accepted: keep a little room below the lowest margin
        return float(cut - 1e-9 * (1.0 + cut.abs()))
    return float((cut + lower.max()) / 2)
