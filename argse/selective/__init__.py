"""`argse.selective`: the plug-in rejector for long-tailed selective classification, pure torch.

The rule and its fitting follow Narasimhan, Menon, Jitkrittum, Gupta, Kumar, "Learning to Reject Meets
Long-tail Learning", ICLR 2024 (Theorem 1, Algorithms 1 and 2); docs/design.md has the maths. Inputs may
be torch tensors or numpy arrays; outputs are tensors and floats in small frozen dataclasses. Bad
inputs raise ValueError with a sentence naming the argument.
"""

from argse.selective.coverage import fit_at_coverage, fit_group_thresholds
from argse.selective.fit import FitOptions, fit_balanced, fit_rule, fit_worst
from argse.selective.metrics import (
    RiskCoverage,
    SelectiveErrors,
    aurc,
    l2r_risk,
    chow,
    ece,
    risk_coverage,
    selective_errors,
)
from argse.selective.rule import PluginRule, RulePrediction, WorstFitHistory

__all__ = [
    "FitOptions",
    "PluginRule",
    "RiskCoverage",
    "RulePrediction",
    "SelectiveErrors",
    "WorstFitHistory",
    "aurc",
    "chow",
    "ece",
    "fit_at_coverage",
    "fit_balanced",
    "fit_group_thresholds",
    "fit_rule",
    "fit_worst",
    "l2r_risk",
    "risk_coverage",
    "selective_errors",
]
