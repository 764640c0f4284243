"""The gating network of AR-GSE: per-sample weights over the experts from their calibrated posteriors.

The gate never looks at the image or at class identities. It sees, for each sample, a few numbers per
expert that describe the *shape* of that expert's posterior (how confident it is, how it agrees with
the others) plus a few global ones (`gating_features`), so the same network works for any class count.
The features are standardised with statistics stored in the model's buffers, then an MLP (128, 64 by
default) and a softmax over experts give the weights; the mixture is sum_e w_e(x) * p_e(x).

Pure torch: no MLflow, no file paths. Training lives in `argse.training.gating`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

#: Features per expert: entropy, max prob, top-1 minus top-2, top-5 mass, cosine and KL to the mean.
N_EXPERT_FEATURES = 6
#: Global features: mixture entropy, cross-expert variance, spread of confidences.
N_GLOBAL_FEATURES = 3
#: Logs of probabilities are taken of max(p, EPS), so one-hot posteriors give finite features.
EPS = 1e-12
#: A feature whose standard deviation is below this is only centred, not scaled.
MIN_STD = 1e-6


def feature_size(num_experts: int) -> int:
    """Length of the gating feature vector for `num_experts` experts: 6 * E + 3."""
    return N_EXPERT_FEATURES * int(num_experts) + N_GLOBAL_FEATURES


def _check_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor [N, E, C]; got {type(probs).__name__}.")
    if probs.ndim != 3 or probs.shape[1] == 0 or probs.shape[2] == 0:
        raise ValueError(
            f"{name} must be expert posteriors of shape [N, E, C] with E, C >= 1; got {tuple(probs.shape)}."
        )
    if not torch.is_floating_point(probs):
        probs = probs.to(torch.get_default_dtype())
    return probs


def gating_features(probs: torch.Tensor) -> torch.Tensor:
    """Class-count-independent features of expert posteriors `probs` [N, E, C] -> [N, 6E + 3].

    Columns: for each expert e in order, [entropy, max probability, top-1 minus top-2 probability,
    mass of the top min(5, C) classes, cosine similarity to the mean posterior, KL(p_e || mean)];
    then [entropy of the mean posterior, mean over classes of the variance across experts, standard
    deviation across experts of the max probability]. Logs use max(p, EPS), so the features are finite
    on one-hot and uniform posteriors. Computed in the dtype of `probs` (float), without gradients
    flowing anywhere but to `probs`.
    """
    probs = _check_probs(probs)
    n, n_experts, n_classes = probs.shape
    log_p = probs.clamp_min(EPS).log()
    entropy = -(probs * log_p).sum(dim=-1)  # [N, E]
    top = probs.topk(min(5, n_classes), dim=-1).values  # [N, E, k], sorted
    max_prob = top[..., 0]
    second = top[..., 1] if top.shape[-1] > 1 else torch.zeros_like(max_prob)
    gap = max_prob - second
    top5 = top.sum(dim=-1)
    mean = probs.mean(dim=1)  # [N, C]
    cosine = (probs * mean[:, None, :]).sum(dim=-1) / (
        probs.norm(dim=-1).clamp_min(EPS) * mean.norm(dim=-1).clamp_min(EPS)[:, None]
    )
    log_mean = mean.clamp_min(EPS).log()
    kl = (probs * (log_p - log_mean[:, None, :])).sum(dim=-1).clamp_min(0.0)
    per_expert = torch.stack([entropy, max_prob, gap, top5, cosine, kl], dim=-1)
    per_expert = per_expert.reshape(n, n_experts * N_EXPERT_FEATURES)
    mixture_entropy = -(mean * log_mean).sum(dim=-1)
    variance = probs.var(dim=1, unbiased=False).mean(dim=-1)
    spread = max_prob.std(dim=1, unbiased=False)
    return torch.cat([per_expert, torch.stack([mixture_entropy, variance, spread], dim=-1)], dim=-1)


def uniform_mixture(probs: torch.Tensor) -> torch.Tensor:
    """The plain average of the experts' posteriors [N, E, C] -> [N, C]."""
    return _check_probs(probs).mean(dim=1)


