"""Figures of the neuron-level analysis (docs/design.md, "The science"): projections on the
probe, the DPO groups, activations. Each function fills one model's row of panels from its
tables (see :data:`dpotox.plan.outputs.FIGURES` for which)."""

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
# A line of more points than this is thinned for drawing (the peak is always kept): a PDF of
# an 8B model's 460k ranked neurons would be megabytes of invisible detail.
MAX_LINE_POINTS = 5000


def layer_projections(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Fig. 1a: each layer's mean MLP output along the probe: base, DPO, and base with the
    most toxic-aligned neurons ablated."""
    df, ax = t["fig1a_layer_projections"], axes[0]
    ablated = [c for c in df.columns if c.startswith("ablated_top")]
    lines = [("base", "base", MODEL_COLORS["base"])]
    lines += [
        (
            c,
            f"base, top {c.removeprefix('ablated_top')} toxic neurons ablated",
            MODEL_COLORS["ablated"],
        )
        for c in ablated
    ]
    lines += [("dpo", "DPO", MODEL_COLORS["dpo"])]
    for col, lab, color in lines:
        ax.plot(df["layer"], df[col], marker="o", markersize=3, color=color, label=lab)
    zero_line(ax)
    ax.set(xlabel="MLP layer", ylabel=f"MLP output along probe\n({PROJ_UNIT})")
    if legend:
        ax.legend(loc="upper left")


def cumulative_reduction(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Fig. 1b: the running sum of the neurons' reductions, largest first: it climbs while
    neurons reduce their projection and falls once they increase it (the inverted U)."""
    df, ax = t["fig1b_cumulative_reduction"], axes[0]
    y = df["cumulative_reduction"].to_numpy()
    peak = int(np.argmax(y))
    keep = np.unique(
        np.r_[np.linspace(0, len(y) - 1, min(len(y), MAX_LINE_POINTS)).astype(int), peak]
    )
    ax.plot(df["rank"].to_numpy()[keep], y[keep], color=OKABE_ITO["blue"], label="cumulative sum")
    ax.plot(
        df["rank"].iloc[peak],
        y[peak],
        "o",
        color=OKABE_ITO["vermillion"],
        label=f"peak {y[peak]:.1f} (rank {df['rank'].iloc[peak]:,})",
    )
    ax.plot(df["rank"].iloc[-1], y[-1], "s", color=OKABE_ITO["green"], label=f"net {y[-1]:.1f}")
    zero_line(ax)
    ax.set(
        xlabel="neurons ranked by reduction (rank)", ylabel=f"cumulative reduction\n({PROJ_UNIT})"
    )
    ax.legend(loc="lower center")  # the numbers are the model's own: every row shows its legend


def group_shares(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Fig. 2a: each DPO group's share of the total reduction (the sum of positive deltas)."""
    df, ax = t["table5_group_shares"].set_index("group"), axes[0]
    pct = df.loc[list(GROUPS), "pct_of_reduction"]
    bars = ax.bar([GROUP_LABELS[g] for g in GROUPS], pct, color=[GROUP_COLORS[g] for g in GROUPS])
    ax.bar_label(
        bars,
        labels=[
            f"{p:.1f}%\n({int(n):,} n.)" for p, n in zip(pct, df.loc[list(GROUPS), "n_neurons"])
        ],
        fontsize=8,
    )
    ax.set(
        xlabel="neuron group",
        ylabel="share of the total reduction (%)",
        ylim=(0, max(pct.max() * 1.3, 1)),
    )


def group_shares_by_rank(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Fig. 2b: among the top-ranked neurons (by reduction), each group's share of every bin
    of ranks, stacked."""
    df, ax = t["fig2b_group_shares_by_rank"], axes[0]
    share = df.pivot_table(index="bin_end", columns="group", values="share", aggfunc="sum")
    share = share.reindex(columns=list(GROUPS)).fillna(0.0)
    width = float(np.diff(share.index).min()) * 0.9 if len(share) > 1 else 1.0
    bottom = np.zeros(len(share))
    for g in GROUPS:
        ax.bar(
            share.index - width / 2,
            share[g],
            width=width,
            bottom=bottom,
            color=GROUP_COLORS[g],
            label=GROUP_LABELS[g],
        )
        bottom += share[g].to_numpy()
    ax.set(
        xlabel="rank by reduction (end of each bin)",
        ylabel="share of the bin's neurons",
        ylim=(0, 1),
    )
    if legend:  # below the figure: the bars fill the panel
        group_legend(ax.figure, ncols=4, loc="outside lower center")


def projection_arrows(axes: Sequence[Axes], t: Tables, *, legend: bool, arrows_top: int) -> None:
    """Fig. 2c: each of the top neurons by reduction, an arrow from its projection before DPO
    to after, placed at its value vector's cosine with the probe and coloured by group."""
    n, ax = t["neurons"], axes[0]
    top = n.nsmallest(min(arrows_top, len(n)), "rank_delta")
    for g in GROUPS:
        s = top[top["group"] == g]
        ax.quiver(
            s["cos"],
            s["proj_base"],
            s["cos_dpo"] - s["cos"],
            s["proj_dpo"] - s["proj_base"],
            angles="xy",
            scale_units="xy",
            scale=1,
            color=GROUP_COLORS[g],
            width=0.004,
            headwidth=3,
            headlength=3,
            headaxislength=3,
            label=GROUP_LABELS[g],
        )
    # quiver does not widen the axes to the arrow heads
    ys = np.r_[top["proj_base"], top["proj_dpo"]]
    pad = 0.05 * (ys.max() - ys.min() or 1.0)
    ax.set_ylim(ys.min() - pad, ys.max() + pad)
    xs = np.r_[top["cos"], top["cos_dpo"]]
    xpad = 0.05 * (xs.max() - xs.min() or 1.0)
    ax.set_xlim(xs.min() - xpad, xs.max() + xpad)
    zero_line(ax)
    zero_line(ax, "x")
    ax.set(
        xlabel="cos(value vector, probe)",
        ylabel=f"projection on probe, before -> after DPO\n({PROJ_UNIT})",
        title=f"top {len(top)} neurons by reduction",
    )
    if legend:  # below the figure: arrows reach every corner of the panel
        group_legend(ax.figure, ncols=4, loc="outside lower center")


def layer_group_reduction(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Fig. 3: each layer's reduction by the four groups, stacked, and the layer's net change
    (which also counts the neurons whose projection rose)."""
    df, ax = t["fig3_layer_group_reduction"], axes[0]
    bottom = np.zeros(len(df))
    for g in GROUPS:
        ax.bar(
            df["layer"],
            df[g],
            bottom=bottom,
            color=GROUP_COLORS[g],
            label=GROUP_LABELS[g],
            width=0.85,
        )
        bottom += df[g].to_numpy()
    ax.plot(
        df["layer"],
        df["net"],
        "o-",
        color="black",
        markersize=3,
        label="net (with neurons that rose)",
    )
    zero_line(ax)
    ax.set(xlabel="MLP layer", ylabel=f"reduction of the projection\n({PROJ_UNIT})")
    if legend:
        ax.legend(ncols=2, loc="upper left")


def toxic_neuron_activations(
    axes: Sequence[Axes], t: Tables, *, legend: bool, activations_top: int
) -> None:
    """Fig. 4: the mean activation of the most toxic-aligned neurons (by cosine) before and
    after DPO; with GeLU-like activations many of them sit below zero."""
    n, ax = t["neurons"], axes[0]
    top = n.nsmallest(min(activations_top, len(n)), "rank_cos")
    x = np.arange(1, len(top) + 1)
    ax.vlines(x, top["mbar_base"], top["mbar_dpo"], color=OKABE_ITO["grey"], linewidth=0.8)
    ax.plot(x, top["mbar_base"], "o", markersize=3, color=MODEL_COLORS["base"], label="base")
    ax.plot(x, top["mbar_dpo"], "o", markersize=3, color=MODEL_COLORS["dpo"], label="DPO")
    zero_line(ax)
    neg = 100 * float((top["mbar_base"] < 0).mean())
    ax.set(
        xlabel="toxic-aligned neurons, ranked by cos(value vector, probe)",
        ylabel="mean activation m\n(over prompts and positions)",
        title=f"top {len(top)}; {neg:.0f}% negative before DPO",
    )
    if legend:
        ax.legend(loc="best")


def activation_shifts(axes: Sequence[Axes], t: Tables, *, legend: bool, shift_bins: int) -> None:
    """Appendix H: the distribution of every neuron's activation shift (DPO minus base): most
    are small, the tails are long (log-scaled counts)."""
    shift, ax = t["neurons"]["shift"].to_numpy(float), axes[0]
    ax.hist(shift, bins=shift_bins, color=OKABE_ITO["blue"], log=True)
    lo, hi = np.percentile(shift, [1, 99])
    for v, style in ((lo, ":"), (hi, ":"), (shift.mean(), "-")):
        ax.axvline(v, color=OKABE_ITO["vermillion"], linestyle=style, linewidth=1)
    ax.set(
        xlabel="activation shift, mean written m after DPO - before (activation units)",
        ylabel="neurons (log scale)",
        title=f"mean {shift.mean():.2g}, sd {shift.std():.2g}, 1-99%: [{lo:.2g}, {hi:.2g}]",
    )


def layer_opposing_effects(axes: Sequence[Axes], t: Tables, *, legend: bool) -> None:
    """Appendix I: per layer, the reduction by the neurons whose projection fell and the
    increase by those whose projection rose, and the net that DPO leaves."""
    df, ax = t["layers"], axes[0]
    ax.bar(
        df["layer"],
        df["reduction_by_reducing"],
        color=OKABE_ITO["blue"],
        width=0.85,
        label="neurons whose projection fell",
    )
    ax.bar(
        df["layer"],
        -df["increase_by_increasing"],
        color=OKABE_ITO["vermillion"],
        width=0.85,
        label="neurons whose projection rose",
    )
    ax.plot(df["layer"], df["reduction"], "o-", color="black", markersize=3, label="net")
    zero_line(ax)
    ax.set(xlabel="MLP layer", ylabel=f"reduction of the projection\n({PROJ_UNIT})")
    if legend:
        ax.legend(loc="upper left")
