"""Figures that put the alignment runs side by side (rule ``methods_tables`` writes their
tables; see :mod:`dpotox.outputs.methods`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from dpotox.outputs.figures.style import (
    GROUP_COLORS,
    GROUP_LABELS,
    GROUPS,
    MODEL_COLORS,
    OKABE_ITO,
    PROJ_UNIT,
    group_legend,
    zero_line,
)

Tables = Mapping[str, pd.DataFrame]


def _run_colors(runs: Sequence[str]) -> dict[str, str]:
    """Base and DPO in their colours everywhere; the other runs through the rest of the
    palette, in table order."""
    rest = [c for k, c in OKABE_ITO.items() if k not in ("vermillion", "green", "yellow")]
    out, i = {}, 0
    for run in runs:
        if run in MODEL_COLORS:
            out[run] = MODEL_COLORS[run]
        else:
            out[run] = rest[i % len(rest)]
            i += 1
    return out


def methods_comparison(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Per run: (a) toxicity with its CI, (b) the share of neurons that reduce their projection
    (claim C3), (c) each group's share of the reduction (Table 5), stacked, (d) the share of the
    run's reduction that patching each set to the run's means recovers (C2, C4), with its CI."""
    df = t["table_methods"]
    colors = _run_colors(df["run"])
    y = np.arange(len(df))
    ax = axes[0]
    err = np.vstack(
        [df["toxicity"] - df["toxicity_ci_low"], df["toxicity_ci_high"] - df["toxicity"]]
    )
    ax.barh(y, df["toxicity"], xerr=err, color=[colors[r] for r in df["run"]], capsize=3)
    ax.set(yticks=y, yticklabels=df["run"], xlabel="toxicity (mean score, 95% CI)")
    ax.invert_yaxis()
    runs = df[df["run"] != "base"].reset_index(drop=True)
    y = np.arange(len(runs))
    ax = axes[1]
    ax.barh(y, runs["pct_reducing"], color=[colors[r] for r in runs["run"]])
    ax.axvline(50, color=OKABE_ITO["grey"], linestyle="--", linewidth=1)
    ax.set(
        yticks=y,
        yticklabels=runs["run"],
        xlabel="neurons reducing their projection (%)",
        xlim=(0, 100),
    )
    ax.invert_yaxis()
    ax = axes[2]
    left = np.zeros(len(runs))
    for g in GROUPS:
        share = runs[f"share_{g}"].fillna(0).to_numpy(float)
        ax.barh(y, share, left=left, color=GROUP_COLORS[g], label=GROUP_LABELS[g])
        left += share
    ax.set(yticks=y, yticklabels=runs["run"], xlabel="share of the reduction (%)", xlim=(0, 100))
    ax.invert_yaxis()
    if legend:
        # Below the panel: the stacked bars fill it to 100%, so a legend inside hides them.
        group_legend(
            ax, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize=7, frameon=False
        )
    ax = axes[3]
    patches = [c.removesuffix("_recovered") for c in runs.columns if c.endswith("_recovered")]
    height = 0.8 / max(len(patches), 1)
    palette = [OKABE_ITO[k] for k in ("blue", "orange", "purple", "sky", "grey")]
    for i, p in enumerate(patches):
        mid = runs[f"{p}_recovered"].to_numpy(float)
        err = np.vstack([mid - runs[f"{p}_recovered_low"], runs[f"{p}_recovered_high"] - mid]).clip(
            min=0
        )
        ax.barh(
            y + (i - (len(patches) - 1) / 2) * height,
            mid,
            height=height,
            xerr=err,
            capsize=2,
            color=palette[i % len(palette)],
            label=p.removeprefix("patch-"),
        )
    zero_line(ax, "x")
    ax.set(yticks=y, yticklabels=runs["run"], xlabel="run's reduction recovered by patching (%)")
    ax.invert_yaxis()
    if patches and legend:
        ax.legend(loc="lower right", fontsize=7)


def layer_groups(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Fig. 3 for every run: one panel per group, each run's per-layer reduction by that group
    as a line."""
    df = t["table_methods_layers"]
    runs = list(dict.fromkeys(df["run"]))
    colors = _run_colors(runs)
    for ax, g in zip(axes, GROUPS, strict=True):
        for run in runs:
            part = df[df["run"] == run]
            ax.plot(part["layer"], part[g], marker="o", markersize=2, color=colors[run], label=run)
        zero_line(ax)
        ax.set(
            title=f"group {GROUP_LABELS[g]}",
            xlabel="MLP layer",
            ylabel=f"reduction ({PROJ_UNIT})" if g == GROUPS[0] else None,
        )
    if legend:
        axes[0].legend(loc="upper left", fontsize=7)
