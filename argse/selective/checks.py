"""Input checks shared by `argse.selective`.

Every public function converts its inputs here, so a wrong shape, a label out of range or a posterior
that is not a distribution stops with one sentence that names the argument (scikit-learn style)
instead of an IndexError deep inside the maths.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch

from argse import OBJECTIVES

ArrayLike = Union[torch.Tensor, np.ndarray]

#: Rows of a posterior may miss 1 by this much (float32 / bf16 softmax outputs).
SUM_TOLERANCE = 1e-3


def as_tensor(x: Any, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """`x` (tensor, numpy array or nested list) as a detached tensor, optionally moved to `device`."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise ValueError(f"{name} must be a torch tensor or a numpy array; got {type(x).__name__}.") from exc
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a numeric torch tensor or numpy array; got dtype {arr.dtype}.")
        t = torch.from_numpy(np.array(arr, copy=True))
    return t if device is None else t.to(device)


def _is_integral(t: torch.Tensor) -> bool:
    if not torch.is_floating_point(t):
        return True
    return bool(torch.isfinite(t).all()) and bool((t == t.round()).all())


def class_to_group(x: Any, device: Optional[torch.device] = None) -> tuple[torch.Tensor, int]:
    """`class_to_group` as a long tensor [C] and the number of groups K = max + 1."""
    t = as_tensor(x, "class_to_group", device)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"class_to_group must be a non-empty 1-D integer array [C]; got shape {tuple(t.shape)}.")
    if t.dtype == torch.bool or not _is_integral(t):
        raise ValueError("class_to_group must hold integer group indices 0..K-1.")
    t = t.long()
    if int(t.min()) < 0:
        raise ValueError(f"class_to_group must hold group indices 0..K-1; got {int(t.min())}.")
    n_groups = int(t.max()) + 1
    empty = (torch.bincount(t, minlength=n_groups) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"class_to_group must use every group 0..K-1 (K = max + 1 = {n_groups}); group(s) {empty} have no class."
        )
    return t, n_groups


def posteriors(x: Any, name: str, n_classes: Optional[int] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """`x` as a float64 [N, C] tensor whose rows are distributions over the C classes.

    Rows must sum to 1 within SUM_TOLERANCE; they are then renormalised to sum to 1 exactly."""
    t = as_tensor(x, name, device)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array of posteriors [N, C] with N, C >= 1; got shape {tuple(t.shape)}.")
    if n_classes is not None and t.shape[1] != n_classes:
        raise ValueError(f"{name} must have C = {n_classes} columns (the length of class_to_group); got {t.shape[1]}.")
    if t.dtype == torch.bool:
        t = t.long()
    return distributions(t.to(torch.float64), name)


def distributions(t: torch.Tensor, name: str) -> torch.Tensor:
    """A floating tensor [..., C] whose rows (along the last dimension) are distributions: finite,
    non-negative, summing to 1 within SUM_TOLERANCE; returned renormalised to sum to 1 exactly, in
    its own dtype."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite posteriors; it contains NaN or infinity.")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be posteriors (rows of non-negative numbers summing to 1); it has negative entries.")
    sums = t.sum(dim=-1)
    bad = ((sums - 1.0).abs() > SUM_TOLERANCE).nonzero()
    if bad.shape[0]:
        row = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name} must be posteriors whose rows sum to 1 (within {SUM_TOLERANCE}); "
            f"row {', '.join(map(str, row))} sums to {float(sums[row]):.6g}."
        )
    return t / sums.unsqueeze(-1)


def labels(x: Any, name: str, n: Optional[int], n_classes: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """`x` as a long tensor [n] of class indices in 0..n_classes-1 (any length when n is None)."""
    t = as_tensor(x, name, device)
    if t.ndim != 1 or (n is not None and t.shape[0] != n):
        expected = "N" if n is None else str(n)
        raise ValueError(f"{name} must be a 1-D array of {expected} class labels; got shape {tuple(t.shape)}.")
    if t.dtype == torch.bool or not _is_integral(t):
        raise ValueError(f"{name} must hold integer class labels 0..{n_classes - 1}.")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        lo, hi = int(t.min()), int(t.max())
        raise ValueError(f"{name} must hold class labels in 0..{n_classes - 1}; got values in {lo}..{hi}.")
    return t


def weights(x: Any, name: str, n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Sample weights as a float64 tensor [n]; None means all ones."""
    if x is None:
        return torch.ones(n, dtype=torch.float64, device=device)
    t = as_tensor(x, name, device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of {n} sample weights; got shape {tuple(t.shape)}.")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite, non-negative sample weights.")
    if n and float(t.sum()) <= 0:
        raise ValueError(f"{name} must have a positive total; all weights are zero.")
    return t


def cost(x: Any, name: str = "cost") -> float:
    """A rejection cost: a finite float >= 0."""
    try:
        c = float(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number >= 0; got {x!r}.") from exc
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {c}.")
    return c


def evidence(x: Any) -> Any:
    """The one-sided confidence of an error bound: a number strictly between 0.5 and 1, or None; or a
    function of a `Tally` giving the group errors a choice judges by (another judgement, compared in
    bench/small_groups.py)."""
    if x is None or callable(x):
        return x
    try:
        level = float(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"evidence must be a confidence in (0.5, 1) or None; got {x!r}.") from exc
    if not 0.5 < level < 1.0:
        raise ValueError(f"evidence must be a confidence in (0.5, 1) or None; got {level}.")
    return level


def objective(x: Any) -> str:
    """What a plug-in rule is fitted for: one of OBJECTIVES ("balanced", "worst")."""
    if x not in OBJECTIVES:
        raise ValueError(f"objective must be 'balanced' or 'worst'; got {x!r}.")
    return x


def vector(x: Any, name: str, length: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """A float64 vector of a given length (rule parameters alpha, mu, beta, thresholds)."""
    t = as_tensor(x, name, device)
    if t.ndim != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D array of length K = {length}; got shape {tuple(t.shape)}.")
    return t.to(torch.float64)


def flags(x: Any, name: str, n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """A boolean mask [n] (bool, or 0/1 numbers)."""
    t = as_tensor(x, name, device)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D boolean array of {n} entries; got shape {tuple(t.shape)}.")
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be boolean (or 0/1).")
        t = t != 0
    return t


def scores(x: Any, name: str, n: Optional[int] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """A float64 vector of finite scores (confidences), optionally of length n."""
    t = as_tensor(x, name, device)
    if t.ndim != 1 or t.shape[0] == 0 or (n is not None and t.shape[0] != n):
        expected = f"{n}" if n is not None else "N >= 1"
        raise ValueError(f"{name} must be a 1-D array of {expected} scores; got shape {tuple(t.shape)}.")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; it contains NaN or infinity.")
    return t
