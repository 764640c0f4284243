"""The risk-coverage figure reads at the UI's size: the methods first in the legend and what its markers
mean after them, every ring and off-scale triangle in its method's colour, the title above the markers
on the top edge."""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np

from argse import figures


def test_markers_are_explained_after_the_methods_and_drawn_in_their_methods_colours():
    coverage = np.array([1.0, 0.8, 0.6, 0.4])
    curves = {"ar-gse[worst]": (coverage, np.array([0.06, 0.03, 0.01, 0.0])),  # best first, as the stages pass them
              "plugin-worst[ce]": (coverage, np.array([0.07, 0.04, 0.02, 0.01])),
              "chow[balsoftmax]": (coverage, np.array([0.07, 0.05, 0.03, 0.02])),
              "chow[ce]": (coverage, np.array([0.08, 0.05, 1.0, 1.0]))}
    thin = {"chow[ce]": np.array([False, False, True, True]), "plugin-worst[ce]": np.array([False, False, False, True])}
    fig = figures.risk_coverage_curves(curves, "worst-group error", "a title", thin, "a group with < 10 accepted images")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == list(curves)
    assert labels[4].startswith("above ") and labels[4].endswith("(off the scale)")
    assert labels[5:] == ["a group with < 10 accepted images"]
    colour = {line.get_label(): mcolors.to_hex(line.get_color()) for line in ax.get_lines() if line.get_label() in curves}
    rings = [line for line in ax.get_lines() if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]
    triangles = [line for line in ax.get_lines() if line.get_marker() == "^" and line.get_linestyle() == "None"]
    assert {mcolors.to_hex(r.get_markeredgecolor()) for r in rings} == {colour["chow[ce]"], colour["plugin-worst[ce]"]}
    assert {mcolors.to_hex(t.get_color()) for t in triangles} == {colour["chow[ce]"]}
    fig.canvas.draw()  # the title's box lies above the triangles drawn on the top edge
    renderer = fig.canvas.get_renderer()
    title = ax.title.get_window_extent(renderer)
    tops = [t.get_window_extent(renderer) for t in triangles]
    assert all(title.y0 > box.y1 for box in tops), (title, tops)
    figures.close(fig)
