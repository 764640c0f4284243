"""Training the gating network: `train_pretrain` (class-balanced mixture NLL) and `train_selective`
(alternate the plug-in rule and a smooth surrogate of its cost-sensitive L2R risk). docs/design.md, *The gate*.

Pure torch: no MLflow. The loops are written out here; `on_epoch` / `on_round` callbacks receive each
row of metrics so the stage can log them. Both procedures are deterministic given `seed` (they run
under a forked RNG, so the caller's random state is left untouched) and restore the best state they
saw on the validation split into the gate before returning.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from argse.models.gating import GatingNet, gating_features, mix, mixture_metrics
from argse.selective import PluginRule, selective_errors
from argse.selective import checks as check
from argse.selective.matched import COVERAGES, matched_aurc, matched_aurc_gap
from argse.selective.fit import FitOptions, fit_rule

ArrayLike = Union[torch.Tensor, np.ndarray]
SELECT_BY = ("risk", "error", "aurc")


@dataclass(frozen=True)
class PretrainResult:
    """What `train_pretrain` found; the gate itself is restored to the best epoch's state."""

    best_epoch: int  #: the epoch whose state the gate holds (0: the starting gate was never beaten)
    best_val_nll: float  #: val class-balanced mixture NLL of that epoch
    history: list[dict[str, Any]]  #: one row per epoch, 0 (the starting gate) first; see `train_pretrain`


@dataclass(frozen=True)
class SelectiveResult:
    """What `train_selective` found; the gate itself is restored to the best round's state."""

    best_round: int  #: the best round on val (0: the starting gate was never beaten)
    history: list[dict[str, Any]]  #: one row per round, 0 (the starting gate) first; see `train_selective`
    rule: PluginRule  #: the plug-in rule fitted on the returned gate's mixture
    chosen: dict[str, Any]  #: the val row of the gate returned (the best round's, or the uniform mixture's)
    kept_uniform: bool = False  #: the gate returned is the uniform mixture (see `uniform_start`)
    #: the best round's val AURC minus the uniform mixture's, with its 95% paired-bootstrap interval
    uniform_gap: Optional[tuple[float, float, float]] = None


# ---------------------------------------------------------------------------------------------- inputs


def _probs(x: Any, name: str, num_experts: int, num_classes: Optional[int], device: torch.device) -> torch.Tensor:
    """Expert posteriors [N, E, C] as float32 on `device`, each row renormalised to sum to 1."""
    t = check.as_tensor(x, name)
    if t.ndim != 3 or t.shape[0] == 0:
        raise ValueError(f"{name} must be expert posteriors of shape [N, E, C] with N >= 1; got {tuple(t.shape)}.")
    if t.shape[1] != num_experts:
        raise ValueError(f"{name} must hold the gate's {num_experts} experts in dim 1; got {t.shape[1]}.")
    if num_classes is not None and t.shape[2] != num_classes:
        raise ValueError(f"{name} must have num_classes = {num_classes} classes in dim 2; got {t.shape[2]}.")
    return check.distributions(t.to(device, torch.float32), name)


def _sample_weights(x: Any, name: str, n: int, device: torch.device) -> torch.Tensor:
    """Sample weights [n] as float32 on `device`; None means all ones."""
    return check.weights(x, name, n, device).to(torch.float32)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    return v


def _device(gate: GatingNet) -> torch.device:
    return gate.feature_mean.device


def _rng(device: torch.device) -> Any:
    """A forked RNG scope (CPU, plus the CUDA device when training there)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start: start + batch_size]


def _state(gate: GatingNet) -> dict[str, torch.Tensor]:
    return copy.deepcopy(gate.state_dict())


@torch.no_grad()
def _eval_weights(gate: GatingNet, features: torch.Tensor) -> torch.Tensor:
    gate.eval()
    return gate.weights_from_features(features)


def _mixture_metrics(weights: torch.Tensor, probs: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    return {**mixture_metrics(mix(probs, weights), y), "mean_weight": weights.mean(dim=0).tolist()}


# -------------------------------------------------------------------------------------------- pretrain


def _pretrain_loss(weights: torch.Tensor, probs: torch.Tensor, y: torch.Tensor, inv_count: torch.Tensor,
                   load_balance: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, balanced NLL estimate, load-balancing term) on one batch."""
    mixture = mix(probs, weights)
    nll = -mixture.gather(1, y[:, None])[:, 0].clamp_min(1e-12).log()
    v = inv_count[y]
    nll = (v * nll).sum() / v.sum()
    balance = weights.shape[1] * weights.mean(dim=0).pow(2).sum()
    return nll + load_balance * balance, nll, balance


