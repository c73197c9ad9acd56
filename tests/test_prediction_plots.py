"""predictions.png of stage=detect: box labels stay inside the picture and never cover each other, even for a cluster
of small boxes in a corner (the usual output of a barely trained detector)."""
from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fdlight.diagnostics.predictions import place_labels  # noqa: E402


def test_labels_of_clustered_boxes_neither_overlap_nor_leave_the_picture():
    fig, axes = plt.subplots(2, 2, figsize=(8, 8.6), layout="constrained")
    for ax in axes.flat:
        ax.imshow(np.zeros((64, 64, 3)))
        ax.set_title("a title\nof two lines")
        ax.axis("off")
    ax = axes[1, 1]
    boxes = [[55, 47, 64, 64], [52, 52, 60, 64], [57, 52, 64.7, 64], [50, 58, 58, 64], [0, 0, 6, 5]]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    place_labels(ax, renderer, [(b, f"class_8 0.{20 - i}", "tab:purple") for i, b in enumerate(boxes)])
    fig.canvas.draw()
    frame = ax.get_window_extent(renderer)
    extents = [t.get_bbox_patch().get_window_extent(renderer) for t in ax.texts]
    assert len(extents) == len(boxes)
    for a, b in itertools.combinations(extents, 2):
        assert not a.overlaps(b), (a, b)
    for e in extents:
        assert frame.x0 - 1 <= e.x0 and e.x1 <= frame.x1 + 1 and frame.y0 - 1 <= e.y0 and e.y1 <= frame.y1 + 1
    plt.close(fig)
