"""Pictures of labels for the run report: mosaics of image and label panels.

Label colours come from the project's one palette (:mod:`pdso_ray.method.overlay`: golden-ratio
hues, background 0 black, ignore 1000 white), so the same id looks the same in every picture, in
the per-class IoU bars and in the previews beside the label PNGs.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pdso_ray.method.metrics import resize_nearest
from pdso_ray.method.overlay import class_colors, colorize, overlay

__all__ = ["PANEL_SIDE", "class_colors", "colorize", "fit_panel", "label_grid", "overlay", "printable"]

PANEL_SIDE = 240  # px: the longer side of an image or label panel before plotting


def fit_panel(panel: np.ndarray, side: int) -> np.ndarray:
    """``panel`` scaled so that its longer side is ``side``: an image (HxWx3) bilinearly, a
    label map (HxW) by nearest neighbour and then coloured."""
    h, w = panel.shape[:2]
    size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
    if panel.ndim == 3:
        return np.asarray(Image.fromarray(panel).resize(size[::-1], Image.Resampling.BILINEAR))
    return colorize(resize_nearest(panel, size))


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters written as Python escapes
    (``"bad\\x07name"``): image names come from users' files, and a font has no glyph for them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def label_grid(rows: list[tuple[str, list[np.ndarray | None]]], titles: list[str]) -> Figure:
    """One row per image, ``[image (HxWx3), label (HxW), ...]``, None drawn as "missing"; the
    row's name (an image id) shown with :func:`printable`.

    The panels are pasted into one mosaic (PANEL_SIDE square cells) shown by a single axes at
    one screen pixel per mosaic pixel: a subplot per panel costs ~0.1 s each to lay out.
    """
    cell, gap = PANEL_SIDE, 8
    mosaic = np.full((len(rows) * (cell + gap), len(titles) * (cell + gap), 3), 255, np.uint8)
    w, h = mosaic.shape[1] / 100, mosaic.shape[0] / 100  # inches at dpi 100
    margin = 0.4  # inches left of the mosaic for row names, and above it for column titles
    fig = Figure(figsize=(w + margin, h + margin), dpi=100)
    ax = fig.add_axes((margin / (w + margin), 0, w / (w + margin), h / (h + margin)))
    for i, (name, panels) in enumerate(rows):
        y = i * (cell + gap) + gap // 2
        ax.text(-6, y + cell / 2, printable(name), rotation=90, ha="right", va="center", fontsize=7)
        for j, panel in enumerate(panels):
            x = j * (cell + gap) + gap // 2
            if panel is None:
                mosaic[y:y + cell, x:x + cell] = 235
                ax.text(x + cell / 2, y + cell / 2, "missing", ha="center", va="center",
                        color="#777777")
                continue
            fitted = fit_panel(panel, cell)
            dy, dx = (cell - fitted.shape[0]) // 2, (cell - fitted.shape[1]) // 2
            mosaic[y + dy:y + dy + fitted.shape[0], x + dx:x + dx + fitted.shape[1]] = fitted
    for j, title in enumerate(titles):
        ax.text(j * (cell + gap) + gap // 2 + cell / 2, -6, title, ha="center", va="bottom",
                fontsize=10)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    return fig
