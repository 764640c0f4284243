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

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from argse.config import ArgseConfig
from argse.data.splits import Splits
from argse.models.gating import GatingNet, gated_mixture
from argse.selective import fit_at_coverage, selective_errors
from argse.selective.compare import compare
from argse.selective.matched import COVERAGES, FitOptions
from argse.stages.argse import cost_for_coverage
from argse.artifacts import ExpertSet
from argse.stages.evaluate import build_methods
from argse.training.losses import posterior_shift
from oracle import best_at_coverage

RUN = Path(__file__).parent / "data" / "fashion-mnist-lt-seed0-amd"
SPLITS = ("tunev", "val", "test")


def logged_experts(prior: str = "lt") -> ExpertSet:
    """The run's experts as `load_experts` would give them, read from the folder instead of MLflow."""
    splits = Splits.load(RUN / "splits")
    params = json.loads((RUN / "meta.json").read_text())["experts"]
    names = tuple(params)
    shifts = torch.stack([posterior_shift(name, splits.train_counts, splits.prior(prior), float(params[name]["la_tau"]))
                          for name in names])
    logits, labels = {}, {}
    for split in SPLITS:
        files = [np.load(RUN / "experts" / name / f"{split}.npz") for name in names]
        logits[split] = torch.stack([torch.from_numpy(f["logits"]).double() for f in files], dim=1)
        labels[split] = torch.from_numpy(files[0]["labels"]).long()
    probs = {split: torch.softmax(z + shifts[None], dim=2) for split, z in logits.items()}
    return ExpertSet({name: name for name in names}, "logged", splits, probs, labels, prior, shifts, logits)


def uniform_gate(num_experts: int) -> GatingNet:
    """The gate the run kept: its last layer at zero, i.e. the uniform mixture."""
    gate = GatingNet(num_experts)
    with torch.no_grad():
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.zero_()
    return gate.eval()


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


#: The population's posteriors are the experts' mixture sharpened by this temperature, and val holds
#: 300 images per class (fashion-mnist-lt's holds 200), test 50 (so that a rule which bet on a sliver
#: of the tail on val finds none of it there). Measured over 50 draws with bench/small_groups.py's
#: population and the paper's fixed step (sharpen / val per class: largest gap to the optimum, draws
#: above 0.01): 0.8 / 300: 0.0134, 2 (coverages 0.9, 0.85); 0.7 / 300: 0.01003, 1 (coverage 0.2);
#: 0.7 / 350: 0.0114, 1 (1.0); 0.7 / 400: 0.0134, 1 (0.95); 0.65 / 300: 0.0118, 1 (0.2). The miss at
#: coverage 0.2 (draw 31) was the exponentiated gradient's pace where every error is small: the rule's
#: worst group there was the head (0.0101 on the population, the optimum 0.0001), beta moved about 5%
#: a round and 20 rounds did not reach the optimum's weights. The fit's step is now step / tau (largest
#: gap 0.0093, at coverage 1.0, where the step is unchanged; at 0.2 0.0059, was 0.0100). A step scaled
#: to each round's largest error instead closed 0.2 but opened 0.95 (0.0180), as did 40 rounds at the
#: fixed step (0.0124 at 1.0) or stopping once 5 or 10 rounds bring no improvement (0.0180, 0.0125).
SHARPEN = 0.7
PER_CLASS = {"tunev": 300, "val": 300, "test": 50}  # images per class, class-balanced as the splits stage draws
DRAWS = 50


def population():
    """Cells (eta [G, C], p(cell, class) [G, C]), the class prior and class_to_group: every logged
    tunev / val / test posterior of the uniform mixture (sharpened) is a cell of mass proportional to
    its lt weight, and a cell's label is drawn from its posterior, so eta is the true posterior."""
    experts = logged_experts()
    eta = torch.cat([experts.probs[split].mean(dim=1) for split in SPLITS])
    eta = torch.softmax(eta.log() / SHARPEN, dim=1)
    mass = torch.cat([experts.weights(split, "lt") for split in SPLITS])
    joint = (mass / mass.sum())[:, None] * eta
    return eta, joint, joint.sum(dim=0), torch.as_tensor(experts.splits.class_to_group)


