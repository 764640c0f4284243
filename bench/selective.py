"""Benchmark of `argse.selective` against straightforward references measured in the same run.

    python bench/selective.py [--threads 1]

The data imitate CIFAR-100-LT: C = 100 classes with the long-tailed prior n_c = 500 * 100 ** (-c / 99),
K = 2 groups (head: more than 20 training images, 69 classes; tail: 31 classes), and posteriors of a
noisy model that leans towards the head (top-1 accuracy about 73%, 12% on the tail). Each reference implements the same algorithm the obvious way:

* fit_balanced / fit_worst: every candidate rule is applied to the full posteriors [N, C] (no per-group
  sufficient statistics), one start at a time, and the final threshold search walks the sorted
  margins in a Python loop. Ours runs twice: with `search="none"`, the algorithm the reference
  implements, and with the default search of the rule family after the fixed point
  (`argse.selective.search`, "+ search"), whose "agree" says how many decisions the search changed.
* risk_coverage: sort once, then a Python loop over the samples keeps running sums and writes the
  balanced, worst and standard risk at every acceptance count.

The "agree" column is the share of selection-split (or curve) entries on which ours and the
reference give the same decision (or the same risk within 1e-9).

Torch runs with `--threads` intra-op threads (default 1). The fits are many small kernels on
[starts, N] tensors: on this 2-core machine two threads were about 25% faster when it was idle, and
five times slower when other processes shared the cores (OpenMP waits for the descheduled thread).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import numpy as np
import torch

import argse.selective as sel
from argse.selective.fixed_point import start_schedule

N_FIT = 10_000
N_CURVE = 100_000
N_CLASSES = 100
COST = 0.2


# ----------------------------------------------------------------------------------------- data
def long_tailed_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posteriors [n, C], labels [n] and class_to_group [C] of a CIFAR-100-LT-like problem."""
    rng = np.random.default_rng(seed)
    counts = np.floor(500 * 100.0 ** (-np.arange(N_CLASSES) / (N_CLASSES - 1)))
    prior = counts / counts.sum()
    class_to_group = (counts <= 20).astype(np.int64)
    y = rng.choice(N_CLASSES, size=n, p=prior)
    logits = rng.normal(0.0, 1.5, size=(n, N_CLASSES)) + np.log(prior)[None, :]
    logits[np.arange(n), y] += rng.normal(np.where(class_to_group[y] == 1, 4.0, 5.0), 1.5)
    eta = np.exp(logits - logits.max(axis=1, keepdims=True))
    return eta / eta.sum(axis=1, keepdims=True), y, class_to_group


# ----------------------------------------------------------------------------------- references
def ref_apply(eta: np.ndarray, c2g: np.ndarray, alpha: np.ndarray, mu: np.ndarray, beta: np.ndarray):
    """The rule on the full posteriors: (pred, margin)."""
    coef = len(alpha) * beta / alpha
    score = eta * coef[c2g][None, :]
    return score.argmax(axis=1), score.max(axis=1) - eta @ (coef - mu)[c2g]


def ref_masses(accept, pred, y, w, c2g, n_groups):
    accepted = np.array([w[accept & (c2g[y] == k)].sum() for k in range(n_groups)])
    wrong = np.array([w[accept & (c2g[y] == k) & (pred != y)].sum() for k in range(n_groups)])
    errors = np.where(accepted > 0, wrong / np.maximum(accepted, 1e-300), 1.0)
    return accepted, errors


