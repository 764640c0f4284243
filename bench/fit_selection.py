"""How the plug-in fits choose their rule: each selection beside today's, on the evaluate stage's rows.

    python bench/fit_selection.py --store sqlite:////path/to/mlflow.db [--seeds 0,1,2,3,4]
                                  [--priors lt,balanced] [--selections pooled,smoothed] [--draws 50]

For every seed and test prior of a benchmark store (its FINISHED evaluate runs; the store is only
read, through a copy of its database), the posteriors the evaluate stage forms: the plug-in rows on
the best single expert and on the plain average of the calibrated, prior-shifted experts, and the
ar-gse rows on the registered model's mixture. Each row is fitted with each selection exactly as the
evaluate stage fits it (`fit_at_coverage` on tunev / val at the 17 target coverages 1, 0.95, ...,
0.2, the evaluate stage's fit options), measured on test; printed: per selection, per prior and
row, the mean over seeds of the test areas (aurc_worst, aurc_balanced) and the coverage points at
which a group is empty on test, beside the first selection (the reference). The first selection is
checked against the store's own evaluate table (when it is the fit the store was made with, it must
reproduce it).

Then the same on the logged fashion-mnist-lt run of tests/data (both priors), and the 50-draw test's population
(argse.testing.logged_run): over `--draws` draws, each selection's largest gap to the population's
worst-group optimum over the coverage grid, and the draws whose tail is empty on test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from argse.selective import FitOptions, fit_at_coverage, selective_errors
from argse.selective.matched import COVERAGES, trapezoid
from argse.selective.seeds import canonical
from argse.testing.logged_run import exhaustive_worst, fitted_draw, logged_experts, population, uniform_gate

SPLITS = ("tunev", "val", "test")


@dataclass
class Row:
    """One plug-in row of an evaluate table: its posteriors per split and objective."""

    name: str
    objective: str
    eta: dict[str, torch.Tensor]


@dataclass
class Case:
    """One seed and test prior: the rows, labels, weights, groups, the fit options of the evaluate
    stage, and (from a store) the evaluate table it logged."""

    seed: int
    prior: str
    rows: list[Row]
    labels: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    class_to_group: torch.Tensor
    options: FitOptions
    table: pd.DataFrame | None = None


def store_cases(uri: str, seeds: list[int] | None, priors: list[str]) -> list[Case]:
    """The cases of a benchmark store, newest evaluate run per (seed, prior); the database is copied."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from argse import EXPERTS, tracking
    from argse.config import ArgseConfig
    from argse.selective import PluginRule
    from argse.stage_registry import RESULTS_DIR, RESULTS_TABLE, RULE, TAG_UPSTREAM
    from argse.artifacts import load_experts
    from argse.stages.evaluate import build_methods
    from argse.artifacts import load_gate
    from argse.tracking import TAG_STAGE

    if uri.startswith("sqlite:///"):
        copy = Path(tempfile.mkdtemp(prefix="fit-selection-")) / "mlflow.db"
        shutil.copy(uri[len("sqlite:///"):], copy)
        uri = f"sqlite:///{copy}"
    tracking.configure(uri)
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{TAG_STAGE}` = 'evaluate' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    cases: dict[tuple[int, str], Case] = {}
    for run in runs:
        tags, prior = run.data.tags, run.data.params["test_prior"]
        seed = int(client.get_run(tags[TAG_UPSTREAM + "splits"]).data.params["seed"])
        if (seed, prior) in cases or prior not in priors or (seeds is not None and seed not in seeds):
            continue
        argse_run = client.get_run(tags[TAG_UPSTREAM + "argse"])
        fitted = ArgseConfig(dataset=run.data.params["dataset"]).restore(argse_run.data.params)
        experts = load_experts(dict(zip(EXPERTS, tags[TAG_UPSTREAM + "experts"].split(","))), prior)
        rule = PluginRule.from_dict(json.loads(tracking.download(argse_run.info.run_id, RULE).read_text()))
        methods = build_methods(experts, load_gate(tags[TAG_UPSTREAM + "gating"]), rule, fitted.objective,
                                fitted.test_prior)
        rows = [Row(m.name, m.objective, {s: m.eta[s] for s in SPLITS}) for m in methods if m.kind == "plugin"]
        cases[(seed, prior)] = Case(
            seed, prior, rows, dict(experts.labels), {s: experts.weights(s, prior) for s in SPLITS},
            torch.as_tensor(experts.splits.class_to_group),
            FitOptions(rounds=fitted.rounds, step=fitted.step, n_starts=fitted.n_starts),
            pd.read_csv(tracking.download(run.info.run_id, f"{RESULTS_DIR}/{RESULTS_TABLE}")))
    return [cases[key] for key in sorted(cases)]


def fixture_cases(priors: list[str]) -> list[Case]:
    """The logged fashion-mnist-lt run of tests/data (seed 0, on an AMD EPYC): its uniform mixture is
    the registered model there, so the ar-gse rows take it."""
    from argse.selective import PluginRule
    from argse.stages.evaluate import build_methods

    cases = []
    for prior in priors:
        experts = logged_experts(prior)
        c2g = torch.as_tensor(experts.splits.class_to_group)
        k = int(c2g.max()) + 1
        placeholder = PluginRule(alpha=torch.ones(k), mu=torch.zeros(k), beta=torch.full((k,), 1.0 / k), cost=0.0,
                                 class_to_group=c2g)  # the coverage-matched rows refit; this rule is not read
        methods = build_methods(experts, uniform_gate(len(experts.names)), placeholder, "worst", prior)
        rows = [Row(m.name, m.objective, {s: m.eta[s] for s in SPLITS}) for m in methods if m.kind == "plugin"]
        cases.append(Case(0, prior, rows, dict(experts.labels), {s: experts.weights(s, prior) for s in SPLITS}, c2g,
                          FitOptions()))
    return cases


def measure(case: Case, row: Row, options: FitOptions) -> dict[str, float]:
    """The row's coverage-matched test areas under `options`, as the evaluate stage computes them, the
    target coverages at which a group is empty on test, and the fit's seconds."""
    y, w = case.labels, case.weights
    started = time.perf_counter()
    rules = fit_at_coverage(row.eta["tunev"], y["tunev"], row.eta["val"], y["val"], case.class_to_group, COVERAGES,
                            objective=row.objective, weights_fit=w["tunev"], weights_sel=w["val"], options=options)
    seconds = time.perf_counter() - started
    balanced, worst, empty = [], [], 0
    present = torch.bincount(case.class_to_group[y["test"]], minlength=int(case.class_to_group.max()) + 1) > 0
    for rule in rules:  # a loop over target coverages
        out = rule.predict(row.eta["test"])
        errors = selective_errors(out.pred, out.accept, y["test"], case.class_to_group, weights=w["test"])
        balanced.append(errors.balanced_error)
        worst.append(errors.worst_error)
        empty += int(bool(((errors.group_coverage <= 0) & present).any()))
    return {"aurc_worst": float(trapezoid(COVERAGES, worst)), "aurc_balanced": float(trapezoid(COVERAGES, balanced)),
            "empty_group_points": empty, "seconds": seconds}


def _measure_case(args: tuple[Case, list[tuple[str, FitOptions]]]) -> list[dict]:
    case, selections = args
    torch.set_num_threads(1)
    out = []
    for row in case.rows:
        for name, options in selections:
            result = measure(case, row, options)
            out.append({"seed": case.seed, "prior": case.prior, "method": canonical(row.name)[0], "selection": name,
                        **result})
    return out


def check_against_table(case: Case, results: list[dict], selection: str) -> float:
    """The largest difference between the store's evaluate table and `selection`'s areas (the store's
    own fit: they must agree)."""
    if case.table is None:
        return 0.0
    table = case.table.assign(method=[canonical(m)[0] for m in case.table["method"]]).set_index("method")
    mine = [r for r in results if r["selection"] == selection and r["seed"] == case.seed and r["prior"] == case.prior]
    return max(abs(float(table.loc[r["method"], metric]) - r[metric]) for r in mine
               for metric in ("aurc_worst", "aurc_balanced"))


def summary(results: list[dict], reference: str) -> pd.DataFrame:
    """Per prior, method and selection: the mean test areas over seeds, the change against the
    reference selection, and the empty-group points summed over seeds."""
    frame = pd.DataFrame(results)
    grouped = frame.groupby(["prior", "method", "selection"], sort=False)
    table = grouped.agg(seeds=("seed", "nunique"), aurc_worst=("aurc_worst", "mean"),
                        aurc_balanced=("aurc_balanced", "mean"), empty_group_points=("empty_group_points", "sum"),
                        seconds=("seconds", "mean")).reset_index()
    base = table[table["selection"] == reference].set_index(["prior", "method"])
    for metric in ("aurc_worst", "aurc_balanced"):
        ref = base.loc[list(zip(table["prior"], table["method"])), metric].to_numpy()
        table[f"{metric}_change"] = table[metric].to_numpy() / ref - 1.0
    return table


def print_table(table: pd.DataFrame, title: str) -> None:
    print(f"\n{title}\n")
    print("| prior | method | selection | seeds | aurc_worst | change | aurc_balanced | change | empty-group points "
          "| fit (s) |")
    print("|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|")
    for _, r in table.iterrows():
        print(f"| {r['prior']} | {r['method']} | {r['selection']} | {r['seeds']} | {r['aurc_worst']:.5f} | "
              f"{r['aurc_worst_change']:+.1%} | {r['aurc_balanced']:.5f} | {r['aurc_balanced_change']:+.1%} | "
              f"{r['empty_group_points']} | {r['seconds']:.1f} |")


def _population_draw(args: tuple[int, FitOptions]) -> tuple[int, float]:
    """(the fewest tail images accepted on test over the coverage grid, the largest gap to the
    population optimum) of the worst-group rules fitted on draw `seed` (argse.testing.logged_run)."""
    seed, options = args
    torch.set_num_threads(1)
    tail, errors = fitted_draw(seed, _POPULATION["data"], options=options)
    return min(tail), float((np.asarray(errors) - _POPULATION["optimum"]).max())


_POPULATION: dict = {}


def _init_population() -> None:
    torch.set_num_threads(1)
    eta, joint, prior, c2g = population()
    _POPULATION["data"] = (eta, joint, prior, c2g)
    _POPULATION["optimum"] = exhaustive_worst(eta, joint, c2g, COVERAGES).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="a benchmark store (sqlite:///... is copied, never written); none: the fixture only")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: every seed of the store)")
    parser.add_argument("--priors", default="lt,balanced")
    parser.add_argument("--selections", default="none,pooled,smoothed",
                        help="FitOptions.search values; the first is the reference")
    parser.add_argument("--draws", type=int, default=50, help="draws of the population test (0: skip it)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    priors = args.priors.split(",")
    selections = [(name, FitOptions(search=name)) for name in args.selections.split(",")]
    reference = selections[0][0]
    started = time.perf_counter()

    for label, cases in (("fixture (tests/data/fashion-mnist-lt-seed0-amd)", fixture_cases(priors)),
                         *((("store " + args.store, store_cases(
                             args.store, None if args.seeds is None else [int(s) for s in args.seeds.split(",")],
                             priors)),) if args.store else ())):
        if label.startswith("store"):
            # the evaluate stage's own options (and the same for every selection but the search)
            selections_of = {id(c): [(n, dataclasses.replace(c.options, search=o.search)) for n, o in selections]
                             for c in cases}
        else:
            selections_of = {id(c): selections for c in cases}
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            parts = list(pool.map(_measure_case, [(c, selections_of[id(c)]) for c in cases]))
        results = [r for part in parts for r in part]
        for case in cases:
            gap = check_against_table(case, results, reference)
            if gap > 1e-9:
                print(f"warning: seed {case.seed} {case.prior}: {reference} differs from the store's table by {gap:.2e}")
        seeds = sorted({c.seed for c in cases})
        print_table(summary(results, reference), f"{label}: test areas, mean over seeds {seeds}")

    if args.draws:
        with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_population) as pool:
            print(f"\nthe 50-draw test's population, {args.draws} draws, worst-group fit\n")
            print("| selection | largest gap to the optimum | mean of each draw's largest gap | draws emptying the tail |")
            print("|:---|---:|---:|---:|")
            for name, options in selections:
                out = list(pool.map(_population_draw, [(seed, options) for seed in range(args.draws)]))
                gaps = [gap for _, gap in out]
                print(f"| {name} | {max(gaps):.4f} | {np.mean(gaps):.4f} | {sum(tail == 0 for tail, _ in out)} |")
    print(f"\n({time.perf_counter() - started:.0f} s; torch {torch.__version__}, one thread per worker)")


if __name__ == "__main__":
    main()
