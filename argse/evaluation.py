"""AR-GSE against its baselines on one split: the numbers behind the evaluate stage (issue 7).

Pure computation on posteriors, no MLflow: `compare` takes a list of `Method`s (a name, Chow's rule
or the plug-in rejector, and the method's posteriors on tunev / val / test) and returns a `Comparison`
with one table row per method, the risk-coverage curves and the per-group coverage at the operating
point. `metric_dict` flattens the table into `<method>/<column>` metric names that MLflow accepts.

Protocol, for every method on the evaluated split (all metrics weighted by the split's weights):

* Threshold sweep: the risk-coverage curve of the method's confidence (Chow: the max posterior;
  plug-in: the rule's margin, minus the threshold of the predicted group when the rule has per-group
  thresholds) with its predictions (Chow: argmax; plug-in: h(x)). AURCs are `argse.selective.aurc`
  areas, not normalised: over [0, 1] and over [min_coverage, 1]. The 95% percentile-bootstrap
  intervals resample the split's samples. Caveat: a plug-in margin ranks the confident samples of one
  group before any of another (for a near one-hot eta of group k the margin is about mu_k), and a group
  with nothing accepted counts as error 1.0, so at low coverage a plug-in curve sits at worst error 1.0;
  the full-range AURC carries that, the [min_coverage, 1] one mostly not.
* Cost sweep (the paper's protocol): for each cost c of the grid, plug-in methods refit their rule on
  tunev (S1) / val (S2) with their objective (`argse.selective.cost_sweep`); Chow's rule at cost c
  rejects iff max posterior < 1 - c (nothing to fit). The (coverage, risk) points on the split give
  the AURC.
* Full coverage: the errors of the predictions with every sample accepted.
* Operating point: a plug-in method uses its fixed `rule` (the model's own) as given (its cost must
  equal `cost` unless it has per-group thresholds), or fits one at `cost` on tunev / val. A Chow method has no cost of its own, so it is compared at equal coverage:
  its threshold is the max-posterior quantile on val that reaches the reference coverage on val:
  `target_coverage` when given, else the val coverage of the operating rule of the first plug-in
  method whose name starts with "ar-gse", else of the first plug-in method (`Comparison.reference`
  says which). L2R risks: balanced_l2r = balanced_error + cost * (1 - coverage), and
  worst_l2r = worst_error + cost * (1 - coverage). Per-group coverage: `coverage_<group name>` (the
  group index when no names are given); `coverage_val` is the operating point's coverage on val.
* ECE (15 bins) of the method's posterior.

Ranking (default `rank_by`): ascending aurc_worst (threshold sweep, full range), ties broken by
aurc_balanced, then by the input order; the first row is the best method.
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

from argse.selective import (
    PluginRule,
    RiskCoverage,
    SelectiveErrors,
    aurc,
    chow,
    cost_sweep,
    ece,
    fit_balanced,
    fit_worst,
    risk_coverage,
    selective_errors,
)
from argse.selective import _validate as check

#: The splits a method carries; the rules are fitted on FIT_SPLIT (S1) and selected on SEL_SPLIT (S2).
SPLITS = ("tunev", "val", "test")
FIT_SPLIT, SEL_SPLIT = "tunev", "val"
KINDS = ("chow", "plugin")
OBJECTIVES = ("balanced", "worst")
#: At most this many points per method in `Comparison.rc_points`.
MAX_RC_POINTS = 200
#: The level of the bootstrap intervals of the AURCs.
CI_LEVEL = 0.95
#: The default ranking of the table: ascending in these columns, in this order of precedence.
RANK_BY = ("aurc_worst", "aurc_balanced")


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


@dataclass(frozen=True)
class FitOptions:
    """Options of `fit_balanced` / `fit_worst` / `cost_sweep` for the rules `compare` fits itself
    (`rounds` and `step` apply to the worst-group objective only)."""

    rounds: int = 20
    step: float = 2.0
    n_starts: int = 12
    max_iter: int = 30


def table_columns(group_names: Sequence[str], min_coverage: float = 0.2) -> list[str]:
    """The columns of `Comparison.table`, in order, for groups named `group_names`."""
    tag = f"cov{float(min_coverage):g}"
    return [
        "method",
        "aurc_balanced", "aurc_balanced_lo", "aurc_balanced_hi",
        "aurc_worst", "aurc_worst_lo", "aurc_worst_hi",
        "aurc_standard", f"aurc_balanced_{tag}", f"aurc_worst_{tag}",
        "aurc_balanced_costsweep", "aurc_worst_costsweep",
        "balanced_error_full", "worst_error_full", "error_full",
        "coverage", "coverage_val", "balanced_error", "worst_error", "error", "balanced_l2r", "worst_l2r",
        *[f"coverage_{g}" for g in group_names],
        "ece",
    ]


@dataclass
class Comparison:
    """The result of `compare`: the table (one row per method, best first) and what figures need."""

    table: pd.DataFrame  #: one row per method, `method` first, sorted best first (see the module doc)
    rc_points: pd.DataFrame  #: method, coverage, balanced, worst, standard; <= MAX_RC_POINTS per method
    cost_points: pd.DataFrame  #: method, cost, coverage, balanced, worst: the cost sweep's points
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  #: method -> (coverage, balanced, worst)
    group_coverage: dict[str, np.ndarray]  #: method -> [K] coverage per group at the operating point
    rules: dict[str, PluginRule]  #: plug-in method -> the rule of its operating point
    reference: str  #: what set the Chow operating points: a method name or "target_coverage"
    reference_coverage: Optional[float]  #: the val coverage Chow methods were matched to (None: no Chow)
    split: str
    cost: float

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
    args = (eta[FIT_SPLIT], data.y[FIT_SPLIT], eta[SEL_SPLIT], data.y[SEL_SPLIT], data.class_to_group, cost)
    common = dict(weights_fit=data.w[FIT_SPLIT], weights_sel=data.w[SEL_SPLIT],
                  n_starts=options.n_starts, max_iter=options.max_iter)
    if method.objective == "balanced":
        return fit_balanced(*args, **common)
    return fit_worst(*args, **common, rounds=options.rounds, step=options.step)


def _coverage(accept: torch.Tensor, w: torch.Tensor) -> float:
    return float((accept.to(torch.float64) * w).sum() / w.sum())


def _quantile_threshold(confidence: torch.Tensor, w: torch.Tensor, target: float) -> float:
    """The largest threshold t such that the weighted share of confidence >= t is at least `target`."""
    conf, order = confidence.sort(descending=True, stable=True)
    share = w[order].cumsum(dim=0) / w.sum()
    take = min(int((share < target - 1e-12).sum()) + 1, conf.shape[0])
    return float(conf[take - 1])


@dataclass(frozen=True)
class _Points:
    """(coverage, risk) points of a cost sweep, in the shape `aurc` reads."""

    coverage: torch.Tensor
    balanced: torch.Tensor
    worst: torch.Tensor


def _chow_cost_sweep(eta: torch.Tensor, y: torch.Tensor, w: torch.Tensor, c2g: torch.Tensor,
                     costs: Sequence[float]) -> _Points:
    """Chow's rule at each cost c (reject iff max posterior < 1 - c), evaluated on (eta, y, w)."""
    pred, confidence = chow(eta)
    points = []
    for c in costs:  # a loop over costs
        errors = selective_errors(pred, confidence >= 1.0 - c, y, c2g, w)
        points.append((errors.coverage, errors.balanced_error, errors.worst_error))
    table = torch.tensor(points, dtype=torch.float64)
    return _Points(coverage=table[:, 0], balanced=table[:, 1], worst=table[:, 2])


