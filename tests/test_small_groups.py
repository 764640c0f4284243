"""A worst-group rule that never bets on one image: every choice on a split judges a group's error
with its sample size (`argse.selective.metrics.error_bound`).

* The logged logits of the fashion-mnist-lt run whose registered model lost to Chow's rule ten times
  over (tests/data/fashion-mnist-lt-seed0-amd) go through the evaluate stage's methods and the
  comparison: no plug-in or ar-gse row empties a group, and ar-gse[worst] beats every Chow row.
* A known-posterior population built from those experts' posteriors (tail about 2% of the weight),
  sampled 50 times into class-balanced tunev / val / test splits as the splits stage draws them: the
  selection that judges errors as measured (`evidence=None`, the behaviour before the bound) empties
  the tail on test in some draws; the default selection in none, and its worst-group error on the
  population is within 0.01 of the population optimum at every target coverage of the default grid
  on every draw.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from argse.config import ArgseConfig
from argse.models.gating import gated_mixture
from argse.selective.compare import compare
from argse.selective.matched import COVERAGES, FitOptions
from argse.stages.argse import cost_for_coverage
from argse.stages.evaluate import build_methods
from argse.testing.logged_run import SPLITS, exhaustive_worst, fitted_draw, logged_experts, population, uniform_gate

DRAWS = 50
_POPULATION = None

@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_logged_run_no_longer_empties_a_group_and_ar_gse_beats_chow(one_thread):
    experts = logged_experts()
    gate = uniform_gate(len(experts.names))
    weights = {split: experts.weights(split, "lt") for split in SPLITS}
    eta = {split: gated_mixture(gate, experts.probs[split]) for split in SPLITS}
    class_to_group = torch.as_tensor(experts.splits.class_to_group)
    cfg = ArgseConfig(dataset="fashion-mnist-lt", target_coverage=0.8)  # the fit stage's default operating point
    _, rule, _ = cost_for_coverage(cfg, eta, experts.labels, weights, class_to_group, cfg.target_coverage)
    comparison = compare(build_methods(experts, gate, rule, "worst", "lt"), experts.labels, weights, class_to_group,
                         split="test", cost=rule.cost, n_boot=20, group_names=experts.splits.group_names,
                         fit_options=FitOptions())
    table = comparison.table.set_index("method")
    plugins = [name for name in table.index if not name.startswith("chow")]
    assert len(plugins) == 6
    assert (table.loc[plugins, "empty_group_points"] == 0).all(), table["empty_group_points"]
    groups = comparison.group_points
    assert (groups.loc[groups["method"].isin(plugins), "accepted"] > 0).all()
    chow = [name for name in table.index if name.startswith("chow")]
    assert table.loc["ar-gse[worst]", "aurc_worst"] < table.loc[chow, "aurc_worst"].min()


# ---------------------------------------------------------------------------- the population


def _one_draw(args):
    """:func:`fitted_draw` of draw `seed`, errors judged by `evidence`, the fit's `search` (None: the
    default), in a pool's process."""
    seed, evidence, search = args
    global _POPULATION
    torch.set_num_threads(1)
    if _POPULATION is None:
        _POPULATION = population()
    return fitted_draw(seed, _POPULATION, evidence=evidence, **({} if search is None else {"search": search}))


@pytest.mark.slow
def test_over_50_draws_the_judged_selection_never_empties_the_tail_and_stays_near_the_optimum():
    eta, joint, prior, c2g = population()
    assert 0.015 < float(prior[c2g == 1].sum()) < 0.03  # the tail holds about 2% of the weight
    optimum = exhaustive_worst(eta, joint, c2g, COVERAGES)
    with ProcessPoolExecutor(max_workers=2) as pool:
        new = list(pool.map(_one_draw, [(seed, 0.95, None) for seed in range(DRAWS)]))
        # the control: errors as measured, by the plain criterion (the smoothed one, averaging over
        # neighbouring rules, is itself slower to fall for a tail that looks perfect)
        old = list(pool.map(_one_draw, [(seed, None, "pooled") for seed in range(DRAWS // 10)]))
    emptied_before = [seed for seed, (tail, _) in enumerate(old) if min(tail) == 0]
    assert emptied_before, "the selection judged as measured should empty the tail on test in some draws"
    gaps = {}
    for seed, (tail, errors) in enumerate(new):
        assert min(tail) > 0, (seed, tail)  # never an empty tail on test
        gaps[seed] = float((np.asarray(errors) - optimum.numpy()).max())
    # Within 0.01 of the population optimum at every target coverage, on every draw (see argse.testing.logged_run.SHARPEN).
    assert max(gaps.values()) <= 0.01, gaps
