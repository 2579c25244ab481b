"""The look of every figure, in one place: palette, the papers' group names, panel sizes, and
how a figure is written.

Colours are Okabe & Ito's palette (2008), which stays distinguishable under the common
colour-vision deficiencies; where the papers colour a line (Fig. 1a: base red, ablated yellow,
DPO green) the nearest colour of that palette is taken.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # jobs run headless (SLURM nodes, CI); no display is ever needed

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dpotox.io import atomic_path

OKABE_ITO = {
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "black": "#000000",
    "grey": "#999999",
}
GROUPS = ("TP", "TN", "AP", "AN")
# The papers name each DPO group by its alignment, its pre-DPO activation sign and the
# direction DPO moved it: TP_- (toxic, positive, activated less), TN_+, AP_+, AN_-.
GROUP_LABELS = {
    "TP": "TP$_-$",
    "TN": "TN$_+$",
    "AP": "AP$_+$",
    "AN": "AN$_-$",
    "increased": "projection rose",
}
GROUP_COLORS = {
    "TP": OKABE_ITO["vermillion"],
    "TN": OKABE_ITO["orange"],
    "AP": OKABE_ITO["sky"],
    "AN": OKABE_ITO["blue"],
    "increased": OKABE_ITO["grey"],
}
MODEL_COLORS = {
    "base": OKABE_ITO["vermillion"],
    "ablated": OKABE_ITO["orange"],
    "dpo": OKABE_ITO["green"],
    "steering": OKABE_ITO["purple"],
}
EDIT_STYLES = {  # method -> (colour, marker, legend label)
    "edit-probe-cos": (OKABE_ITO["blue"], "o", "editing, probe, by |cos|"),
    "edit-probe-act": (OKABE_ITO["sky"], "s", "editing, probe, by ascending |activation|"),
    "edit-free-cos": (OKABE_ITO["orange"], "D", "editing, probe-free, by |cos|"),
    "edit-probe-ref": (OKABE_ITO["vermillion"], "P", "editing, probe, the reference's order"),
    "edit-const-probe-ref": (OKABE_ITO["green"], "^", "editing to constants, the reference's"),
    "edit-const-probe-cos": (OKABE_ITO["purple"], "v", "editing to constants, by |cos|"),
    "edit-const-probe-act": (OKABE_ITO["yellow"], "<", "editing to constants, by |activation|"),
}
PANEL_INCHES = (5.2, 3.6)  # width, height of one panel
PROJ_UNIT = "residual-stream units"  # a dot product with the unit probe direction
_RC = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.05),
    "axes.prop_cycle": matplotlib.cycler(color=list(OKABE_ITO.values())),
    "legend.frameon": False,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,  # TrueType in PDFs, so text stays editable in a paper's figure
}


def figure_inches(n_rows: int, n_cols: int) -> tuple[float, float]:
    """The size of a figure of ``n_rows`` x ``n_cols`` panels, in inches."""
    return PANEL_INCHES[0] * n_cols, PANEL_INCHES[1] * n_rows


def figure_pixels(n_rows: int, n_cols: int, dpi: int) -> tuple[int, int]:
    """The PNG size (width, height) that :func:`save` writes for that grid at ``dpi``."""
    w, h = figure_inches(n_rows, n_cols)
    return round(w * dpi), round(h * dpi)


@contextmanager
def panels(n_rows: int, n_cols: int, title: str) -> Iterator[tuple[Figure, np.ndarray]]:
    """A figure of ``n_rows`` x ``n_cols`` panels (a 2-D array of axes) in the house style.
    The layout engine keeps the size fixed, so every PNG has the size :func:`figure_pixels`
    gives (``bbox_inches="tight"`` would crop it)."""
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(
            n_rows,
            n_cols,
            figsize=figure_inches(n_rows, n_cols),
            squeeze=False,
            layout="constrained",
        )
        fig.suptitle(title, fontsize="medium")
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def save(fig: Figure, png: str | Path, pdf: str | Path, *, dpi: int) -> None:
    """Write ``fig`` as PNG and PDF; each file appears complete or not at all."""
    for path, fmt in ((png, "png"), (pdf, "pdf")):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)


def group_legend(where: Axes | Figure, groups: Sequence[str] = GROUPS, **kwargs) -> None:
    """A legend of the DPO groups' colours, named as in the papers, on a panel or a figure."""
    handles = [Patch(color=GROUP_COLORS[g], label=GROUP_LABELS[g]) for g in groups]
    where.legend(handles=handles, **kwargs)


def zero_line(ax: Axes, axis: str = "y") -> None:
    """A thin black line at 0, where a sign change matters to the reading."""
    (ax.axhline if axis == "y" else ax.axvline)(0, color="black", linewidth=0.8, zorder=1)
