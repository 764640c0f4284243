"""AR-GSE against its baselines on one split: the numbers behind the evaluate stage.

Pure computation on posteriors, no MLflow: `compare` takes a list of `Method`s (a name, Chow's rule
or the plug-in rejector, and the method's posteriors on tunev / val / test) and returns a `Comparison`
with one table row per method and the coverage-matched points behind it. `metric_dict` flattens the
table into `<method>/<column>` metric names that MLflow accepts.

Protocol, for every method on the evaluated split (all metrics weighted by the split's weights):

* Coverage-matched comparison (what the table ranks by; docs/design.md, *The rule*). For each target coverage tau
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
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from argse.selective import PluginRule, SelectiveErrors, aurc, chow, ece, risk_coverage, selective_errors
from argse.selective import checks as check
from argse.selective.fit import FitOptions, fit_rule
from argse.selective.matched import (
    CI_LEVEL,
    COVERAGES,
    FIT_SPLIT,
    SEL_SPLIT,
    Inputs,
    Method,
    check_coverages,
    check_inputs,
    coverage_matched,
    group_masses,
    matched_errors,
    quantile_threshold,
    resample_counts,
    trapezoid,
)
from argse.selective.metrics import MIN_GROUP_ACCEPTED, weighted_coverage

#: The targets whose errors get their own table columns (the paper's "rejection rate" reading).
READOUT_COVERAGES = (1.0, 0.8, 0.6)
#: The default ranking of the table: ascending in these columns, in this order of precedence.
RANK_BY = ("aurc_worst", "aurc_balanced")
#: The columns of `Comparison.coverage_points`, in order.
POINT_COLUMNS = ("method", "target_coverage", "coverage", "balanced_error", "worst_error", "thin_group")



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
        counts = {c for c in names if pd.api.types.is_integer_dtype(self.table[c])}  # e.g. empty_group_points
        for _, row in self.table.iterrows():  # a loop over methods
            cells = [str(row["method"]).replace("|", "\\|")] + [str(int(row[c])) if c in counts else _format(row[c], digits)
                                                                for c in names]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _format(value: Any, digits: int) -> str:
    if is_number(value):
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else str(float(value))
    return "" if value is None else str(value)


def is_number(value: Any) -> bool:
    """A number a table cell holds (not a boolean)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


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
    method: Method, eta: dict[str, torch.Tensor], data: Inputs, cost: float, options: FitOptions,
) -> PluginRule:
    """The method's plug-in rule at `cost`, fitted on tunev (S1) and selected on val (S2)."""
    return fit_rule(method.objective, eta[FIT_SPLIT], data.y[FIT_SPLIT], eta[SEL_SPLIT], data.y[SEL_SPLIT],
                    data.class_to_group, cost, weights_fit=data.w[FIT_SPLIT], weights_sel=data.w[SEL_SPLIT],
                    options=options)


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


def _operating_point(m: Method, rule: Optional[PluginRule], eta: dict[str, torch.Tensor], data: Inputs, split: str,
                     cost: float, reference_coverage: Optional[float]) -> tuple[dict[str, float], SelectiveErrors]:
    """The threshold-sweep areas and the operating point's columns of one method on `split`."""
    y, w, c2g = data.y[split], data.w[split], data.class_to_group
    pred, confidence, accept = _decisions(m, rule, eta[split])
    rc = risk_coverage(confidence, pred, y, c2g, w)
    row = {"aurc_balanced_threshold": aurc(rc, "balanced"), "aurc_worst_threshold": aurc(rc, "worst")}
    if m.kind == "chow":
        _, confidence_val = chow(eta[SEL_SPLIT])
        threshold = quantile_threshold(confidence_val, data.w[SEL_SPLIT], float(reference_coverage))
        accept, accept_val = confidence >= threshold, confidence_val >= threshold
    else:
        accept_val = rule.predict(eta[SEL_SPLIT]).accept
    op = selective_errors(pred, accept, y, c2g, w)
    row["coverage"], row["coverage_val"] = op.coverage, weighted_coverage(accept_val, data.w[SEL_SPLIT])
    row["balanced_error"], row["worst_error"], row["error"] = op.balanced_error, op.worst_error, op.overall_error
    row["balanced_l2r"], row["worst_l2r"] = op.balanced_l2r(cost), op.worst_l2r(cost)
    row["ece"] = ece(eta[split], y, weights=w)
    return row, op


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
    data, eta = check_inputs(methods, labels, weights, class_to_group, split)
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
    counts = resample_counts(y.shape[0], int(n_boot), seed)  # the same resamples for every method
    member = torch.nn.functional.one_hot(c2g[y], data.n_groups).to(torch.float64)
    group_mass = (member * w[:, None]).sum(dim=0)
    floor = member.sum(dim=0).clamp(max=MIN_GROUP_ACCEPTED)  # [K] the accepted count a point needs
    q = [(1.0 - CI_LEVEL) / 2.0, (1.0 + CI_LEVEL) / 2.0]
    rows, point_frames, group_frames = [], [], []
    coverage_rules: dict[str, list[PluginRule]] = {}
    group_coverage: dict[str, np.ndarray] = {}
    for m in methods:  # a loop over methods
        matched = coverage_matched(m, eta[m.name], data, split, taus, fit_options)
        if matched.rules is not None:
            coverage_rules[m.name] = matched.rules
        tally = group_masses(matched, y, w, c2g, data.n_groups)
        accepted = tally.accepted
        group_error, balanced, worst = matched_errors(tally)
        coverage = accepted.sum(dim=1) / w.sum()
        row: dict[str, Any] = {"method": m.name}
        boot_group, boot_balanced, boot_worst = matched_errors(group_masses(matched, y, w, c2g, data.n_groups, counts))
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



@dataclass(frozen=True)
class Headline:
    """What a person asks of a comparison table: the registered model's row and the best of what they
    would use otherwise, by each area."""

    registered: dict[str, Any]  #: the row of `ar-gse[<objective>]`
    best_chow: dict[str, dict[str, Any]]  #: area column -> the Chow row lowest in it
    best_expert_plugin: dict[str, dict[str, Any]]  #: area column -> the single-expert plug-in row lowest in it


AREAS = ("aurc_worst", "aurc_balanced")


def headline(table: pd.DataFrame, objective: str, experts: Sequence[str]) -> Headline:
    """The registered model's row (``ar-gse[<objective>]``), and per area the best Chow row and the best
    plug-in on a single expert (``plugin-<objective>[<expert>]``) of an evaluate table."""
    rows = table.to_dict(orient="records")
    registered = next((r for r in rows if r["method"] == f"ar-gse[{objective}]"), None)
    if registered is None:
        raise ValueError(f"the table has no row ar-gse[{objective}].")
    chow = [r for r in rows if str(r["method"]).startswith("chow[")]
    single = [r for r in rows if r["method"] in {f"plugin-{objective}[{e}]" for e in experts}]
    return Headline(
        registered=registered,
        best_chow={a: min(chow, key=lambda r: r[a]) for a in AREAS} if chow else {},
        best_expert_plugin={a: min(single, key=lambda r: r[a]) for a in AREAS} if single else {},
    )