def train_pretrain(
    gate: GatingNet,
    probs_fit: ArrayLike,
    y_fit: ArrayLike,
    probs_val: ArrayLike,
    y_val: ArrayLike,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    load_balance: float = 0.01,
    patience: int = 10,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, dict[str, Any]], None]] = None,
) -> PretrainResult:
    """Train `gate` in pretrain mode on (probs_fit [N, E, C], y_fit) and early-stop on (probs_val, y_val).

    First the gate's standardisation is set from the features of `probs_fit`. The loss on a batch B is

        sum_{i in B} v_i * (-log m_{y_i}(x_i)) / sum_{i in B} v_i  +  load_balance * E * sum_e wbar_e ** 2

    with m = sum_e w_e p_e the gated mixture, v_i = 1 / n_{y_i} (class counts of the fitting split; so
    on the whole split the first term is the class-balanced NLL) and wbar_e the batch mean of the gate
    weight of expert e (the second term is 1 when the experts are used evenly, E when one takes all).
    AdamW(lr, weight_decay), shuffled batches. Epoch 0 evaluates the starting gate (its loss on the
    whole fitting split, no update); each later epoch trains one pass and evaluates on val. Training
    stops after `patience` epochs without a lower val balanced NLL; the gate is restored to the best
    epoch (earliest on ties), so it never ends worse on val than it started (a fresh gate starts as the
    uniform mixture).

    Each history row, also handed to `on_epoch(epoch, row)`: epoch, loss, nll, load_balance (means over
    the epoch's batches; for epoch 0, over the whole fitting split), val_mixture_nll (balanced),
    val_balanced_acc, mean_weight (list [E] of mean val gate weights).
    """
    device = _device(gate)
    num_classes = _positive_int(num_classes, "num_classes")
    epochs = _positive_int(epochs, "epochs", minimum=0)
    batch_size = _positive_int(batch_size, "batch_size")
    patience = _positive_int(patience, "patience")
    lr = _positive_float(lr, "lr")
    load_balance, weight_decay = float(load_balance), float(weight_decay)
    if load_balance < 0 or weight_decay < 0:
        raise ValueError("load_balance and weight_decay must be >= 0.")
    p_fit = _probs(probs_fit, "probs_fit", gate.num_experts, num_classes, device)
    p_val = _probs(probs_val, "probs_val", gate.num_experts, num_classes, device)
    y_fit_t = check.labels(y_fit, "y_fit", p_fit.shape[0], num_classes, device)
    y_val_t = check.labels(y_val, "y_val", p_val.shape[0], num_classes, device)

    f_fit, f_val = gating_features(p_fit), gating_features(p_val)
    gate.set_standardisation(f_fit)
    counts = torch.bincount(y_fit_t, minlength=num_classes).to(torch.float32)
    inv_count = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))

    history: list[dict[str, Any]] = []

    def record(epoch: int, loss: float, nll: float, balance: float) -> dict[str, Any]:
        row = {"epoch": epoch, "loss": loss, "nll": nll, "load_balance": balance,
               **_mixture_metrics(_eval_weights(gate, f_val), p_val, y_val_t)}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        return row

    with _rng(device):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            start = _pretrain_loss(_eval_weights(gate, f_fit), p_fit, y_fit_t, inv_count, load_balance)
        row = record(0, *(float(t) for t in start))
        best_epoch, best_nll, best_state, stale = 0, row["val_mixture_nll"], _state(gate), 0
        optimizer = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
        for epoch in range(1, epochs + 1):
            gate.train()
            sums, seen = torch.zeros(3), 0
            for idx in _batches(p_fit.shape[0], batch_size, generator):
                idx = idx.to(device)
                parts = _pretrain_loss(gate.weights_from_features(f_fit[idx]), p_fit[idx], y_fit_t[idx],
                                       inv_count, load_balance)
                optimizer.zero_grad(set_to_none=True)
                parts[0].backward()
                optimizer.step()
                sums += torch.tensor([float(t.detach()) for t in parts]) * idx.shape[0]
                seen += idx.shape[0]
            row = record(epoch, *(sums / seen).tolist())
            if row["val_mixture_nll"] < best_nll:
                best_epoch, best_nll, best_state, stale = epoch, row["val_mixture_nll"], _state(gate), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    gate.load_state_dict(best_state)
    gate.eval()
    return PretrainResult(best_epoch=best_epoch, best_val_nll=best_nll, history=history)