def _bootstrap_aurc(
    confidence: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor, class_to_group: torch.Tensor,
    n_boot: int, seed: int, chunk: int = 50,
) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap intervals of the full-range balanced and worst AURC of a threshold sweep.

    Replicate b resamples the split's rows with the indices `bootstrap_ci` would draw for it (same
    generator, same order) and computes the same curve as `risk_coverage` (ties accepted fractionally),
    but all replicates at once: one batched sort and batched per-group cumulative sums, `chunk`
    replicates at a time."""
    n = confidence.shape[0]
    index = torch.from_numpy(np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n)))
    wrong, group = (pred != y), class_to_group[y]
    areas = [_batched_areas(confidence[rows], wrong[rows], group[rows], w[rows], int(class_to_group.max()) + 1)
             for rows in index.split(chunk)]
    balanced, worst = torch.cat([a[0] for a in areas]).numpy(), torch.cat([a[1] for a in areas]).numpy()
    q = [(1.0 - CI_LEVEL) / 2.0, (1.0 + CI_LEVEL) / 2.0]
    lo_b, hi_b = np.quantile(balanced, q)
    lo_w, hi_w = np.quantile(worst, q)
    return {"balanced": (float(lo_b), float(hi_b)), "worst": (float(lo_w), float(hi_w))}


def _batched_areas(conf: torch.Tensor, wrong: torch.Tensor, group: torch.Tensor, w: torch.Tensor,
                   n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-range balanced and worst AURC of B risk-coverage curves (rows of [B, N] inputs), computed
    as `risk_coverage` followed by `aurc` would compute each."""
    b, n = conf.shape
    conf, order = conf.sort(dim=1, descending=True, stable=True)
    wrong, group, w = wrong.gather(1, order), group.gather(1, order), w.gather(1, order)
    mass = torch.nn.functional.one_hot(group, n_groups).to(torch.float64) * w[..., None]
    zero = mass.new_zeros(b, 1, n_groups)
    cum_mass = torch.cat([zero, mass.cumsum(dim=1)], dim=1)
    cum_wrong = torch.cat([zero, (mass * wrong[..., None]).cumsum(dim=1)], dim=1)
    # Runs of equal confidence: for each position, the count before its run and at its run's end.
    pos = torch.arange(n).expand(b, n)
    first = torch.ones(b, n, dtype=torch.bool)
    first[:, 1:] = conf[:, 1:] != conf[:, :-1]
    last = torch.ones(b, n, dtype=torch.bool)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values
    end = torch.where(last, pos + 1, torch.full_like(pos, n)).flip(1).cummin(dim=1).values.flip(1)
    count = pos + 1
    frac = ((count - start) / (end - start)).to(torch.float64)[..., None]
    exact = (count == end)[..., None]

    def at_count(cum: torch.Tensor) -> torch.Tensor:
        take = lambda idx: cum.gather(1, idx[..., None].expand(b, n, n_groups))  # noqa: E731
        return torch.where(exact, take(count), take(start) + frac * (take(end) - take(start)))

    accepted, errors = at_count(cum_mass), at_count(cum_wrong)
    group_error = torch.where(accepted > 0, errors / accepted.clamp_min(1e-300), torch.ones_like(accepted))
    coverage = (accepted.sum(dim=2) / w.sum(dim=1, keepdim=True)).clamp(0.0, 1.0)

    def area(risk: torch.Tensor) -> torch.Tensor:
        inner = ((coverage[:, 1:] - coverage[:, :-1]) * (risk[:, 1:] + risk[:, :-1]) / 2).sum(dim=1)
        return coverage[:, 0] * risk[:, 0] + inner + (1.0 - coverage[:, -1]) * risk[:, -1]

    return area(group_error.mean(dim=2)), area(group_error.max(dim=2).values)


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
    return ref.name, _coverage(rules[ref.name].predict(eta[ref.name][SEL_SPLIT]).accept, w_val)


