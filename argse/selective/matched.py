"""The coverage-matched protocol (`argse.selective.compare` documents it): every method's operating
point at each target coverage, chosen on val and measured on a split, and the areas over the grid.

`matched_aurc` and `matched_aurc_gap` are the numbers the comparison table reports for a plug-in, without
the table: what the gating loop chooses a gate by. Pure computation on posteriors, no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from argse import OBJECTIVES
from argse.data.splits import EVAL_SPLITS
from argse.selective import PluginRule, chow, fit_at_coverage
from argse.selective import checks as check
from argse.selective.cut import top_share_cut
from argse.selective.fit import FitOptions
from argse.selective.metrics import error_bound, group_errors

#: The rules are fitted on FIT_SPLIT (S1) and selected on SEL_SPLIT (S2); a method carries every EVAL_SPLIT.
FIT_SPLIT, SEL_SPLIT = "tunev", "val"
KINDS = ("chow", "plugin")
#: The target coverages of the coverage-matched comparison: 1.00, 0.95, ..., 0.20.
COVERAGES = tuple(round(1.0 - 0.05 * i, 2) for i in range(17))
#: The level of the bootstrap intervals of the AURCs.
CI_LEVEL = 0.95

@dataclass
class Method:
    """One row of the comparison.

    `eta` maps each split ("tunev", "val", "test") to posteriors [N_split, C]; every method must score
    the same samples. kind "chow" takes no objective; kind "plugin" takes objective "balanced" or
    "worst" and optionally a fixed `rule` (e.g. the AR-GSE model's own); without one, the rule is fitted
    on tunev / val at the operating cost.
    """

    name: str
    kind: str
    eta: Mapping[str, Any]
    objective: Optional[str] = None
    rule: Optional[PluginRule] = None


def check_coverages(coverages: Sequence[float]) -> tuple[float, ...]:
    """The coverage grid, validated and sorted descending: at least two distinct values in (0, 1]."""
    try:
        values = [float(v) for v in coverages]
    except (TypeError, ValueError):
        raise ValueError(f"coverages must be numbers in (0, 1]; got {coverages!r}.") from None
    bad = [v for v in values if not (math.isfinite(v) and 0.0 < v <= 1.0)]
    if bad:
        raise ValueError(f"coverages must lie in (0, 1]; got {bad[0]:g}.")
    grid = tuple(sorted(set(values), reverse=True))
    if len(grid) < 2:
        raise ValueError(f"coverages must hold at least two distinct values (an area needs two points); got {values}.")
    return grid


# --------------------------------------------------------------------------------------------------
# Input validation


@dataclass(frozen=True)
class Inputs:
    """Validated labels and weights per split, and the groups."""

    y: dict[str, torch.Tensor]
    w: dict[str, torch.Tensor]
    class_to_group: torch.Tensor
    n_groups: int


def check_inputs(
    methods: Sequence[Method], labels: Mapping[str, Any], weights: Optional[Mapping[str, Any]],
    class_to_group: Any, split: str,
) -> tuple[Inputs, dict[str, dict[str, torch.Tensor]]]:
    """The comparison's inputs validated (a sentence naming what is wrong otherwise): the labels,
    weights and groups, and each method's posteriors on the splits the comparison of `split` needs."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {list(EVAL_SPLITS)}; got {split!r}.")
    if not methods:
        raise ValueError("methods must hold at least one Method.")
    needed = (FIT_SPLIT, SEL_SPLIT) if split in (FIT_SPLIT, SEL_SPLIT) else (FIT_SPLIT, SEL_SPLIT, split)
    c2g, n_groups = check.class_to_group(class_to_group, torch.device("cpu"))
    n_classes = c2g.shape[0]
    missing = [s for s in needed if s not in labels]
    if missing:
        raise ValueError(f"labels must have an entry for every split in {list(needed)}; missing {missing}.")
    y = {s: check.labels(labels[s], f"labels[{s!r}]", None, n_classes, torch.device("cpu")) for s in needed}
    weights = weights or {}
    w = {s: check.weights(weights.get(s), f"weights[{s!r}]", y[s].shape[0], torch.device("cpu")) for s in needed}

    seen: set[str] = set()
    eta: dict[str, dict[str, torch.Tensor]] = {}
    for m in methods:  # a loop over methods
        if not isinstance(m, Method):
            raise ValueError(f"methods must be Method objects; got {type(m).__name__}.")
        if not m.name or m.name in seen:
            raise ValueError(f"method names must be non-empty and unique; {m.name!r} is not.")
        seen.add(m.name)
        if m.kind not in KINDS:
            raise ValueError(f"method {m.name!r} has kind {m.kind!r}; kind must be one of {list(KINDS)}.")
        if m.kind == "chow" and (m.objective is not None or m.rule is not None):
            raise ValueError(f"method {m.name!r} is a Chow method and takes neither an objective nor a rule.")
        if m.kind == "plugin" and m.objective not in OBJECTIVES:
            raise ValueError(f"plug-in method {m.name!r} needs objective in {list(OBJECTIVES)}; got {m.objective!r}.")
        if m.rule is not None and not isinstance(m.rule, PluginRule):
            raise ValueError(f"method {m.name!r} has a rule of type {type(m.rule).__name__}; it must be a PluginRule.")
        if m.rule is not None and m.rule.n_classes != n_classes:
            raise ValueError(f"method {m.name!r} has a rule for {m.rule.n_classes} classes; the data has {n_classes}.")
        absent = [s for s in needed if s not in m.eta]
        if absent:
            raise ValueError(f"method {m.name!r} has no posteriors for split(s) {absent}; it needs {list(needed)}.")
        eta[m.name] = {}
        for s in needed:
            t = check.posteriors(m.eta[s], f"{m.name}.eta[{s!r}]", n_classes, torch.device("cpu"))
            if t.shape[0] != y[s].shape[0]:
                raise ValueError(
                    f"method {m.name!r} has {t.shape[0]} samples on {s!r} but labels[{s!r}] has {y[s].shape[0]}; "
                    "every method must score the same samples."
                )
            eta[m.name][s] = t
    return Inputs(y=y, w=w, class_to_group=c2g, n_groups=n_groups), eta


def quantile_threshold(confidence: torch.Tensor, w: torch.Tensor, target: float) -> float:
    """The largest threshold t such that the weighted share of confidence >= t is at least `target`."""
    return float(top_share_cut(confidence[None], w, torch.tensor([target], dtype=torch.float64))[0])


@dataclass(frozen=True)
class Matched:
    """A method's decisions on the evaluated split at each target coverage: pred and accept [T, N]."""

    pred: torch.Tensor
    accept: torch.Tensor
    rules: Optional[list[PluginRule]]


def coverage_matched(m: Method, eta: dict[str, torch.Tensor], data: Inputs, split: str,
                      taus: tuple[float, ...], options: FitOptions) -> Matched:
    """The operating point at every target coverage, chosen on val (see the module docstring)."""
    if m.kind == "chow":
        pred, confidence = chow(eta[split])
        _, confidence_val = chow(eta[SEL_SPLIT])
        thresholds = torch.tensor([quantile_threshold(confidence_val, data.w[SEL_SPLIT], tau) for tau in taus],
                                  dtype=confidence.dtype)
        return Matched(pred=pred.expand(len(taus), -1), accept=confidence[None] >= thresholds[:, None], rules=None)
    rules = fit_at_coverage(
        eta[FIT_SPLIT], data.y[FIT_SPLIT], eta[SEL_SPLIT], data.y[SEL_SPLIT], data.class_to_group, taus,
        objective=m.objective, weights_fit=data.w[FIT_SPLIT], weights_sel=data.w[SEL_SPLIT], options=options,
    )
    decisions = [rule.predict(eta[split]) for rule in rules]  # a loop over target coverages
    return Matched(pred=torch.stack([d.pred for d in decisions]), accept=torch.stack([d.accept for d in decisions]),
                    rules=rules)


@dataclass(frozen=True)
class GroupTally:
    """Per target and group [T, K] (or per resample [B, T, K]): accepted weight, accepted-and-wrong
    weight, accepted squared weight and accepted sample count."""

    accepted: torch.Tensor
    wrong: torch.Tensor
    accepted_sq: torch.Tensor
    count: torch.Tensor


def group_masses(matched: Matched, y: torch.Tensor, w: torch.Tensor, c2g: torch.Tensor, n_groups: int,
                  counts: Optional[torch.Tensor] = None) -> GroupTally:
    """The `GroupTally` of the decisions per target, [T, K]; with `counts` [B, N] (how often each sample
    is drawn in each of B resamples), per resample: [B, T, K] (a sample drawn c times counts c times)."""
    t, n = matched.accept.shape
    member = torch.nn.functional.one_hot(c2g[y], n_groups).to(torch.float64)  # [N, K]
    taken = matched.accept.to(torch.float64)[..., None] * member  # [T, N, K]
    wrong = (matched.pred != y).to(torch.float64)[..., None]
    parts = (taken * w[:, None], taken * w[:, None] * wrong, taken * (w * w)[:, None], taken)
    if counts is None:
        return GroupTally(*(part.sum(dim=1) for part in parts))
    flat = lambda x: x.permute(1, 0, 2).reshape(n, -1)  # noqa: E731  [N, T*K]
    shape = (counts.shape[0], t, n_groups)
    return GroupTally(*((counts @ flat(part)).view(shape) for part in parts))


def matched_errors(tally: GroupTally, evidence: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group errors (1.0 where nothing is accepted), balanced and worst error, from `group_masses`;
    with `evidence`, each group error is its upper confidence bound at that one-sided confidence
    (`error_bound`), as a choice judges it."""
    if evidence is not None:
        group_error = error_bound(tally.accepted, tally.wrong, tally.accepted_sq, evidence)
    else:
        group_error = group_errors(tally.accepted, tally.wrong)
    return group_error, group_error.mean(dim=-1), group_error.max(dim=-1).values


def trapezoid(x: Sequence[float], risk: Any) -> Any:
    """The trapezoid area of (x, risk) points along the last axis of `risk`, x in any order."""
    x = torch.as_tensor(x, dtype=torch.float64)
    order = x.argsort()
    x, risk = x[order], torch.as_tensor(risk, dtype=torch.float64)[..., order]
    return ((x[1:] - x[:-1]) * (risk[..., 1:] + risk[..., :-1]) / 2).sum(dim=-1)


def resample_counts(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """[B, N]: how often each of the N samples is drawn in each of B bootstrap resamples (with replacement)."""
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = np.bincount((index + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    return torch.from_numpy(flat.reshape(n_boot, n).astype(np.float64))


def _matched_areas(
    etas: Sequence[Mapping[str, Any]], labels: Mapping[str, Any], weights: Optional[Mapping[str, Any]],
    class_to_group: Any, objective: str, split: str, coverages: Sequence[float], fit_options: FitOptions,
    n_boot: int = 0, seed: int = 0, judged: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The coverage-matched AURC of the objective's error of the plug-in on each posterior of `etas`,
    measured on `split`: [M]; and, when `n_boot` > 0, on that many bootstrap resamples of the split,
    the same for every posterior, with every operating point fixed: [M, B] (else None). `judged`:
    the group errors by their upper confidence bounds at `fit_options.evidence` (`matched_errors`)."""
    evidence = fit_options.evidence if judged else None
    methods = [Method(f"plugin{i}", "plugin", eta, objective) for i, eta in enumerate(etas)]
    data, checked = check_inputs(methods, labels, weights, class_to_group, split)
    taus = check_coverages(coverages)
    y, w, c2g = data.y[split], data.w[split], data.class_to_group
    counts = resample_counts(y.shape[0], n_boot, seed) if n_boot else None
    points, boots = [], []
    for m in methods:  # a loop over (two) posteriors
        matched = coverage_matched(m, checked[m.name], data, split, taus, fit_options)
        column = 2 if objective == "worst" else 1  # matched_errors: group, balanced, worst
        points.append(trapezoid(taus, matched_errors(group_masses(matched, y, w, c2g, data.n_groups), evidence)[column]))
        if counts is not None:
            boots.append(trapezoid(taus, matched_errors(group_masses(matched, y, w, c2g, data.n_groups, counts),
                                                 evidence)[column]))
    return torch.stack(points), (torch.stack(boots) if boots else None)


def matched_aurc(
    eta: Mapping[str, Any],
    labels: Mapping[str, Any],
    weights: Optional[Mapping[str, Any]],
    class_to_group: Any,
    objective: str,
    *,
    split: str = SEL_SPLIT,
    coverages: Sequence[float] = COVERAGES,
    fit_options: FitOptions = FitOptions(),
    judged: bool = False,
) -> float:
    """The coverage-matched AURC of the `objective`'s error (balanced or worst-group) of the plug-in
    rule on posteriors `eta` (split -> [N, C]), measured on `split`: the number `compare` reports for
    such a method, without the table or the intervals. For choosing between posteriors on val, pass
    `judged=True`: each group error then enters as its upper confidence bound (`error_bound`), so
    that posteriors whose rules accept a group on a handful of val images are not preferred for it."""
    return float(_matched_areas([eta], labels, weights, class_to_group, objective, split, coverages, fit_options,
                                judged=judged)[0][0])


def matched_aurc_gap(
    eta: Mapping[str, Any],
    reference: Mapping[str, Any],
    labels: Mapping[str, Any],
    weights: Optional[Mapping[str, Any]],
    class_to_group: Any,
    objective: str,
    *,
    split: str = SEL_SPLIT,
    coverages: Sequence[float] = COVERAGES,
    fit_options: FitOptions = FitOptions(),
    n_boot: int = 200,
    seed: int = 0,
    judged: bool = False,
) -> tuple[float, float, float]:
    """`matched_aurc` of `eta` minus that of `reference` on `split` (both `judged` or both not), with
    the 95% percentile interval of the difference over `n_boot` paired bootstrap resamples of the split
    (operating points fixed, the same resamples for both): (gap, lo, hi). A negative `hi` says `eta`
    is better beyond the split's sampling noise."""
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1; got {n_boot!r}.")
    point, boot = _matched_areas([eta, reference], labels, weights, class_to_group, objective, split, coverages,
                                 fit_options, int(n_boot), seed, judged)
    lo, hi = np.quantile((boot[0] - boot[1]).numpy(), [(1.0 - CI_LEVEL) / 2.0, (1.0 + CI_LEVEL) / 2.0]).tolist()
    return float(point[0] - point[1]), lo, hi