# ------------------------------------------------------------------------------------------- selective


def selective_surrogate(
    mixture: torch.Tensor,
    y: torch.Tensor,
    rule: PluginRule,
    scale: float,
    sample_weights: Optional[torch.Tensor] = None,
    error_temperature: float = 0.1,
) -> torch.Tensor:
    """Smooth surrogate of the cost-sensitive L2R risk sum_k beta_k e_k + c * P(reject) of `rule`
    (alpha, mu, beta, cost c) when it is applied to `mixture` [N, C] with labels `y` [N].

    With a_y = K * beta_g(y) / alpha_g(y) (the rule's coef, per class), b_y = a_y - mu_g(y) and eta the
    mixture, the rule's margin is m(x) = max_y a_y eta_y - sum_y b_y eta_y (docs/design.md, *The rule*). Per sample:

        s_i   = sigmoid((m(x_i) + c) / scale)                             soft acceptance
        err_i = 1 - softmax_y(log(a_y eta_y(x_i)) / error_temperature)_{y_i}
                                          soft error of h(x) = argmax_y a_y eta_y (-> [h != y] as T -> 0)

    and, with sample weights w_i (1 when None) and G_k the samples whose label is in group k,

        e_k  = sum_{i in G_k} w_i s_i err_i / max(sum_{i in G_k} w_i s_i, 1e-6 * sum_i w_i)
        loss = sum_k beta_k e_k  +  c * sum_i w_i (1 - s_i) / sum_i w_i

    (a group absent from the batch contributes 0). With hard acceptance and error this is exactly the
    rule's L2R risk on the batch; e_k is the ratio of the paper's definition (error among accepted), so
    the loss does not depend on the scale of alpha. The rule's parameters and `scale` are constants:
    gradients reach only `mixture` (hence the gate), through both the acceptance and the error.
    """
    mixture = mixture.to(torch.float64)
    c2g = rule.class_to_group.to(mixture.device)
    coef = rule.coef.to(mixture.device)
    mu = rule.mu.to(mixture.device)
    weighted = mixture * coef[c2g]
    margin = weighted.max(dim=1).values - mixture @ (coef - mu)[c2g]
    accept = torch.sigmoid((margin + rule.cost) / scale)
    sharp = (weighted.clamp_min(1e-300).log() / error_temperature).softmax(dim=1)
    err = 1.0 - sharp.gather(1, y[:, None])[:, 0]
    w = torch.ones_like(accept) if sample_weights is None else sample_weights.to(accept)
    in_group = torch.nn.functional.one_hot(c2g[y], coef.shape[0]).to(accept) * w[:, None]  # [N, K]
    accepted = accept @ in_group
    wrong = (accept * err) @ in_group
    errors = wrong / accepted.clamp_min(1e-6 * float(w.sum()))
    return (rule.beta.to(accept) * errors).sum() + rule.cost * ((1.0 - accept) * w).sum() / w.sum()


def _surrogate_scale(mixture: torch.Tensor, rule: PluginRule, temperature: float) -> float:
    """temperature * median_i |m(x_i) + c| over the rows of `mixture`, floored at 1e-6."""
    margin = rule.predict(mixture.to(torch.float64)).margin
    return max(temperature * float((margin + rule.cost).abs().median()), 1e-6)


