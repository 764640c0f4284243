"""The plug-in rejector of Narasimhan et al. (ICLR 2024), Theorem 1, in its cost-sensitive form.

    score_y(x)  = K * beta_g(y) * eta_y(x) / alpha_g(y)
    h(x)        = argmax_y score_y(x)
    margin(x)   = max_y score_y(x) - sum_y' (K * beta_g(y') / alpha_g(y') - mu_g(y')) * eta_y'(x)
    accept(x)   = margin(x) >= -cost        (or >= thresholds[group of h(x)] when thresholds are set)

Within a group the coefficient K * beta_k / alpha_k is constant, so the rule sees a sample only through
three numbers per group: the largest posterior in the group, its class, and the group's mass
(`GroupStats`). Those are computed once in O(N * C); every rule is then evaluated in O(N * K).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from argse.selective import checks as check


@dataclass(frozen=True)
class GroupStats:
    """Per-group sufficient statistics of a batch of posteriors [N, C], stored group-major [K, N]."""

    top: torch.Tensor  #: [K, N] the largest eta_y over the classes y of group k
    top_class: torch.Tensor  #: [K, N] long, the class attaining it (lowest index on ties)
    mass: torch.Tensor  #: [K, N] sum of eta_y over the classes of group k


def group_stats(eta: torch.Tensor, class_to_group: torch.Tensor, n_groups: int) -> GroupStats:
    """The sufficient statistics of validated posteriors `eta` [N, C] for groups `class_to_group` [C]."""
    n = eta.shape[0]
    class_to_group = class_to_group.to(eta.device)
    top = eta.new_empty(n_groups, n)
    top_class = torch.empty(n_groups, n, dtype=torch.long, device=eta.device)
    for k in range(n_groups):  # a loop over groups, not samples
        members = (class_to_group == k).nonzero().flatten()
        value, where = eta[:, members].max(dim=1)
        top[k] = value
        top_class[k] = members[where]
    onehot = torch.nn.functional.one_hot(class_to_group, n_groups).to(eta.dtype)
    return GroupStats(top=top, top_class=top_class, mass=(eta @ onehot).T.contiguous())


def margins(
    stats: GroupStats, coef: torch.Tensor, mu: torch.Tensor, wrong: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Predicted group and margin of S rules at once, in O(S * N * K).

    `coef` and `mu` are [S, K], with coef_k = K * beta_k / alpha_k. Returns (group [S, N], margin
    [S, N], None); when `wrong` [K, N] (bool: the top class of group k is not the label) is given, the
    group is not materialised and the third entry is the `wrong` flag of the predicted group [S, N].
    Ties between groups go to the lower group index.
    """
    best = coef[:, :1] * stats.top[0]
    group = None if wrong is not None else torch.zeros(best.shape, dtype=torch.long, device=best.device)
    chosen = None if wrong is None else wrong[0].expand(best.shape)
    for k in range(1, stats.top.shape[0]):  # a loop over groups, not samples
        score = coef[:, k:k + 1] * stats.top[k]
        better = score > best
        best = torch.maximum(best, score)
        if group is not None:
            group.masked_fill_(better, k)
        if chosen is not None:
            chosen = (better & wrong[k]) | (~better & chosen)
    return group, best - (coef - mu) @ stats.mass, chosen


@dataclass(frozen=True)
class RulePrediction:
    """The decisions of a `PluginRule` on a batch of N posteriors."""

    pred: torch.Tensor  #: [N] long, the predicted class h(x)
    accept: torch.Tensor  #: [N] bool, True where the rule predicts, False where it rejects
    margin: torch.Tensor  #: [N] float64, what the rule thresholds; larger is more confident
    group: torch.Tensor  #: [N] long, the group of the predicted class


