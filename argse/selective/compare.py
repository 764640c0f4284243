"""AR-GSE against its baselines on one split: the numbers behind the evaluate stage.

Pure computation on posteriors, no MLflow: `compare` takes a list of `Method`s (a name, Chow's rule
or the plug-in rejector, and the method's posteriors on tunev / val / test) and returns a `Comparison`
with one table row per method and the coverage-matched points behind it. `metric_dict` flattens the
table into `<method>/<column>` metric names that MLflow accepts.

Protocol, for every method on the evaluated split (all metrics weighted by the split's weights):

* Coverage-matched comparison (what the table ranks by; DESIGN.md §4). For each target coverage tau
  of the grid (`coverages`, default 1.00, 0.95, ..., 0.20) the operating point is chosen on val only
  and then measured on the split. Chow: the largest threshold on the top posterior that accepts a
  weighted share of at least tau of val (samples tied at the threshold accepted together). Plug-in:
  a rule fitted for that coverage (`argse.selective.fit_at_coverage`: alpha, mu and, for the worst
  group, beta fitted with the acceptance level held at tau on tunev, selected on val, its threshold
  set to accept exactly tau of val). `aurc_balanced` / `aurc_worst` are the trapezoid areas of the
  (tau, error) points over the grid, not normalised: with the default grid they lie in [0, 0.8].
  Their 95% percentile-bootstrap intervals resample the split's samples with every operating point
  fixed; every method sees the same resamples. `balanced_error_at<tau>` / `worst_error_at<tau>` read
  the points at tau = 1, 0.8 and 0.6 (those in the grid). A group with no accepted sample has error
  1.0 by convention; `empty_group_points` counts the taus where that happens to a method, and
  `thin_group_points` those where a group has fewer than `MIN_GROUP_ACCEPTED` accepted samples on the
  split (or fewer than all of its samples, where it has fewer than that): there its error is
  measured on too few images to mean much. `group_points` carries each group's accepted count.
* Threshold sweep (secondary, `*_threshold` columns): the full-range area under the risk-coverage
  curve of the method's confidence (Chow: the max posterior; plug-in: the operating rule's margin).
  A plug-in margin ranks the confident samples of one group before any of another, so at low
  coverage its worst group is empty and counts as 1.0: this area does not rank anything.
* Operating point: a plug-in method uses its fixed `rule` (the model's own) as given (its cost must
  equal `cost` unless it has per-group thresholds), or fits one at `cost` on tunev / val. A Chow
  method has no cost of its own, so it is compared at equal coverage: its threshold is the
  max-posterior quantile on val that reaches the reference coverage on val: `target_coverage` when
  given, else the val coverage of the operating rule of the first plug-in method whose name starts
  with "ar-gse", else of the first plug-in method (`Comparison.reference` says which). L2R risks:
  balanced_l2r = balanced_error + cost * (1 - coverage), worst_l2r = worst_error + cost * (1 -
  coverage). Per-group coverage: `coverage_<group name>`; `coverage_val` is the coverage on val.
* ECE (15 bins) of the method's posterior.

Ranking (default `rank_by`): ascending coverage-matched aurc_worst, ties broken by aurc_balanced,
then by the input order; the first row is the best method.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from argse import OBJECTIVES
from argse.selective import (
    PluginRule,
    SelectiveErrors,
    aurc,
    chow,
    ece,
    fit_at_coverage,
    risk_coverage,
    selective_errors,
)
from argse.selective import _validate as check
from argse.selective.metrics import MIN_GROUP_ACCEPTED, error_bound, weighted_coverage
from argse.selective.fit import FitOptions, _group_errors, fit_rule, top_share_cut

#: The splits a method carries; the rules are fitted on FIT_SPLIT (S1) and selected on SEL_SPLIT (S2).
SPLITS = ("tunev", "val", "test")
FIT_SPLIT, SEL_SPLIT = "tunev", "val"
KINDS = ("chow", "plugin")
#: The target coverages of the coverage-matched comparison: 1.00, 0.95, ..., 0.20.
COVERAGES = tuple(round(1.0 - 0.05 * i, 2) for i in range(17))
#: The targets whose errors get their own table columns (the paper's "rejection rate" reading).
READOUT_COVERAGES = (1.0, 0.8, 0.6)
#: The level of the bootstrap intervals of the AURCs.
CI_LEVEL = 0.95
#: The default ranking of the table: ascending in these columns, in this order of precedence.
RANK_BY = ("aurc_worst", "aurc_balanced")
#: The columns of `Comparison.coverage_points`, in order.
POINT_COLUMNS = ("method", "target_coverage", "coverage", "balanced_error", "worst_error", "thin_group")


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


def readout_column(risk: str, tau: float) -> str:
    """The table column of the `risk` ("balanced" or "worst") error at target coverage tau."""
    return f"{risk}_error_at{tau:g}"


def table_columns(group_names: Sequence[str], coverages: Sequence[float] = COVERAGES) -> list[str]:
    """The columns of `Comparison.table`, in order, for groups named `group_names` and a coverage grid."""
    readout = [tau for tau in READOUT_COVERAGES if any(abs(tau - c) < 1e-9 for c in coverages)]
    return [
        "method",
        "aurc_balanced", "aurc_balanced_lo", "aurc_balanced_hi",
        "aurc_worst", "aurc_worst_lo", "aurc_worst_hi",
        *[readout_column(risk, tau) for tau in readout for risk in ("balanced", "worst")],
        "empty_group_points", "thin_group_points",
        "aurc_balanced_threshold", "aurc_worst_threshold",
        "coverage", "coverage_val", "balanced_error", "worst_error", "error", "balanced_l2r", "worst_l2r",
        *[f"coverage_{g}" for g in group_names],
        "ece",
    ]


@dataclass
class Comparison:
    """The result of `compare`: the table (one row per method, best first) and what figures need."""

    table: pd.DataFrame  #: one row per method, `method` first, sorted best first (see the module doc)
    coverage_points: pd.DataFrame  #: POINT_COLUMNS: one row per method and target coverage
    group_points: pd.DataFrame  #: method, target_coverage, group, coverage, error, accepted (count): per group and target
    coverage_rules: dict[str, list[PluginRule]]  #: plug-in method -> its rule at each target coverage
    group_coverage: dict[str, np.ndarray]  #: method -> [K] coverage per group at the operating point
    rules: dict[str, PluginRule]  #: plug-in method -> the rule of its operating point
    reference: str  #: what set the Chow operating points: a method name or "target_coverage"
    reference_coverage: Optional[float]  #: the val coverage Chow methods were matched to (None: no Chow)
    split: str
    cost: float
    coverages: tuple[float, ...]  #: the target coverages, descending

    def to_markdown(self, columns: Optional[Sequence[str]] = None, digits: int = 4) -> str:
        """The table (or the given columns, `method` always first) as a GitHub markdown table."""
        names = [c for c in (columns if columns is not None else self.table.columns) if c != "method"]
        unknown = [c for c in names if c not in self.table.columns]
        if unknown:
            raise ValueError(f"columns must be columns of the table; unknown: {unknown}.")
        header = ["method", *names]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join([":---"] + ["---:"] * len(names)) + "|",
        ]
        for _, row in self.table.iterrows():  # a loop over methods
            cells = [str(row["method"]).replace("|", "\\|")] + [_format(row[c], digits) for c in names]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _format(value: Any, digits: int) -> str:
    if _is_number(value):
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else str(float(value))
    return "" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------------------------------
# Metric names


_METRIC_NAME = re.compile(r"^[/\w.\- ]*$")


def _sanitise(part: str) -> str:
    part = part.replace("[", ".").replace("]", "")
    return re.sub(r"[^\w.\- ]", "_", part)


def metric_key(method: str, column: str) -> str:
    """The MLflow metric name of a table cell: `<method>/<column>` with the method and column made valid.

    MLflow metric names may hold only letters, digits, `_ - . /` and spaces (`mlflow.utils.validation`;
    colons are refused on Windows, brackets everywhere). Mapping: "[" becomes ".", "]" is dropped, and
    any other disallowed character (a "/" inside a name included) becomes "_". So "ar-gse[worst]" and
    "aurc_worst" give "ar-gse.worst/aurc_worst", and "chow[uniform-ensemble]" gives
    "chow.uniform-ensemble/...".
    """
    key = f"{_sanitise(str(method))}/{_sanitise(str(column))}"
    if not _METRIC_NAME.match(key) or posixpath.normpath(key) != key or key.startswith("..") or len(key) > 250:
        raise ValueError(f"method {method!r} and column {column!r} give no valid MLflow metric name ({key!r}).")
    return key


def metric_dict(comparison: Comparison) -> dict[str, float]:
    """Every numeric cell of the table as {metric_key(method, column): value}, for mlflow.log_metrics."""
    out: dict[str, float] = {}
    for record in comparison.table.to_dict(orient="records"):  # a loop over methods
        for column, value in record.items():
            if column == "method" or not _is_number(value):
                continue
            key = metric_key(record["method"], column)
            if key in out:
                raise ValueError(f"two cells map to the metric name {key!r}; rename the methods so they differ.")
            out[key] = float(value)
    return out


# --------------------------------------------------------------------------------------------------
# Input validation


@dataclass(frozen=True)
class _Data:
    """Validated labels and weights per split, and the groups."""

    y: dict[str, torch.Tensor]
    w: dict[str, torch.Tensor]
    class_to_group: torch.Tensor
    n_groups: int


def _check_inputs(
    methods: Sequence[Method], labels: Mapping[str, Any], weights: Optional[Mapping[str, Any]],
    class_to_group: Any, split: str,
) -> tuple[_Data, dict[str, dict[str, torch.Tensor]]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}.")
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
    return _Data(y=y, w=w, class_to_group=c2g, n_groups=n_groups), eta


# --------------------------------------------------------------------------------------------------
# The comparison


def _decisions(
    method: Method, rule: Optional[PluginRule], eta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions [N], the confidence the threshold sweep ranks by [N], and the plug-in rule's accept
    mask [N] (all True for Chow, whose operating threshold `compare` sets from the reference coverage)."""
    if method.kind == "chow":
        pred, confidence = chow(eta)
        return pred, confidence, torch.ones_like(pred, dtype=torch.bool)
    decision = rule.predict(eta)
    confidence = decision.margin
    if rule.thresholds is not None:  # the rule accepts iff margin >= t_(predicted group)
        confidence = confidence - rule.thresholds[decision.group]
        # A rejected group (t_k = +inf) ranks below every finite confidence; a t_k = -inf group above.
        finite = confidence[torch.isfinite(confidence)]
        low, high = (float(finite.min()) - 1.0, float(finite.max()) + 1.0) if finite.numel() else (-1.0, 1.0)
        confidence = torch.nan_to_num(confidence, neginf=low, posinf=high)
    return decision.pred, confidence, decision.accept