class GatingNet(nn.Module):
    """Features -> standardise -> MLP -> softmax over the E experts.

    `feature_mean` and `feature_std` are buffers, so the standardisation travels with the state_dict.
    The last layer starts at zero: a fresh gate gives every expert weight 1/E (the uniform mixture).
    """

    def __init__(self, num_experts: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.1):
        super().__init__()
        if int(num_experts) != num_experts or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1; got {num_experts!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout!r}.")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be layer widths >= 1; got {hidden}.")
        self.num_experts = int(num_experts)
        self.hidden = hidden
        self.dropout = float(dropout)
        size = feature_size(self.num_experts)
        layers: list[nn.Module] = []
        width = size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(self.dropout)]
            width = h
        last = nn.Linear(width, self.num_experts)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(size))
        self.register_buffer("feature_std", torch.ones(size))

    def config(self) -> dict[str, Any]:
        """The constructor arguments: `GatingNet(**gate.config())` rebuilds the architecture."""
        return {"num_experts": self.num_experts, "hidden": list(self.hidden), "dropout": self.dropout}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GatingNet":
        """A fresh gate from `config()`'s dict (load the state_dict afterwards)."""
        return cls(num_experts=config["num_experts"], hidden=tuple(config["hidden"]), dropout=config["dropout"])

    def _check_width(self, features: torch.Tensor) -> None:
        size = feature_size(self.num_experts)
        if features.ndim != 2 or features.shape[1] != size:
            raise ValueError(
                f"features must have shape [N, {size}] for {self.num_experts} experts; got {tuple(features.shape)}."
            )

    @torch.no_grad()
    def set_standardisation(self, features: torch.Tensor) -> None:
        """Store the per-column mean and standard deviation of `features` [N, 6E+3] (from `gating_features`
        on the fitting split); a near-constant column keeps std 1."""
        self._check_width(features)
        features = features.to(self.feature_mean.device, self.feature_mean.dtype)
        std = features.std(dim=0, unbiased=False)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(torch.where(std < MIN_STD, torch.ones_like(std), std))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Unnormalised gate scores [N, E] from raw (unstandardised) features [N, 6E+3]."""
        self._check_width(features)
        features = features.to(self.feature_mean.device, self.feature_mean.dtype)
        return self.mlp((features - self.feature_mean) / self.feature_std)

    def weights_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Gate weights [N, E] (rows sum to 1) from raw features; lets training compute features once."""
        return self.logits_from_features(features).softmax(dim=-1)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Gate weights [N, E] for expert posteriors `probs` [N, E, C]."""
        probs = _check_probs(probs)
        if probs.shape[1] != self.num_experts:
            raise ValueError(f"probs must hold {self.num_experts} experts (dim 1); got {probs.shape[1]}.")
        return self.weights_from_features(gating_features(probs))


def mix(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e weights[:, e] * probs[:, e, :] -> [N, C], in the dtype of `probs`."""
    return (weights.to(probs.dtype).unsqueeze(-1) * probs).sum(dim=1)


def gated_mixture(gate: GatingNet, probs: torch.Tensor) -> torch.Tensor:
    """The gated mixture sum_e w_e(x) * p_e(x) [N, C] of expert posteriors `probs` [N, E, C], in the
    dtype of `probs`; the gate's weights are taken in eval mode from the float32 posteriors. What the
    stages fit and evaluate, and what the served model computes."""
    return mix(probs, gate_weights(gate, probs.float()))