@dataclass(frozen=True, eq=False)
class WorstFitHistory:
    """One row per round of `fit_worst`; errors and risks are measured on the selection split S2.

    Round t fits the cost-sensitive rule for `beta[t]`; `best_round` is the round that `fit_worst`
    returned (lowest `worst_risk`). The choice and the update of beta read each e_k as judged, by its
    upper confidence bound (`judged_error`; equal to `group_error` when the fit judged errors as
    measured, and for histories recorded before the bound existed).
    """

    beta: torch.Tensor  #: [R, K] the group weights of each round
    alpha: torch.Tensor  #: [R, K] the fitted alpha of each round
    mu: torch.Tensor  #: [R, K] the fitted mu of each round
    group_error: torch.Tensor  #: [R, K] e_k on S2, as measured
    coverage: torch.Tensor  #: [R] P(accept) on S2
    worst_risk: torch.Tensor  #: [R] max_k e_k + cost * P(reject) on S2, e_k as judged
    best_round: int
    judged_error: Optional[torch.Tensor] = None  #: [R, K] e_k on S2 as the fit judged it

    def __post_init__(self) -> None:
        if self.judged_error is None:
            object.__setattr__(self, "judged_error", self.group_error)

    @classmethod
    def of_rounds(cls, beta: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, group_error: torch.Tensor,
                  judged_error: torch.Tensor, coverage: torch.Tensor, worst_risk: torch.Tensor) -> "WorstFitHistory":
        """The record of R rounds (each argument stacked over them, on any device): `best_round` is the
        first with the lowest `worst_risk`."""
        return cls(beta=beta.cpu(), alpha=alpha.cpu(), mu=mu.cpu(), group_error=group_error.cpu(),
                   coverage=coverage.to(torch.float64).cpu(), worst_risk=worst_risk.cpu(),
                   best_round=int(worst_risk.argmin()), judged_error=judged_error.cpu())

    @property
    def rounds(self) -> int:
        return int(self.worst_risk.shape[0])

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per round (round, beta, group_error, judged_error, coverage, worst_risk), e.g.
        for logging."""
        return [
            {
                "round": t,
                "beta": self.beta[t].tolist(),
                "group_error": self.group_error[t].tolist(),
                "judged_error": self.judged_error[t].tolist(),
                "coverage": float(self.coverage[t]),
                "worst_risk": float(self.worst_risk[t]),
            }
            for t in range(self.rounds)
        ]

    def to_dict(self) -> dict[str, Any]:
        names = ("beta", "alpha", "mu", "group_error", "coverage", "worst_risk", "judged_error")
        d: dict[str, Any] = {name: getattr(self, name).tolist() for name in names}
        d["best_round"] = self.best_round
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorstFitHistory":
        names = ("beta", "alpha", "mu", "group_error", "coverage", "worst_risk")
        missing = [name for name in (*names, "best_round") if name not in d]
        if missing:
            raise ValueError(f"the history dict must have the keys {list(names) + ['best_round']}; missing {missing}.")
        values = {name: torch.tensor(d[name], dtype=torch.float64) for name in names}
        judged = d.get("judged_error")
        return cls(**values, best_round=int(d["best_round"]),
                   judged_error=None if judged is None else torch.tensor(judged, dtype=torch.float64))


@dataclass(frozen=True, eq=False)
class PluginRule:
    """The cost-sensitive plug-in rejector (docs/design.md, *The rule*): parameters and `predict`.

    alpha [K] > 0, mu [K], beta [K] in the simplex, cost >= 0, class_to_group [C] with values 0..K-1.
    With `thresholds` [K] set, a sample is accepted when its margin reaches the threshold of its
    predicted group, and `cost` no longer enters the decision. `history` is filled by `fit_worst`
    (None otherwise) and is not part of the rule's decisions.
    """

    alpha: torch.Tensor
    mu: torch.Tensor
    beta: torch.Tensor
    cost: float
    class_to_group: torch.Tensor
    thresholds: Optional[torch.Tensor] = None
    history: Optional[WorstFitHistory] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        c2g, k = check.class_to_group(self.class_to_group, torch.device("cpu"))
        alpha = check.vector(self.alpha, "alpha", k, torch.device("cpu"))
        mu = check.vector(self.mu, "mu", k, torch.device("cpu"))
        beta = check.vector(self.beta, "beta", k, torch.device("cpu"))
        if not bool(torch.isfinite(alpha).all()) or bool((alpha <= 0).any()):
            raise ValueError("alpha must be finite and positive in every group.")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("mu must be finite.")
        if bool((beta < 0).any()) or abs(float(beta.sum()) - 1.0) > check.SUM_TOLERANCE:
            raise ValueError("beta must be non-negative group weights summing to 1.")
        object.__setattr__(self, "class_to_group", c2g)
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "cost", check.cost(self.cost))
        if self.thresholds is not None:
            thresholds = check.vector(self.thresholds, "thresholds", k, torch.device("cpu"))
            if bool(torch.isnan(thresholds).any()):
                raise ValueError("thresholds must not be NaN.")
            object.__setattr__(self, "thresholds", thresholds)

    @property
    def n_groups(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.class_to_group.shape[0])

    @property
    def coef(self) -> torch.Tensor:
        """K * beta_k / alpha_k, the weight of a posterior of group k in the scores."""
        return self.n_groups * self.beta / self.alpha

    def predict(self, eta: check.ArrayLike) -> RulePrediction:
        """Predictions, accept mask, margins and predicted groups for posteriors `eta` [N, C]."""
        device = eta.device if isinstance(eta, torch.Tensor) else None
        eta = check.posteriors(eta, "eta", self.n_classes, device)
        stats = group_stats(eta, self.class_to_group, self.n_groups)
        group, margin, _ = margins(stats, self.coef.to(eta.device)[None], self.mu.to(eta.device)[None])
        group, margin = group[0], margin[0]
        pred = stats.top_class.gather(0, group[None])[0]
        if self.thresholds is None:
            accept = margin >= -self.cost
        else:
            accept = margin >= self.thresholds.to(eta.device)[group]
        return RulePrediction(pred=pred, accept=accept, margin=margin, group=group)

    def confidence(self, eta: check.ArrayLike) -> torch.Tensor:
        """The margin [N]: what the rule thresholds, hence its natural confidence for RC curves."""
        return self.predict(eta).margin

    def with_cost(self, cost: float) -> "PluginRule":
        """The same alpha, mu, beta (and thresholds) with another cost; the history is dropped."""
        return dataclasses.replace(self, cost=cost, history=None)

    def with_thresholds(self, thresholds: Optional[check.ArrayLike]) -> "PluginRule":
        """The same rule with per-group thresholds [K] (None restores the single cost)."""
        return dataclasses.replace(self, thresholds=thresholds, history=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats, suitable for JSON; `from_dict` inverts it."""
        return {
            "alpha": self.alpha.tolist(),
            "mu": self.mu.tolist(),
            "beta": self.beta.tolist(),
            "cost": self.cost,
            "class_to_group": self.class_to_group.tolist(),
            "thresholds": None if self.thresholds is None else self.thresholds.tolist(),
            "history": None if self.history is None else self.history.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PluginRule":
        required = ("alpha", "mu", "beta", "cost", "class_to_group")
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"a PluginRule dict must have the keys {list(required)}; missing {missing}.")
        history = d.get("history")
        return cls(
            alpha=torch.tensor(d["alpha"], dtype=torch.float64),
            mu=torch.tensor(d["mu"], dtype=torch.float64),
            beta=torch.tensor(d["beta"], dtype=torch.float64),
            cost=float(d["cost"]),
            class_to_group=torch.tensor(d["class_to_group"], dtype=torch.long),
            thresholds=None if d.get("thresholds") is None else torch.tensor(d["thresholds"], dtype=torch.float64),
            history=None if history is None else WorstFitHistory.from_dict(history),
        )
