"""The papers' figures, drawn from the tables of earlier stages (never from models or caches).

Each figure is one entry of :data:`FIGURES`: the tables it reads, the paper figure it
redraws, and a draw function that fills one row of panels for one model. The same figure is
drawn for one model (``results/figures/{model}/``) or with a row per model
(``results/figures/all-models/``). Because a figure reads only CSV and Parquet tables, rule
``<figure name>`` redraws it in seconds, and ``snakemake <file> --forcerun <figure name>``
recomputes nothing upstream.

Figures are numbered as in Yang, Sondej, Mayne, Mahdi (2024), "Ablation is not enough to
emulate DPO" (Figs. 1-4), and Yang et al. (2025), "How does DPO reduce toxicity?" (appendix
figures); the editing trade-off is ours, from the numbers of their Tables 2 and 19.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from dpotox.config import section_settings
from dpotox.errors import DpotoxError

ALL_MODELS = "all-models"  # the folder of the figures with a row of panels per model


class FigureError(DpotoxError, ValueError):
    """A table a figure reads is missing or lacks a column; the message names the rule to rerun."""


@dataclass(frozen=True)
class FiguresConfig:
    """The ``figures`` section of the config (defaults and bounds: the schema)."""

    dpi: int = 150
    arrows_top: int = 500
    activations_top: int = 100
    shift_bins: int = 100

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FiguresConfig:
        return section_settings(cls, cfg, "figures")


# Every table a figure may read: its path and the rule that writes it.
TABLE_SOURCES: dict[str, tuple[str, str]] = {
    "neurons": ("results/{model}/neurons.parquet", "neuron_table"),
    "layers": ("results/{model}/layers.parquet", "neuron_table"),
    **{name: (f"results/tables/{{model}}/{name}.csv", "neuron_stats") for name in (
        "fig1a_layer_projections", "fig1b_cumulative_reduction", "table5_group_shares",
        "fig2b_group_shares_by_rank", "fig3_layer_group_reduction")},
    "table_editing_grid": ("results/tables/{model}/table_editing_grid.csv", "tables"),
}


@dataclass(frozen=True)
class FigureSpec:
    """One figure: what it shows, which paper figure it redraws, what it reads (table ->
    the columns it needs) and its draw function (``module:function`` in this package, imported
    when drawn, so that listing the figures does not load matplotlib)."""

    name: str
    title: str
    paper: str
    tables: Mapping[str, Sequence[str]]
    draw: str
    n_cols: int = 1
    options: Sequence[str] = field(default_factory=tuple)


_NEURON_COLS = ("layer", "neuron", "cos", "cos_dpo", "mbar_base", "mbar_dpo", "shift",
                "proj_base", "proj_dpo", "delta", "group", "rank_delta", "rank_cos")
FIGURES: dict[str, FigureSpec] = {f.name: f for f in (
    FigureSpec("fig1a_layer_projections", "MLP outputs projected on the toxicity probe",
               "Yang et al. 2024, Fig. 1a",
               {"fig1a_layer_projections": ("layer", "base", "dpo")}, "neurons:layer_projections"),
    FigureSpec("fig1b_cumulative_reduction", "Cumulative toxicity reduction by neuron rank",
               "Yang et al. 2024, Fig. 1b",
               {"fig1b_cumulative_reduction": ("rank", "cumulative_reduction")},
               "neurons:cumulative_reduction"),
    FigureSpec("fig2a_group_shares", "Share of the toxicity reduction by neuron group",
               "Yang et al. 2024, Fig. 2a (Yang et al. 2025, Fig. 6a)",
               {"table5_group_shares": ("group", "pct_of_reduction", "n_neurons")},
               "neurons:group_shares"),
    FigureSpec("fig2b_group_shares_by_rank", "Neuron groups along the reduction ranking",
               "Yang et al. 2024, Fig. 2b (Yang et al. 2025, Figs. 2b, 6b)",
               {"fig2b_group_shares_by_rank": ("bin_start", "bin_end", "group", "share")},
               "neurons:group_shares_by_rank"),
    FigureSpec("fig2c_projection_arrows", "Projection before and after DPO, top neurons",
               "Yang et al. 2024, Fig. 2c (Yang et al. 2025, Figs. 2c, 6c)",
               {"neurons": _NEURON_COLS}, "neurons:projection_arrows", options=("arrows_top",)),
    FigureSpec("fig3_layer_group_reduction", "Per-layer toxicity reduction by neuron group",
               "Yang et al. 2024, Fig. 3 (Yang et al. 2025, Fig. 8)",
               {"fig3_layer_group_reduction": ("layer", "TP", "TN", "AP", "AN", "net")},
               "neurons:layer_group_reduction"),
    FigureSpec("fig4_toxic_neuron_activations",
               "Mean activations of the most toxic-aligned neurons",
               "Yang et al. 2024, Fig. 4 (Yang et al. 2025, Fig. 3)",
               {"neurons": _NEURON_COLS}, "neurons:toxic_neuron_activations",
               options=("activations_top",)),
    FigureSpec("appH_activation_shifts", "Distribution of DPO's activation shifts",
               "Yang et al. 2025, Appendix H, Fig. 4",
               {"neurons": _NEURON_COLS}, "neurons:activation_shifts", options=("shift_bins",)),
    FigureSpec("appI_layer_opposing_effects", "Opposing neuron effects per layer",
               "Yang et al. 2025, Appendix I, Fig. 5",
               {"layers": ("layer", "reduction", "reduction_by_reducing",
                           "increase_by_increasing")}, "neurons:layer_opposing_effects"),
    FigureSpec("editing_tradeoff", "Activation editing: toxicity against fluency",
               "ours, from Yang et al. 2025, Tables 2 and 19",
               {"table_editing_grid": ("condition", "method", "beta", "alpha", "toxicity",
                                       "ci_low", "ci_high", "log_ppl", "f1")},
               "editing:editing_tradeoff", n_cols=2),
)}


def figure_files(root: str, scope: str) -> list[str]:
    """Every file the figure rules write for ``scope`` (a model, or :data:`ALL_MODELS`)."""
    return [f"{root}/{scope}/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def figure_inputs(name: str, model: str) -> dict[str, str]:
    """The tables figure ``name`` reads for ``model``: table name -> path."""
    return {t: TABLE_SOURCES[t][0].format(model=model) for t in FIGURES[name].tables}


def load_tables(name: str, paths: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Read the tables of figure ``name`` (table name -> path), only the columns it draws,
    checked so that a stale or missing table names the rule that rebuilds it."""
    out = {}
    for table, columns in FIGURES[name].tables.items():
        path, rule = Path(paths[table]), TABLE_SOURCES[table][1]
        if not path.is_file():
            raise FigureError(f"figure {name}: {path} does not exist; run rule {rule} first "
                              f"(snakemake {path})")
        if path.suffix == ".parquet":  # the schema first, then only the columns drawn
            have = set(pq.read_schema(path).names)
            df = None
        else:
            # Every column of a CSV: some figures read a column the table names by its
            # settings (fig1a's ablated_top{n}).
            df = pd.read_csv(path)
            have = set(df.columns)
        if missing := [c for c in columns if c not in have]:
            raise FigureError(f"figure {name}: {path} lacks column(s) {', '.join(missing)}; it "
                              f"was written by an older dpotox: rerun rule {rule} "
                              f"(snakemake {path} --forcerun {rule})")
        if df is None:
            df = pd.read_parquet(path, columns=list(columns))
        if df.empty:
            raise FigureError(f"figure {name}: {path} has no rows; rerun rule {rule}")
        out[table] = df
    return out