def _downsample(n: int, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` evenly spread points of 0..n-1, both ends kept."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def _evaluate(
    m: Method, rule: Optional[PluginRule], eta: dict[str, torch.Tensor], data: _Data, split: str, *,
    cost: float, costs: list[float], min_coverage: float, reference_coverage: Optional[float], n_boot: int,
    seed: int, fit_options: FitOptions,
) -> tuple[dict[str, Any], RiskCoverage, SelectiveErrors]:
    """One method's table row (all columns but the per-group coverage), its threshold-sweep curve,
    and its errors at the operating point, all on `split`."""
    y, w, c2g = data.y[split], data.w[split], data.class_to_group
    pred, confidence, accept = _decisions(m, rule, eta[split])
    row: dict[str, Any] = {"method": m.name}

    # Threshold sweep and its bootstrap intervals.
    rc = risk_coverage(confidence, pred, y, c2g, w)
    intervals = _bootstrap_aurc(confidence, pred, y, w, c2g, n_boot, seed)
    for risk in ("balanced", "worst"):
        row[f"aurc_{risk}"] = aurc(rc, risk)
        row[f"aurc_{risk}_lo"], row[f"aurc_{risk}_hi"] = intervals[risk]
    row["aurc_standard"] = aurc(rc, "standard")
    row[f"aurc_balanced_cov{min_coverage:g}"] = aurc(rc, "balanced", min_coverage)
    row[f"aurc_worst_cov{min_coverage:g}"] = aurc(rc, "worst", min_coverage)

    # The paper's cost sweep.
    if m.kind == "plugin":
        sweep = cost_sweep(
            eta[FIT_SPLIT], data.y[FIT_SPLIT], eta[SEL_SPLIT], data.y[SEL_SPLIT], eta[split], y, c2g, costs,
            m.objective, weights_fit=data.w[FIT_SPLIT], weights_sel=data.w[SEL_SPLIT], weights_test=w,
            rounds=fit_options.rounds, step=fit_options.step, n_starts=fit_options.n_starts,
            max_iter=fit_options.max_iter,
        )
    else:
        sweep = _chow_cost_sweep(eta[split], y, w, c2g, costs)
    row["aurc_balanced_costsweep"] = aurc(sweep, "balanced")
    row["aurc_worst_costsweep"] = aurc(sweep, "worst")

    # Full coverage.
    full = selective_errors(pred, torch.ones_like(accept), y, c2g, w)
    row["balanced_error_full"], row["worst_error_full"] = full.balanced_error, full.worst_error
    row["error_full"] = full.overall_error

    # Operating point: the plug-in rule as fitted; Chow at the reference coverage on val.
    if m.kind == "chow":
        _, confidence_val = chow(eta[SEL_SPLIT])
        threshold = _quantile_threshold(confidence_val, data.w[SEL_SPLIT], float(reference_coverage))
        accept, accept_val = confidence >= threshold, confidence_val >= threshold
    else:
        accept_val = rule.predict(eta[SEL_SPLIT]).accept
    op = selective_errors(pred, accept, y, c2g, w)
    row["coverage"], row["coverage_val"] = op.coverage, _coverage(accept_val, data.w[SEL_SPLIT])
    row["balanced_error"], row["worst_error"], row["error"] = op.balanced_error, op.worst_error, op.overall_error
    row["balanced_l2r"] = op.balanced_error + cost * (1.0 - op.coverage)
    row["worst_l2r"] = op.worst_error + cost * (1.0 - op.coverage)
    row["ece"] = ece(eta[split], y, weights=w)
    points = pd.DataFrame({"method": m.name, "cost": costs, "coverage": sweep.coverage.numpy(),
                           "balanced": sweep.balanced.numpy(), "worst": sweep.worst.numpy()})
    return row, rc, op, points


def compare(
    methods: Sequence[Method],
    labels: Mapping[str, Any],
    weights: Optional[Mapping[str, Any]],
    class_to_group: Any,
    *,
    split: str = "test",
    cost: float,
    costs: Sequence[float],
    target_coverage: Optional[float] = None,
    n_boot: int = 200,
    seed: int = 0,
    min_coverage: float = 0.2,
    group_names: Optional[Sequence[str]] = None,
    fit_options: FitOptions = FitOptions(),
    rank_by: Sequence[str] = RANK_BY,
) -> Comparison:
    """Evaluate every method on `split` by the protocol of the module docstring and rank them.

    `labels` and `weights` map each split to labels [N] and sample weights [N] (a missing or None
    weight means all ones; `weights=None` means all ones everywhere). `cost` is the operating cost,
    `costs` the cost-sweep grid, `target_coverage` (optional) the val coverage the Chow methods are
    matched to, `n_boot` the bootstrap replicates, `min_coverage` the lower end of the restricted AURC.
    """
    data, eta = _check_inputs(methods, labels, weights, class_to_group, split)
    cost = check.cost(cost)
    grid = [check.cost(c, "costs") for c in check.as_tensor(costs, "costs").flatten().tolist()]
    if not grid:
        raise ValueError("costs must hold at least one cost >= 0.")
    min_coverage = float(min_coverage)
    if not 0.0 <= min_coverage < 1.0:
        raise ValueError(f"min_coverage must lie in [0, 1); got {min_coverage}.")
    if target_coverage is not None and not 0.0 < float(target_coverage) <= 1.0:
        raise ValueError(f"target_coverage must lie in (0, 1]; got {target_coverage}.")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1; got {n_boot!r}.")
    if group_names is not None and len(group_names) != data.n_groups:
        raise ValueError(f"group_names must name the K = {data.n_groups} groups; got {len(group_names)} names.")
    group_labels = [str(g) for g in (group_names if group_names is not None else range(data.n_groups))]
    columns = table_columns(group_labels, min_coverage)
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

    rows, rc_frames, cost_frames = [], [], []
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    group_coverage: dict[str, np.ndarray] = {}
    for i, m in enumerate(methods):  # a loop over methods
        row, rc, op, points = _evaluate(
            m, rules.get(m.name), eta[m.name], data, split, cost=cost, costs=grid, min_coverage=min_coverage,
            reference_coverage=reference_coverage, n_boot=int(n_boot), seed=seed + i, fit_options=fit_options,
        )
        row.update({f"coverage_{name}": value for name, value in zip(group_labels, op.group_coverage.tolist())})
        rows.append(row)
        cost_frames.append(points)
        curves[m.name] = (rc.coverage.numpy(), rc.balanced.numpy(), rc.worst.numpy())
        group_coverage[m.name] = op.group_coverage.numpy()
        keep = _downsample(rc.coverage.shape[0], MAX_RC_POINTS)
        rc_frames.append(pd.DataFrame({
            "method": m.name,
            "coverage": rc.coverage.numpy()[keep],
            "balanced": rc.balanced.numpy()[keep],
            "worst": rc.worst.numpy()[keep],
            "standard": rc.standard.numpy()[keep],
        }))

    table = pd.DataFrame(rows, columns=columns)
    table = table.sort_values(list(rank_by), kind="mergesort").reset_index(drop=True)
    return Comparison(
        table=table,
        rc_points=pd.concat(rc_frames, ignore_index=True),
        cost_points=pd.concat(cost_frames, ignore_index=True),
        curves=curves,
        group_coverage=group_coverage,
        rules=rules,
        reference=reference,
        reference_coverage=reference_coverage,
        split=split,
        cost=cost,
    )