def _fit_rule(
    method: Method, eta: dict[str, torch.Tensor], data: _Data, cost: float, options: FitOptions,
) -> PluginRule:
    """The method's plug-in rule at `cost`, fitted on tunev (S1) and selected on val (S2)."""
    return fit_rule(method.objective, eta[FIT_SPLIT], data.y[FIT_SPLIT], eta[SEL_SPLIT], data.y[SEL_SPLIT],
                    data.class_to_group, cost, weights_fit=data.w[FIT_SPLIT], weights_sel=data.w[SEL_SPLIT],
                    options=options)


def _quantile_threshold(confidence: torch.Tensor, w: torch.Tensor, target: float) -> float:
    """The largest threshold t such that the weighted share of confidence >= t is at least `target`."""
    return float(top_share_cut(confidence[None], w, torch.tensor([target], dtype=torch.float64))[0])


@dataclass(frozen=True)
class _Matched:
    """A method's decisions on the evaluated split at each target coverage: pred and accept [T, N]."""

    pred: torch.Tensor
    accept: torch.Tensor
    rules: Optional[list[PluginRule]]


def _coverage_matched(m: Method, eta: dict[str, torch.Tensor], data: _Data, split: str,
                      taus: tuple[float, ...], options: FitOptions) -> _Matched:
    """The operating point at every target coverage, chosen on val (see the module docstring)."""
    if m.kind == "chow":
        pred, confidence = chow(eta[split])
        _, confidence_val = chow(eta[SEL_SPLIT])
        thresholds = torch.tensor([_quantile_threshold(confidence_val, data.w[SEL_SPLIT], tau) for tau in taus],
                                  dtype=confidence.dtype)
        return _Matched(pred=pred.expand(len(taus), -1), accept=confidence[None] >= thresholds[:, None], rules=None)
    rules = fit_at_coverage(
        eta[FIT_SPLIT], data.y[FIT_SPLIT], eta[SEL_SPLIT], data.y[SEL_SPLIT], data.class_to_group, taus,
        objective=m.objective, weights_fit=data.w[FIT_SPLIT], weights_sel=data.w[SEL_SPLIT],
        rounds=options.rounds, step=options.step, n_starts=options.n_starts, max_iter=options.max_iter,
        evidence=options.evidence,
    )
    decisions = [rule.predict(eta[split]) for rule in rules]  # a loop over target coverages
    return _Matched(pred=torch.stack([d.pred for d in decisions]), accept=torch.stack([d.accept for d in decisions]),
                    rules=rules)