def train_selective(
    gate: GatingNet,
    probs_fit: ArrayLike,
    y_fit: ArrayLike,
    probs_val: ArrayLike,
    y_val: ArrayLike,
    class_to_group: ArrayLike,
    *,
    cost: float,
    objective: str,
    rounds: int,
    epochs_per_round: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    weights_fit: Optional[ArrayLike] = None,
    weights_val: Optional[ArrayLike] = None,
    temperature: float = 0.5,
    error_temperature: float = 0.1,
    seed: int = 0,
    fit_kwargs: Optional[dict[str, Any]] = None,
    select_by: str = "risk",
    coverages: Optional[Sequence[float]] = None,
    uniform_start: bool = False,
    n_boot: int = 200,
    on_round: Optional[Callable[[int, dict[str, Any]], None]] = None,
) -> SelectiveResult:
    """Train `gate` (pretrained: its standardisation is kept) in selective mode for the L2R objective.

    Round 0 evaluates the starting gate. Evaluating a gate means: mixtures on fit and val (eval mode),
    fit the plug-in rule on them (`fit_worst` for objective "worst", `fit_balanced` for "balanced";
    S1 = fit, S2 = val, `cost`, the sample weights, and `fit_kwargs` such as n_starts or rounds), and
    measure its decisions on val with `selective_errors`. Each round r = 1..`rounds` then trains the
    gate for `epochs_per_round` epochs (fresh AdamW(lr, weight_decay), shuffled batches of the fitting
    split) on `selective_surrogate` for the rule of round r - 1 (with `error_temperature`), with
    scale = `temperature` * the median over the fitting split of |margin + cost| under the mixture at
    the start of the round (the margins' own scale, which grows with 1 / alpha), and evaluates it again
    (which refits the rule on the new mixture). The round with the lowest val L2R risk (worst-group
    max_k e_k + cost * P(reject) for "worst", balanced mean_k e_k + cost * P(reject) for "balanced";
    earliest on ties) is restored into the gate and its rule returned, so the result is never worse on
    val than round 0. `select_by="aurc"` selects on the val coverage-matched AURC of the objective's
    error over `coverages` (default: the comparison's grid; `argse.selective.matched.matched_aurc`),
    the number the evaluate stage ranks by, with each group error judged by its upper confidence
    bound on val (`judged=True`), so that no gate is kept for a tail that val saw on a few images.
    With `uniform_start`, round 0 also evaluates the uniform mixture (the gate with its last layer at
    zero, a member of the gate family) and starts from it when it is better on the criterion (row 0 then
    has start_uniform 1 and the starting gate's value in val_<criterion>_given); and, with
    `select_by="aurc"`, a best round that is not the uniform mixture is kept only if it beats it beyond
    val's sampling noise: the 95% paired-bootstrap interval of the AURC difference (`matched_aurc_gap`,
    `n_boot` resamples) lies below zero. Otherwise the gate returned is the uniform mixture
    (`kept_uniform`). Val also chose the rounds, the rules' thresholds and the exponentiated gradient,
    so a val gain is optimistic; a gain inside the noise is not taken. `select_by="error"` selects on
    the val selective error instead (max_k e_k for "worst", mean_k e_k for "balanced"), which then is
    the quantity guaranteed not to worsen.

    Each history row, also handed to `on_round(round, row)`: round, val_balanced_error,
    val_worst_error, val_coverage, val_group_error (list [K]), val_balanced_risk, val_worst_risk,
    val_l2r_risk (the objective's risk), val_mixture_nll, val_balanced_acc, mean_weight (list [E]),
    alpha, mu, beta (lists [K] of the round's rule), and for rounds >= 1 loss (mean surrogate over the
    round's last epoch) and scale.
    """
    objective = check.objective(objective)
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}; got {select_by!r}.")
    criterion = f"val_{objective}_{select_by}"  # val_worst_risk, val_balanced_error, val_worst_aurc, ...
    device = _device(gate)
    rounds = _positive_int(rounds, "rounds", minimum=0)
    epochs_per_round = _positive_int(epochs_per_round, "epochs_per_round")
    batch_size = _positive_int(batch_size, "batch_size")
    lr = _positive_float(lr, "lr")
    temperature = _positive_float(temperature, "temperature")
    error_temperature = _positive_float(error_temperature, "error_temperature")
    cost = float(cost)
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"cost must be a finite number >= 0; got {cost}.")
    c2g = check.as_tensor(class_to_group, "class_to_group")
    if c2g.ndim != 1:
        raise ValueError(f"class_to_group must be a 1-D array [C]; got shape {tuple(c2g.shape)}.")
    num_classes = int(c2g.shape[0])
    p_fit = _probs(probs_fit, "probs_fit", gate.num_experts, num_classes, device)
    p_val = _probs(probs_val, "probs_val", gate.num_experts, num_classes, device)
    y_fit_t = check.labels(y_fit, "y_fit", p_fit.shape[0], num_classes, device)
    y_val_t = check.labels(y_val, "y_val", p_val.shape[0], num_classes, device)
    w_fit = _sample_weights(weights_fit, "weights_fit", p_fit.shape[0], device)
    w_val = _sample_weights(weights_val, "weights_val", p_val.shape[0], device)
    options = FitOptions(**(fit_kwargs or {}))

    f_fit, f_val = gating_features(p_fit), gating_features(p_val)
    history: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        history.append(row)
        if on_round is not None:
            on_round(row["round"], row)

    def evaluate(r: int, extra: dict[str, Any]) -> tuple[dict[str, Any], PluginRule, torch.Tensor]:
        weights_val_gate = _eval_weights(gate, f_val)
        mix_fit = mix(p_fit, _eval_weights(gate, f_fit)).to(torch.float64)
        mix_val = mix(p_val, weights_val_gate).to(torch.float64)
        rule = fit_rule(objective, mix_fit, y_fit_t, mix_val, y_val_t, c2g, cost,
                        weights_fit=w_fit.double(), weights_sel=w_val.double(), options=options)
        decision = rule.predict(mix_val)
        errors = selective_errors(decision.pred, decision.accept, y_val_t, rule.class_to_group, w_val.double())
        row = {
            "round": r,
            "val_balanced_error": errors.balanced_error,
            "val_worst_error": errors.worst_error,
            "val_coverage": errors.coverage,
            "val_group_error": errors.group_error.tolist(),
            "val_balanced_risk": errors.balanced_l2r(cost),
            "val_worst_risk": errors.worst_l2r(cost),
            **_mixture_metrics(weights_val_gate, p_val, y_val_t),
            "alpha": rule.alpha.tolist(),
            "mu": rule.mu.tolist(),
            "beta": rule.beta.tolist(),
            **extra,
        }
        row["val_l2r_risk"] = row["val_worst_risk" if objective == "worst" else "val_balanced_risk"]
        if select_by == "aurc":
            row[criterion] = matched_aurc(
                {"tunev": mix_fit, "val": mix_val}, {"tunev": y_fit_t.cpu(), "val": y_val_t.cpu()},
                {"tunev": w_fit.double().cpu(), "val": w_val.double().cpu()}, c2g, objective, split="val",
                coverages=COVERAGES if coverages is None else coverages, fit_options=options, judged=True)
        return row, rule, mix_fit

    with _rng(device):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        row, rule, mix_fit = evaluate(0, {})
        extra: dict[str, Any] = {}
        if uniform_start:
            given_state, given = _state(gate), (row, rule, mix_fit)
            last = gate.mlp[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
            uniform_row, uniform_rule, uniform_fit = evaluate(0, {})
            uniform_state = _state(gate)
            extra = {"start_uniform": float(uniform_row[criterion] < row[criterion]), f"{criterion}_given": row[criterion]}
            if extra["start_uniform"]:
                row, rule, mix_fit = uniform_row, uniform_rule, uniform_fit
            else:
                gate.load_state_dict(given_state)
                row, rule, mix_fit = given
            row.update(extra)
        record(row)
        best_round, best_value, best_rule, best_state = 0, row[criterion], rule, _state(gate)
        for r in range(1, rounds + 1):
            scale = _surrogate_scale(mix_fit, rule, temperature)
            optimizer = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
            for _ in range(epochs_per_round):
                gate.train()
                total, mass = 0.0, 0.0
                for idx in _batches(p_fit.shape[0], batch_size, generator):
                    idx = idx.to(device)
                    mixture = mix(p_fit[idx], gate.weights_from_features(f_fit[idx]))
                    loss = selective_surrogate(mixture, y_fit_t[idx], rule, scale, w_fit[idx], error_temperature)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    batch_mass = float(w_fit[idx].sum())
                    total, mass = total + float(loss.detach()) * batch_mass, mass + batch_mass
            row, rule, mix_fit = evaluate(r, {"loss": total / mass, "scale": scale})
            record(row)
            if row[criterion] < best_value:
                best_round, best_value, best_rule, best_state = r, row[criterion], rule, _state(gate)
    gate.load_state_dict(best_state)
    gate.eval()
    chosen, gap, kept_uniform = history[best_round], None, best_round == 0 and bool(extra.get("start_uniform"))
    if uniform_start and select_by == "aurc" and not kept_uniform:
        eta = {"tunev": mix(p_fit, _eval_weights(gate, f_fit)), "val": mix(p_val, _eval_weights(gate, f_val))}
        uniform = {"tunev": p_fit.mean(dim=1), "val": p_val.mean(dim=1)}
        gap = matched_aurc_gap(
            {k: v.double().cpu() for k, v in eta.items()}, {k: v.double().cpu() for k, v in uniform.items()},
            {"tunev": y_fit_t.cpu(), "val": y_val_t.cpu()}, {"tunev": w_fit.double().cpu(), "val": w_val.double().cpu()},
            c2g, objective, split="val", coverages=COVERAGES if coverages is None else coverages,
            fit_options=options, n_boot=n_boot, seed=seed, judged=True)
        if not gap[2] < 0:
            gate.load_state_dict(uniform_state)
            gate.eval()
            chosen, best_rule, kept_uniform = uniform_row, uniform_rule, True
    return SelectiveResult(best_round=best_round, history=history, rule=best_rule, chosen=chosen,
                           kept_uniform=kept_uniform, uniform_gap=gap)
