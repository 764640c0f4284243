"""Figures logged to runs (matplotlib, headless). Each function returns a Figure; callers log and close it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402

GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def class_distribution(train_counts, eval_counts: dict, class_to_group, group_names, title: str,
                       class_names=None):
    """Log-scale train images per class, sorted by train count (largest first) and coloured by group,
    with the evaluation splits' counts; class names on the axis when there are few classes."""
    train_counts = np.asarray(train_counts)
    class_to_group = np.asarray(class_to_group)
    order = np.argsort(-train_counts, kind="stable")
    position = np.arange(len(train_counts))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for k, name in enumerate(group_names):
        mask = class_to_group[order] == k
        ax.bar(position[mask], train_counts[order][mask], width=0.9, color=GROUP_COLOURS[k % len(GROUP_COLOURS)],
               label=f"train: {name} ({int(mask.sum())} classes, {int(train_counts[class_to_group == k].sum())} images)")
    for (split, counts), marker in zip(eval_counts.items(), ("_", "x", ".")):
        ax.plot(position, np.asarray(counts)[order], linestyle="none", marker=marker, color="black", markersize=6,
                label=f"{split} ({int(np.sum(counts))} images)")
    ax.set_yscale("log")
    if class_names is not None and len(class_names) <= 20:
        ax.set_xticks(position, [str(class_names[c]) for c in order], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("class (sorted by train count)")
    else:
        ax.set_xlabel("classes, sorted by train count")
    ax.set_ylabel("images per class")
    ax.set_title(title)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


#: Line styles and markers cycled so that methods whose curves coincide stay visible.
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _legend_outside(ax, extra: list | None = None) -> None:
    """The legend to the right of the axes, where it cannot cover a curve; ``extra`` handles (what a
    marker means) come after every series."""
    handles, labels = ax.get_legend_handles_labels()
    for handle in extra or []:
        handles.append(handle)
        labels.append(handle.get_label())
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              frameon=False)


def bars_by_group(values: dict[str, np.ndarray], group_names, ylabel: str, title: str):
    """Grouped bars: one bar per series (e.g. expert or method) for every group."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(group_names) * max(1, len(values)) / 2) + 3, 4))
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(group_names))
    colours = plt.get_cmap("tab20").colors
    for i, (label, vals) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, np.asarray(vals), width, label=label,
               color=colours[i % len(colours)])
    ax.set_xticks(x, list(group_names))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


def risk_coverage_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], ylabel: str, title: str,
                         thin: dict[str, np.ndarray] | None = None, thin_label: str = "a group thinly accepted",
                         bands: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, xlabel: str = "coverage"):
    """One line per method: risk against coverage, markers on the measured points; each method has its
    own colour, line style and marker, so coinciding curves stay distinguishable. `thin` maps a method
    to a boolean per point: those points are ringed in the method's colour (`thin_label` in the
    legend), for points whose error rests on a group with too few accepted samples. `bands` maps a
    method to the (low, high) risk at each point, shaded in its colour (e.g. the range over seeds). The
    y axis shows the range of the first three curves (pass them best first); points above it are
    triangles in the method's colour on its top edge. What rings and triangles mean is said after the
    methods in the legend; the title stands clear of the triangles."""
    fig, ax = plt.subplots(figsize=(10, 5))
    colours = plt.get_cmap("tab10").colors
    # The competitive range: up to a little above the best curves (the caller passes them best first);
    # a point beyond it (e.g. a group emptied, error 1.0) is drawn on the top edge as a triangle.
    leaders = [np.asarray(risk, dtype=float) for _, (_, risk) in list(curves.items())[:max(1, min(3, len(curves) - 1))]]
    top = 1.15 * max((float(np.nanmax(r)) for r in leaders if r.size), default=1.0) or 1.0
    ringed = above = False
    for i, (label, (coverage, risk)) in enumerate(curves.items()):
        coverage, risk = np.asarray(coverage, dtype=float), np.asarray(risk, dtype=float)
        colour = colours[i % len(colours)]
        ax.plot(coverage, risk, label=label, linewidth=1.4, markersize=4, color=colour,
                linestyle=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)], alpha=0.9)
        if bands and label in bands:
            low, high = bands[label]
            ax.fill_between(coverage, np.asarray(low), np.asarray(high), color=colour, alpha=0.12, linewidth=0)
        shown = np.minimum(risk, top)
        out = risk > top
        if out.any():
            ax.plot(coverage[out], shown[out], linestyle="none", marker="^", markersize=7, color=colour, clip_on=False)
            above = True
        flags = np.asarray(thin.get(label, np.zeros(len(coverage), bool)) if thin else np.zeros(len(coverage), bool))
        if flags.any():
            ax.plot(coverage[flags], shown[flags], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                    markeredgecolor=colour, markeredgewidth=1.5, clip_on=False)
            ringed = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, top)
    ax.set_title(title, pad=14 if above or ringed else 6)  # clear of the markers on the top edge
    ax.grid(alpha=0.3)
    meaning = []
    if above:
        meaning.append(Line2D([], [], linestyle="none", marker="^", markersize=7, color="0.4",
                              label=f"above {top:.3g} (off the scale)"))
    if ringed:
        meaning.append(Line2D([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="0.4", markeredgewidth=1.5, label=thin_label))
    _legend_outside(ax, meaning)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