@dataclass(frozen=True)
class _GroupTally:
    """Per target and group [T, K] (or per resample [B, T, K]): accepted weight, accepted-and-wrong
    weight, accepted squared weight and accepted sample count."""

    accepted: torch.Tensor
    wrong: torch.Tensor
    accepted_sq: torch.Tensor
    count: torch.Tensor


def _group_masses(matched: _Matched, y: torch.Tensor, w: torch.Tensor, c2g: torch.Tensor, n_groups: int,
                  counts: Optional[torch.Tensor] = None) -> _GroupTally:
    """The `_GroupTally` of the decisions per target, [T, K]; with `counts` [B, N] (how often each sample
    is drawn in each of B resamples), per resample: [B, T, K] (a sample drawn c times counts c times)."""
    t, n = matched.accept.shape
    member = torch.nn.functional.one_hot(c2g[y], n_groups).to(torch.float64)  # [N, K]
    taken = matched.accept.to(torch.float64)[..., None] * member  # [T, N, K]
    wrong = (matched.pred != y).to(torch.float64)[..., None]
    parts = (taken * w[:, None], taken * w[:, None] * wrong, taken * (w * w)[:, None], taken)
    if counts is None:
        return _GroupTally(*(part.sum(dim=1) for part in parts))
    flat = lambda x: x.permute(1, 0, 2).reshape(n, -1)  # noqa: E731  [N, T*K]
    shape = (counts.shape[0], t, n_groups)
    return _GroupTally(*((counts @ flat(part)).view(shape) for part in parts))


