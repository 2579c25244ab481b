"""The editing trade-off: toxicity against log-perplexity and F1 for every activation-editing
condition of the beta x alpha grid, with the base model, DPO and probe steering as reference
points (the numbers of Yang et al. 2025, Tables 2 and 19, drawn as one picture)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from dpotox.outputs.figures.style import EDIT_STYLES, MODEL_COLORS

METRICS = (
    ("log_ppl", "log-perplexity on WikiText-2 (nats per token)"),
    ("f1", "F1 of continuations of Wikipedia sentences"),
)


def _points(
    ax: Axes, rows: pd.DataFrame, x: str, color: str, marker: str, label: str, size: float = 6
) -> None:
    """Rows as points at (metric ``x``, toxicity) with the toxicity CI as error bars. Rows
    without the metric (the summary said why none was measured) are left out."""
    rows = rows[rows[x].notna()]
    if rows.empty:
        return
    yerr = np.vstack([rows["toxicity"] - rows["ci_low"], rows["ci_high"] - rows["toxicity"]])
    ax.errorbar(
        rows[x],
        rows["toxicity"],
        yerr=yerr,
        fmt=marker,
        color=color,
        markersize=size,
        capsize=2,
        elinewidth=0.8,
        label=label,
    )


def editing_tradeoff(axes: Sequence[Axes], t: Mapping[str, pd.DataFrame], *, legend: bool) -> None:
    """Two panels: toxicity against log-PPL and against F1. Editing points are labelled
    ``beta/alpha``; steering points by their alpha."""
    df = t["table_editing_grid"]
    for ax, (x, xlabel) in zip(axes, METRICS):
        _points(ax, df[df["method"] == "base"], x, "black", "o", "base model", 7)
        _points(ax, df[df["method"] == "dpo"], x, MODEL_COLORS["dpo"], "*", "DPO", 11)
        steer = df[df["method"] == "steering"]
        _points(ax, steer, x, MODEL_COLORS["steering"], "^", "steering with the probe")
        for method, (color, marker, lab) in EDIT_STYLES.items():
            _points(ax, df[df["method"] == method], x, color, marker, lab)
        for _, r in df[df[x].notna() & df["alpha"].notna()].iterrows():
            text = (
                f"a={r['alpha']:g}"
                if r["method"] == "steering"
                else f"{r['beta']:g}/{r['alpha']:g}"
            )
            ax.annotate(
                text, (r[x], r["toxicity"]), xytext=(4, 3), textcoords="offset points", fontsize=7
            )
        ax.set(xlabel=xlabel, ylabel="toxicity (mean score, 95% CI)")
    axes[0].set_title("labels: beta/alpha")
    if legend:
        axes[1].legend(loc="best", fontsize=7)
