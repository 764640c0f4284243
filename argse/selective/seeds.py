"""The evaluate table over seeds: each method's mean, spread and paired difference to a reference
method (the registered model), the numbers behind ``argse benchmark``. Pure pandas and numpy.

A method is identified across seeds by its name, except the plug-in on the best single expert, which
the evaluate stage names after the expert val chose on that seed (``plugin-worst[balsoftmax]``): here
it is ``plugin-worst[best expert]`` on every seed, and `summarise` says which expert each seed chose.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from argse import EXPERTS

#: The table columns summarised over seeds: the coverage-matched areas and the errors at 1, 0.8, 0.6.
METRICS = ("aurc_worst", "aurc_balanced", "worst_error_at1", "balanced_error_at1", "worst_error_at0.8",
           "balanced_error_at0.8", "worst_error_at0.6", "balanced_error_at0.6")
#: The columns whose difference to the reference is tested across seeds.
PAIRED = ("aurc_worst", "aurc_balanced")
LEVEL = 0.95
_BEST_EXPERT = re.compile(r"^(plugin-\w+)\[(" + "|".join(EXPERTS) + r")\]$")


def canonical(method: str) -> tuple[str, str | None]:
    """A method's name across seeds, and the expert it names when it is the best-expert plug-in."""
    match = _BEST_EXPERT.match(method)
    return (f"{match.group(1)}[best expert]", match.group(2)) if match else (method, None)


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The two-sided `level` Student-t interval of the mean of `values` (NaN for fewer than two)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def summarise(tables: Mapping[int, pd.DataFrame], reference: str, *, metrics: Sequence[str] = METRICS,
              paired: Sequence[str] = PAIRED, level: float = LEVEL) -> pd.DataFrame:
    """One row per method over the seeds' evaluate tables (``{seed: table}``, each with a ``method``
    column and the `metrics`): ``n_seeds`` (the seeds whose table has it), for each metric ``<m>_mean``,
    ``<m>_sd`` (sample standard deviation, NaN for one seed) and ``<m>_seed<S>`` (NaN where absent); for
    each paired metric, over the seeds that have both, the mean of ``method - reference``
    (``<m>_minus_registered``, positive where the reference is better) with its `level` t interval
    (``_lo``, ``_hi``) and ``<m>_registered_better``, the number of seeds on which the reference's value
    is lower. ``best_expert``: the expert the best-expert plug-in used on each seed. Sorted by the
    first metric's mean, then the second's."""
    if not tables:
        raise ValueError("tables must hold at least one seed's table.")
    seeds = sorted(tables)
    values: dict[str, dict[int, pd.Series]] = {}
    chosen: dict[str, dict[int, str]] = {}
    for seed in seeds:
        table = tables[seed]
        missing = [c for c in ("method", *metrics) if c not in table.columns]
        if missing:
            raise ValueError(f"the table of seed {seed} has no column {missing[0]!r}.")
        for _, row in table.iterrows():
            name, expert = canonical(str(row["method"]))
            values.setdefault(name, {})[seed] = row
            if expert is not None:
                chosen.setdefault(name, {})[seed] = expert
    if reference not in values:
        raise ValueError(f"no seed's table has the reference method {reference!r}.")
    rows = []
    for name, by_seed in values.items():
        row: dict[str, object] = {"method": name, "n_seeds": len(by_seed)}
        for metric in metrics:
            column = np.array([float(by_seed[s][metric]) if s in by_seed else math.nan for s in seeds])
            present = column[~np.isnan(column)]
            row[f"{metric}_mean"] = float(present.mean())
            row[f"{metric}_sd"] = float(present.std(ddof=1)) if len(present) > 1 else math.nan
            row.update({f"{metric}_seed{s}": float(v) for s, v in zip(seeds, column)})
        for metric in paired:
            common = [s for s in seeds if s in by_seed and s in values[reference]]
            diff = np.array([float(by_seed[s][metric]) - float(values[reference][s][metric]) for s in common])
            row[f"{metric}_minus_registered"] = float(diff.mean()) if len(diff) else math.nan
            row[f"{metric}_minus_registered_lo"], row[f"{metric}_minus_registered_hi"] = t_interval(diff, level)
            row[f"{metric}_registered_better"] = int((diff > 0).sum())
        row["best_expert"] = ",".join(f"{s}:{e}" for s, e in sorted(chosen.get(name, {}).items()))
        rows.append(row)
    out = pd.DataFrame(rows)
    order = [f"{m}_mean" for m in metrics[:2]]
    return out.sort_values(order, kind="mergesort").reset_index(drop=True)


def mean_curves(points: Mapping[int, pd.DataFrame], risk: str) -> dict[str, tuple[np.ndarray, ...]]:
    """Per method, over the seeds' coverage points (``{seed: coverage_points}``): the target coverages,
    the mean `risk` error (``balanced`` or ``worst``) at each, and its lowest and highest over seeds."""
    frames = []
    for seed, frame in points.items():
        frame = frame.assign(seed=seed, method=[canonical(str(m))[0] for m in frame["method"]])
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    out = {}
    for name, mine in data.groupby("method", sort=False):
        grouped = mine.groupby("target_coverage")[f"{risk}_error"]
        stats_ = grouped.agg(["mean", "min", "max"]).sort_index(ascending=False)
        out[name] = (stats_.index.to_numpy(), stats_["mean"].to_numpy(), stats_["min"].to_numpy(),
                     stats_["max"].to_numpy())
    return out