def ref_fit_cost_sensitive(fit, sel_split, c2g, beta, cost, n_starts=12, max_iter=30, init=None):
    n_groups = len(beta)
    eta1, y1, w1 = fit
    eta2, y2, w2 = sel_split

    def fixed_point(accept, pred):
        accepted, errors = ref_masses(accept, pred, y1, w1, c2g, n_groups)
        alpha = np.maximum(n_groups * accepted, 1e-6)
        return alpha, n_groups * beta * errors / alpha

    prior = np.array([w1[c2g[y1] == k].sum() for k in range(n_groups)])
    states = []
    for level, tilt in start_schedule(n_starts):
        coef = beta / np.maximum(prior, 1e-12) ** tilt
        score = eta1 * coef[c2g][None, :]
        pred, margin = score.argmax(axis=1), score.max(axis=1) - eta1 @ coef[c2g]
        order = np.argsort(-margin, kind="stable")
        take = min(int((np.cumsum(w1[order]) < level - 1e-12).sum()) + 1, len(margin))
        states.append(fixed_point(margin >= margin[order][take - 1], pred))
    if init is not None:
        states.append(init)
    seen, best, best_risk = set(), None, math.inf
    for _ in range(max_iter):
        fresh = []
        for alpha, mu in states:
            key = np.concatenate([alpha, mu]).tobytes()
            if key not in seen:
                seen.add(key)
                fresh.append((alpha, mu))
        if not fresh:
            break
        states = []
        for alpha, mu in fresh:
            pred, margin = ref_apply(eta2, c2g, alpha, mu, beta)
            accepted, errors = ref_masses(margin >= -cost, pred, y2, w2, c2g, n_groups)
            risk = float(errors @ beta + cost * (1.0 - accepted.sum()))
            if risk < best_risk:
                best, best_risk = (alpha, mu), risk
            pred, margin = ref_apply(eta1, c2g, alpha, mu, beta)
            states.append(fixed_point(margin >= -cost, pred))
    return ref_line_search(eta2, y2, w2, c2g, beta, cost, *best)


def ref_line_search(eta, y, w, c2g, beta, cost, alpha, mu):
    """Walk the sorted margins in a Python loop; keep the best threshold."""
    n_groups = len(beta)
    pred, margin = ref_apply(eta, c2g, alpha, mu, beta)
    order = np.argsort(-margin, kind="stable")
    accepted, wrong = [0.0] * n_groups, [0.0] * n_groups
    best_risk, best_n, best_errors, best_coverage = math.inf, 0, None, 0.0
    for j, i in enumerate(order.tolist()):
        k = int(c2g[y[i]])
        accepted[k] += float(w[i])
        if pred[i] != y[i]:
            wrong[k] += float(w[i])
        if j + 1 < len(order) and margin[order[j + 1]] == margin[i]:
            continue
        errors = [wrong[g] / accepted[g] if accepted[g] > 0 else 1.0 for g in range(n_groups)]
        coverage = sum(accepted)
        risk = sum(b * e for b, e in zip(beta.tolist(), errors)) + cost * (1.0 - coverage)
        if risk < best_risk:
            best_risk, best_n, best_errors, best_coverage = risk, j, errors, coverage
    m = margin[order]
    threshold = m[best_n] - 1e-9 * (1 + abs(m[best_n])) if best_n + 1 == len(m) else (m[best_n] + m[best_n + 1]) / 2
    return alpha, mu - cost - threshold, np.array(best_errors), best_coverage


def ref_fit_balanced(fit, sel_split, c2g, cost):
    beta = np.full(int(c2g.max()) + 1, 1.0 / (int(c2g.max()) + 1))
    alpha, mu, _, _ = ref_fit_cost_sensitive(fit, sel_split, c2g, beta, cost)
    return alpha, mu, beta


def ref_fit_worst(fit, sel_split, c2g, cost, rounds=20, step=2.0):
    n_groups = int(c2g.max()) + 1
    beta = np.full(n_groups, 1.0 / n_groups)
    best, best_risk, init = None, math.inf, None
    for _ in range(rounds):
        alpha, mu, errors, coverage = ref_fit_cost_sensitive(fit, sel_split, c2g, beta, cost, init=init)
        risk = float(errors.max()) + cost * (1.0 - coverage)
        if risk < best_risk:
            best, best_risk = (alpha, mu, beta), risk
        init = (alpha, mu)
        beta = beta * np.exp(step * errors)
        beta = beta / beta.sum()
    return best