def render_figure(name: str, tables: Mapping[str, Mapping[str, str | Path]], png: str | Path,
                  pdf: str | Path, cfg: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Draw figure ``name`` with a row of panels per model (``tables``: model -> table name
    -> path, in row order) and write it as PNG and PDF. Returns the PNG's size in pixels."""
    from dpotox.figures import style

    if name not in FIGURES:
        raise FigureError(f"unknown figure {name!r}; the figures are {', '.join(FIGURES)}")
    if not tables:
        raise FigureError(f"figure {name}: no model to draw")
    spec, fc = FIGURES[name], FiguresConfig.from_config(cfg or {})
    data = {model: load_tables(name, paths) for model, paths in tables.items()}
    module, func = spec.draw.split(":")
    draw = getattr(importlib.import_module(f"dpotox.figures.{module}"), func)
    options = {k: getattr(fc, k) for k in spec.options}
    with style.panels(len(data), spec.n_cols, f"{spec.title}\n{spec.paper}") as (fig, axes):
        for row, (model, d) in enumerate(data.items()):
            draw(axes[row], d, legend=row == 0, **options)
            for ax in axes[row]:
                ax.set_title(f"{model}: {ax.get_title()}" if ax.get_title() else model)
        style.save(fig, png, pdf, dpi=fc.dpi)
    return style.figure_pixels(len(data), spec.n_cols, fc.dpi)