def _errors(tally: _GroupTally, evidence: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group errors (1.0 where nothing is accepted), balanced and worst error, from `_group_masses`;
    with `evidence`, each group error is its upper confidence bound at that one-sided confidence
    (`error_bound`), as a choice judges it."""
    if evidence is not None:
        group_error = error_bound(tally.accepted, tally.wrong, tally.accepted_sq, evidence)
    else:
        group_error = _group_errors(tally.accepted, tally.wrong)
    return group_error, group_error.mean(dim=-1), group_error.max(dim=-1).values


def trapezoid(x: Sequence[float], risk: Any) -> Any:
    """The trapezoid area of (x, risk) points along the last axis of `risk`, x in any order."""
    x = torch.as_tensor(x, dtype=torch.float64)
    order = x.argsort()
    x, risk = x[order], torch.as_tensor(risk, dtype=torch.float64)[..., order]
    return ((x[1:] - x[:-1]) * (risk[..., 1:] + risk[..., :-1]) / 2).sum(dim=-1)


def _resample_counts(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """[B, N]: how often each of the N samples is drawn in each of B bootstrap resamples (with replacement)."""
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = np.bincount((index + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    return torch.from_numpy(flat.reshape(n_boot, n).astype(np.float64))


def _reference(
    methods: Sequence[Method], rules: dict[str, PluginRule], eta: dict[str, dict[str, torch.Tensor]],
    w_val: torch.Tensor, target_coverage: Optional[float],
) -> tuple[str, Optional[float]]:
    """What sets the Chow operating points, and the val coverage they are matched to: `target_coverage`
    when given, else the val coverage of the first plug-in method named "ar-gse...", else of the first
    plug-in method. ("", None) when there is no Chow method."""
    if not any(m.kind == "chow" for m in methods):
        return "", None
    if target_coverage is not None:
        return "target_coverage", float(target_coverage)
    plugins = [m for m in methods if m.kind == "plugin"]
    if not plugins:
        raise ValueError("Chow methods need a reference coverage: give target_coverage or a plug-in method.")
    ref = next((m for m in plugins if m.name.startswith("ar-gse")), plugins[0])
    return ref.name, weighted_coverage(rules[ref.name].predict(eta[ref.name][SEL_SPLIT]).accept, w_val)


def _operating_point(m: Method, rule: Optional[PluginRule], eta: dict[str, torch.Tensor], data: _Data, split: str,
                     cost: float, reference_coverage: Optional[float]) -> tuple[dict[str, float], SelectiveErrors]:
    """The threshold-sweep areas and the operating point's columns of one method on `split`."""
    y, w, c2g = data.y[split], data.w[split], data.class_to_group
    pred, confidence, accept = _decisions(m, rule, eta[split])
    rc = risk_coverage(confidence, pred, y, c2g, w)
    row = {"aurc_balanced_threshold": aurc(rc, "balanced"), "aurc_worst_threshold": aurc(rc, "worst")}
    if m.kind == "chow":
        _, confidence_val = chow(eta[SEL_SPLIT])
        threshold = _quantile_threshold(confidence_val, data.w[SEL_SPLIT], float(reference_coverage))
        accept, accept_val = confidence >= threshold, confidence_val >= threshold
    else:
        accept_val = rule.predict(eta[SEL_SPLIT]).accept
    op = selective_errors(pred, accept, y, c2g, w)
    row["coverage"], row["coverage_val"] = op.coverage, weighted_coverage(accept_val, data.w[SEL_SPLIT])
    row["balanced_error"], row["worst_error"], row["error"] = op.balanced_error, op.worst_error, op.overall_error
    row["balanced_l2r"], row["worst_l2r"] = op.balanced_l2r(cost), op.worst_l2r(cost)
    row["ece"] = ece(eta[split], y, weights=w)
    return row, op


def _matched_areas(
    etas: Sequence[Mapping[str, Any]], labels: Mapping[str, Any], weights: Optional[Mapping[str, Any]],
    class_to_group: Any, objective: str, split: str, coverages: Sequence[float], fit_options: FitOptions,
    n_boot: int = 0, seed: int = 0, judged: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The coverage-matched AURC of the objective's error of the plug-in on each posterior of `etas`,
    measured on `split`: [M]; and, when `n_boot` > 0, on that many bootstrap resamples of the split,
    the same for every posterior, with every operating point fixed: [M, B] (else None). `judged`:
    the group errors by their upper confidence bounds at `fit_options.evidence` (`_errors`)."""
    evidence = fit_options.evidence if judged else None
    methods = [Method(f"plugin{i}", "plugin", eta, objective) for i, eta in enumerate(etas)]
    data, checked = _check_inputs(methods, labels, weights, class_to_group, split)
    taus = check_coverages(coverages)
    y, w, c2g = data.y[split], data.w[split], data.class_to_group
    counts = _resample_counts(y.shape[0], n_boot, seed) if n_boot else None
    points, boots = [], []
    for m in methods:  # a loop over (two) posteriors
        matched = _coverage_matched(m, checked[m.name], data, split, taus, fit_options)
        column = 2 if objective == "worst" else 1  # _errors: group, balanced, worst
        points.append(trapezoid(taus, _errors(_group_masses(matched, y, w, c2g, data.n_groups), evidence)[column]))
        if counts is not None:
            boots.append(trapezoid(taus, _errors(_group_masses(matched, y, w, c2g, data.n_groups, counts),
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


def compare(
    methods: Sequence[Method],
    labels: Mapping[str, Any],
    weights: Optional[Mapping[str, Any]],
    class_to_group: Any,
    *,
    split: str = "test",
    cost: float,
    coverages: Sequence[float] = COVERAGES,
    target_coverage: Optional[float] = None,
    n_boot: int = 200,
    seed: int = 0,
    group_names: Optional[Sequence[str]] = None,
    fit_options: FitOptions = FitOptions(),
    rank_by: Sequence[str] = RANK_BY,
) -> Comparison:
    """Evaluate every method on `split` by the protocol of the module docstring and rank them.

    `labels` and `weights` map each split to labels [N] and sample weights [N] (a missing or None
    weight means all ones; `weights=None` means all ones everywhere). `cost` is the operating cost,
    `coverages` the target coverages of the coverage-matched comparison, `target_coverage` (optional)
    the val coverage the Chow operating points are matched to, `n_boot` the bootstrap resamples.
    """
    data, eta = _check_inputs(methods, labels, weights, class_to_group, split)
    cost = check.cost(cost)
    taus = check_coverages(coverages)
    if target_coverage is not None and not 0.0 < float(target_coverage) <= 1.0:
        raise ValueError(f"target_coverage must lie in (0, 1]; got {target_coverage}.")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1; got {n_boot!r}.")
    if group_names is not None and len(group_names) != data.n_groups:
        raise ValueError(f"group_names must name the K = {data.n_groups} groups; got {len(group_names)} names.")
    group_labels = [str(g) for g in (group_names if group_names is not None else range(data.n_groups))]
    columns = table_columns(group_labels, taus)
    unknown = [c for c in rank_by if c not in columns or c == "method"]
    if not rank_by or unknown:
        raise ValueError(f"rank_by must name numeric columns of the table; unknown: {unknown or list(rank_by)}.")

    # The operating rule of every plug-in method, fitted once.
    rules: dict[str, PluginRule] = {}
    for m in methods:  # a loop over methods
        if m.kind != "plugin":
            continue
        if m.rule is not None:
            if m.rule.thresholds is None and abs(m.rule.cost - cost) > 1e-12:
                raise ValueError(
                    f"method {m.name!r} has a rule fitted at cost {m.rule.cost} but compare got cost={cost}; "
                    "pass the cost the rule was fitted at."
                )
            rules[m.name] = m.rule
        else:
            rules[m.name] = _fit_rule(m, eta[m.name], data, cost, fit_options)
    reference, reference_coverage = _reference(methods, rules, eta, data.w[SEL_SPLIT], target_coverage)

    y, w, c2g = data.y[split], data.w[split], data.class_to_group
    counts = _resample_counts(y.shape[0], int(n_boot), seed)  # the same resamples for every method
    member = torch.nn.functional.one_hot(c2g[y], data.n_groups).to(torch.float64)
    group_mass = (member * w[:, None]).sum(dim=0)
    floor = member.sum(dim=0).clamp(max=MIN_GROUP_ACCEPTED)  # [K] the accepted count a point needs
    q = [(1.0 - CI_LEVEL) / 2.0, (1.0 + CI_LEVEL) / 2.0]
    rows, point_frames, group_frames = [], [], []
    coverage_rules: dict[str, list[PluginRule]] = {}
    group_coverage: dict[str, np.ndarray] = {}
    for m in methods:  # a loop over methods
        matched = _coverage_matched(m, eta[m.name], data, split, taus, fit_options)
        if matched.rules is not None:
            coverage_rules[m.name] = matched.rules
        tally = _group_masses(matched, y, w, c2g, data.n_groups)
        accepted = tally.accepted
        group_error, balanced, worst = _errors(tally)
        coverage = accepted.sum(dim=1) / w.sum()
        row: dict[str, Any] = {"method": m.name}
        boot_group, boot_balanced, boot_worst = _errors(_group_masses(matched, y, w, c2g, data.n_groups, counts))
        for risk, point, boot in (("balanced", balanced, boot_balanced), ("worst", worst, boot_worst)):
            row[f"aurc_{risk}"] = float(trapezoid(taus, point))
            row[f"aurc_{risk}_lo"], row[f"aurc_{risk}_hi"] = np.quantile(trapezoid(taus, boot).numpy(), q).tolist()
        for tau in READOUT_COVERAGES:
            at = [i for i, c in enumerate(taus) if abs(c - tau) < 1e-9]
            if at:
                row[readout_column("balanced", tau)] = float(balanced[at[0]])
                row[readout_column("worst", tau)] = float(worst[at[0]])
        row["empty_group_points"] = int((accepted <= 0).any(dim=1).sum())
        thin = (tally.count < floor).any(dim=1)
        row["thin_group_points"] = int(thin.sum())
        op_row, op = _operating_point(m, rules.get(m.name), eta[m.name], data, split, cost, reference_coverage)
        row.update(op_row)
        row.update({f"coverage_{name}": value for name, value in zip(group_labels, op.group_coverage.tolist())})
        rows.append(row)
        group_coverage[m.name] = op.group_coverage.numpy()
        point_frames.append(pd.DataFrame({"method": m.name, "target_coverage": list(taus),
                                          "coverage": coverage.numpy(), "balanced_error": balanced.numpy(),
                                          "worst_error": worst.numpy(), "thin_group": thin.numpy()}))
        group_share = accepted / group_mass.clamp_min(1e-300)
        group_frames.append(pd.DataFrame({
            "method": m.name,
            "target_coverage": np.repeat(taus, data.n_groups),
            "group": group_labels * len(taus),
            "coverage": group_share.reshape(-1).numpy(),
            "error": group_error.reshape(-1).numpy(),
            "accepted": tally.count.reshape(-1).numpy().round().astype(np.int64),
        }))

    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values(list(rank_by), kind="mergesort").reset_index(drop=True)
    return Comparison(
        table=table,
        coverage_points=pd.concat(point_frames, ignore_index=True)[list(POINT_COLUMNS)],
        group_points=pd.concat(group_frames, ignore_index=True),
        coverage_rules=coverage_rules,
        group_coverage=group_coverage,
        rules=rules,
        reference=reference,
        reference_coverage=reference_coverage,
        split=split,
        cost=cost,
        coverages=taus,
    )