def draw(eta, joint, prior, per_class: int, generator):
    """A class-balanced split: `per_class` cells of each class drawn by p(cell | class), weighted to the
    population's prior (w = pi(y) / (1 / C), as the splits stage weights a split to the lt prior)."""
    n_classes = eta.shape[1]
    cells = torch.cat([torch.multinomial(joint[:, c] / joint[:, c].sum(), per_class, replacement=True,
                                         generator=generator) for c in range(n_classes)])
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return eta[cells], y, prior[y] * n_classes


def exhaustive_worst(eta, joint, class_to_group, taus):
    """The population optimum at each tau: the lowest worst-group error over the whole K = 2 rule family
    among rules accepting a share of at least tau (tests/oracle.py: rho = coef_1 / coef_0 on a log grid,
    delta = (mu_1 - mu_0) / coef_0 on [-2, 2 rho], the threshold at the first cut that reaches tau)."""
    return best_at_coverage((eta, joint), class_to_group, taus, "worst", np.geomspace(0.1, 1000.0, 60),
                            lambda rho: np.linspace(-2.0, 2.0 * rho, 60))


_POPULATION = None


def fitted_draw(seed: int, data, **fit) -> tuple[list[int], list[float]]:
    """(tail images accepted on test per target coverage, population worst-group error per target
    coverage) of the worst-group rules fitted on draw `seed` of the population `data`
    (:func:`population`); `fit` goes to `fit_at_coverage` (evidence, options, ...). bench/fit_selection.py
    measures its selections with it too."""
    eta, joint, prior, c2g = data
    g = torch.Generator().manual_seed(seed)
    (e_fit, y_fit, w_fit), (e_sel, y_sel, w_sel), (e_test, y_test, _) = (
        draw(eta, joint, prior, PER_CLASS[split], g) for split in SPLITS)
    rules = fit_at_coverage(e_fit, y_fit, e_sel, y_sel, c2g, COVERAGES, objective="worst", weights_fit=w_fit,
                            weights_sel=w_sel, **fit)
    cell, label = (joint > 0).nonzero(as_tuple=True)
    tail_test, errors = [], []
    for rule in rules:
        tail_test.append(int((rule.predict(e_test).accept & (c2g[y_test] == 1)).sum()))
        out = rule.predict(eta[cell])
        errors.append(selective_errors(out.pred, out.accept, label, c2g, weights=joint[cell, label]).worst_error)
    return tail_test, errors


def _one_draw(args):
    """:func:`fitted_draw` of draw `seed`, errors judged by `evidence`, in a pool's process."""
    seed, evidence = args
    global _POPULATION
    torch.set_num_threads(1)
    if _POPULATION is None:
        _POPULATION = population()
    return fitted_draw(seed, _POPULATION, evidence=evidence)


@pytest.mark.slow
def test_over_50_draws_the_judged_selection_never_empties_the_tail_and_stays_near_the_optimum():
    eta, joint, prior, c2g = population()
    assert 0.015 < float(prior[c2g == 1].sum()) < 0.03  # the tail holds about 2% of the weight
    optimum = exhaustive_worst(eta, joint, c2g, COVERAGES)
    with ProcessPoolExecutor(max_workers=2) as pool:
        new = list(pool.map(_one_draw, [(seed, 0.95) for seed in range(DRAWS)]))
        old = list(pool.map(_one_draw, [(seed, None) for seed in range(DRAWS // 10)]))
    emptied_before = [seed for seed, (tail, _) in enumerate(old) if min(tail) == 0]
    assert emptied_before, "the selection judged as measured should empty the tail on test in some draws"
    gaps = {}
    for seed, (tail, errors) in enumerate(new):
        assert min(tail) > 0, (seed, tail)  # never an empty tail on test
        gaps[seed] = float((np.asarray(errors) - optimum.numpy()).max())
    # Within 0.01 of the population optimum at every target coverage, on every draw (see SHARPEN).
    assert max(gaps.values()) <= 0.01, gaps