def ref_risk_coverage(confidence, pred, y, c2g):
    """A Python loop over the samples in decreasing confidence, with running sums."""
    n_groups = int(c2g.max()) + 1
    order = np.argsort(-confidence, kind="stable").tolist()
    accepted, wrong = [0] * n_groups, [0] * n_groups
    balanced, worst, standard = [], [], []
    for n, i in enumerate(order, start=1):
        k = int(c2g[y[i]])
        accepted[k] += 1
        wrong[k] += int(pred[i] != y[i])
        errors = [wrong[g] / accepted[g] if accepted[g] else 1.0 for g in range(n_groups)]
        balanced.append(sum(errors) / n_groups)
        worst.append(max(errors))
        standard.append(sum(wrong) / n)
    return np.array(balanced), np.array(worst), np.array(standard)


# ------------------------------------------------------------------------------------------ run
def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    eta1, y1, c2g = long_tailed_problem(N_FIT, seed=1)
    eta2, y2, _ = long_tailed_problem(N_FIT, seed=2)
    uniform = np.full(N_FIT, 1.0 / N_FIT)
    fit, sel_split = (eta1, y1, uniform), (eta2, y2, uniform)
    rows = []

    size = f"N={N_FIT:,} C={N_CLASSES} K=2"
    t_ref, (alpha, mu, beta) = timed(lambda: ref_fit_balanced(fit, sel_split, c2g, COST))
    reference = ref_apply(eta2, c2g, alpha, mu, beta)[1] >= -COST
    for name, search in (("fit_balanced", "none"), ("  + search", "pooled")):
        t_ours, rule = timed(lambda: sel.fit_balanced(eta1, y1, eta2, y2, c2g, COST, search=search), repeat=3)
        rows.append((name, size, t_ours, t_ref, float((rule.predict(eta2).accept.numpy() == reference).mean()), None))

    t_ref, (alpha, mu, beta) = timed(lambda: ref_fit_worst(fit, sel_split, c2g, COST))
    reference = ref_apply(eta2, c2g, alpha, mu, beta)[1] >= -COST
    for name, search in (("fit_worst", "none"), ("  + search", "pooled")):
        t_ours, rule = timed(lambda: sel.fit_worst(eta1, y1, eta2, y2, c2g, COST, search=search), repeat=3)
        rows.append((name, size, t_ours, t_ref, float((rule.predict(eta2).accept.numpy() == reference).mean()), 1.0))

    eta3, y3, _ = long_tailed_problem(N_CURVE, seed=3)
    pred, confidence = eta3.argmax(axis=1), eta3.max(axis=1)
    confidence_t, pred_t, y3_t = torch.from_numpy(confidence), torch.from_numpy(pred), torch.from_numpy(y3)
    t_ours, curve = timed(lambda: sel.risk_coverage(confidence_t, pred_t, y3_t, c2g), repeat=3)
    t_ref, (balanced, worst, standard) = timed(lambda: ref_risk_coverage(confidence, pred, y3, c2g))
    close = (
        np.isclose(curve.balanced.numpy(), balanced, rtol=0, atol=1e-9)
        & np.isclose(curve.worst.numpy(), worst, rtol=0, atol=1e-9)
        & np.isclose(curve.standard.numpy(), standard, rtol=0, atol=1e-9)
    )
    rows.append(("risk_coverage", f"N={N_CURVE:,} C={N_CLASSES} K=2", t_ours, t_ref, float(close.mean()), 0.5))

    print(f"argse.selective benchmark (torch {torch.__version__}, threads: {torch.get_num_threads()}, cost: {COST})")
    print()
    header = f"| {'function':<14} | {'size':<22} | {'ours (s)':>9} | {'reference (s)':>13} | {'ratio':>7} | {'target':>13} | {'agree':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for name, size, ours, ref, agree, target in rows:
        goal = "-" if target is None else f"< {target:g} s " + ("ok" if ours < target else "MISSED")
        print(f"| {name:<14} | {size:<22} | {ours:>9.3f} | {ref:>13.3f} | {ref / ours:>6.1f}x | {goal:>13} | {agree:>6.1%} |")


if __name__ == "__main__":
    main()