@torch.no_grad()
def gate_weights(gate: GatingNet, probs: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """The gate's weights [N, E] in eval mode (no dropout, no gradients), optionally in batches; the
    gate's train/eval mode is left as it was."""
    was_training = gate.training
    gate.eval()
    try:
        probs = _check_probs(probs).to(gate.feature_mean.device)
        if batch_size is None:
            return gate(probs)
        return torch.cat([gate(probs[i: i + batch_size]) for i in range(0, probs.shape[0], batch_size)])
    finally:
        gate.train(was_training)


def _per_class_mean(values: torch.Tensor, y: torch.Tensor, n_classes: int,
                    class_weights: Optional[torch.Tensor], sample_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """sum_c a_c * mean_{i: y_i = c} values_i / sum_c a_c over the classes present in y (weighted means
    with `sample_weights`; a_c = `class_weights`[c], or 1)."""
    if y.ndim != 1 or y.shape[0] != values.shape[0]:
        raise ValueError(f"y must be a 1-D array of {values.shape[0]} labels; got shape {tuple(y.shape)}.")
    y = y.to(values.device).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"y must hold class labels in 0..{n_classes - 1}.")
    s = torch.ones_like(values) if sample_weights is None else torch.as_tensor(sample_weights).to(values)
    if s.shape != values.shape:
        raise ValueError(f"sample_weights must have shape [{values.shape[0]}]; got {tuple(s.shape)}.")
    mass = values.new_zeros(n_classes).index_add(0, y, s)
    total = values.new_zeros(n_classes).index_add(0, y, s * values)
    present = mass > 0
    means = torch.where(present, total / mass.clamp_min(1e-30), torch.zeros_like(total))
    a = values.new_ones(n_classes) if class_weights is None else torch.as_tensor(class_weights).to(values)
    if a.shape != (n_classes,):
        raise ValueError(f"class_weights must have shape [{n_classes}]; got {tuple(a.shape)}.")
    a = a * present
    if float(a.sum()) <= 0:
        raise ValueError("balanced metrics need at least one class present in y with a positive class weight.")
    return (a * means).sum() / a.sum()


def balanced_nll(mixture: torch.Tensor, y: torch.Tensor, class_weights: Optional[torch.Tensor] = None,
                 sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class-balanced negative log-likelihood of posteriors `mixture` [N, C] at labels `y` [N].

    The mean of -log max(p_y, EPS) within each class present in y (weighted by `sample_weights` when
    given), averaged over those classes with equal weights, or with `class_weights` [C]. Differentiable
    in `mixture`.
    """
    if mixture.ndim != 2:
        raise ValueError(f"mixture must be posteriors of shape [N, C]; got {tuple(mixture.shape)}.")
    y = torch.as_tensor(y).to(mixture.device).long()
    if y.ndim != 1 or y.shape[0] != mixture.shape[0]:
        raise ValueError(f"y must be a 1-D array of {mixture.shape[0]} labels; got shape {tuple(y.shape)}.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= mixture.shape[1]):
        raise ValueError(f"y must hold class labels in 0..{mixture.shape[1] - 1}.")
    nll = -mixture.gather(1, y[:, None])[:, 0].clamp_min(EPS).log()
    return _per_class_mean(nll, y, mixture.shape[1], class_weights, sample_weights)


def mixture_metrics(mixture: torch.Tensor, y: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    """``<prefix>mixture_nll`` (`balanced_nll`) and ``<prefix>balanced_acc`` (`balanced_accuracy`) of
    posteriors `mixture` [N, C] at labels `y` [N]: how the gate's training and its stage report a mixture."""
    return {f"{prefix}mixture_nll": float(balanced_nll(mixture, y)), f"{prefix}balanced_acc": balanced_accuracy(mixture, y)}


def balanced_accuracy(mixture: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the classes present in `y` of the accuracy of argmax `mixture` [N, C] on that class."""
    y = torch.as_tensor(y).to(mixture.device).long()
    correct = (mixture.argmax(dim=1) == y).to(torch.float64)
    return float(_per_class_mean(correct, y, mixture.shape[1], None, None))
