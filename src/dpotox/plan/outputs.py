"""Every output file the rules write, by name: what the Snakefile plans from, torch-free.

- :data:`NEURON_STATS`: the statistics tables of rule ``neuron_stats``;
- :data:`RESULT_TABLES`: the result tables of rule ``tables``;
- :data:`PROBE_TABLES`: the probe's tables of rule ``probe_checks``;
- :data:`FIGURES`: the figures, one rule each, with the tables each reads
  (:data:`TABLE_SOURCES`: the path of each table and the rule that writes it).

Figures are numbered as in Yang et al. 2024 workshop (Figs. 1-4) and Yang et al. 2025
(appendix figures); tables as in Yang et al. 2025 and Yang et al. 2024 workshop (Table 1). See
docs/papers.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# name -> also written as markdown (the figure data can be long: CSV only)
NEURON_STATS: dict[str, bool] = {
    "table5_group_shares": True,
    "table13_activation_signs": True,
    "table17_shift_correlations": True,
    "table18_projection_change": True,
    "table14_15_value_vector_tokens": True,
    "table_decomposition": True,
    "fig1a_layer_projections": False,
    "fig1b_cumulative_reduction": False,
    "fig2b_group_shares_by_rank": False,
    "fig3_layer_group_reduction": False,
}


def _csv_and_md(root: str, model: str, tables: Mapping[str, object]) -> list[str]:
    """``root/model/<name>.csv`` for every table, and ``.md`` beside it where its value is
    truthy (a flag or a title)."""
    out = []
    for name, md in tables.items():
        out.append(f"{root}/{model}/{name}.csv")
        if md:
            out.append(f"{root}/{model}/{name}.md")
    return out


def neuron_stats_files(root: str, model: str) -> list[str]:
    """Every file rule ``neuron_stats`` writes for ``model`` under ``root`` (results/tables)."""
    return _csv_and_md(root, model, NEURON_STATS)


# Rule tables: name -> title
RESULT_TABLES: dict[str, str] = {
    "table1_ablation": "Ablating and patching toxic neurons (Yang et al. 2024, Table 1)",
    "table2_interventions": "Steering, DPO, patching and editing (Yang et al. 2025, Table 2)",
    "table3_toxic_neurons": "Toxic neurons and the share of DPO's reduction that patching them "
    "recovers (Yang et al. 2025, Table 3)",
    "table12_steering": "Steering with the probe at each alpha (Yang et al. 2025, Table 12)",
    "table19_editing": "Editing variants, patching checks (Yang et al. 2025, Table 19)",
    "table_per_prompt": "Patching with each prompt's own DPO activations vs the DPO means",
    "table_editing_grid": "Activation editing over the beta x alpha grid, with the base model, "
    "DPO and steering as reference points",
    "table_claims": "The papers' findings, tested on this model",
}


def result_table_files(root: str, model: str) -> list[str]:
    """Every file rule ``tables`` writes for ``model`` under ``root``: CSV and markdown."""
    return [f"{root}/{model}/{name}.{ext}" for name in RESULT_TABLES for ext in ("csv", "md")]


# Rule probe_checks: name -> title (how far the probe direction can be trusted; docs/probe.md)
PROBE_TABLES: dict[str, str] = {
    "table_probe": "The probe: held-out quality, stability under refits, validity checks",
    "table_probe_learning_curve": "The probe's held-out quality against its training texts",
}


def probe_table_files(root: str, model: str) -> list[str]:
    """Every file rule ``probe_checks`` writes for ``model`` under ``root``: CSV and markdown."""
    return [f"{root}/{model}/{name}.{ext}" for name in PROBE_TABLES for ext in ("csv", "md")]


# Rule methods_tables (where alignment.methods or alignment.seeds ask for more than DPO):
# name -> title of its markdown twin, or None for CSV only (a figure's data).
METHOD_TABLES: dict[str, str | None] = {
    "table_methods": "Alignment methods side by side: toxicity, fluency, and how each moves the "
    "neurons",
    "table_method_seeds": "Spread across training seeds, and the stability of the neuron groups",
    "table_methods_layers": None,
}


def method_table_files(root: str, model: str) -> list[str]:
    """Every file rule ``methods_tables`` writes for ``model`` under ``root``."""
    return _csv_and_md(root, model, METHOD_TABLES)


ALL_MODELS = "all-models"  # the folder of the figures with a row of panels per model


# Every table a figure may read: its path and the rule that writes it.
TABLE_SOURCES: dict[str, tuple[str, str]] = {
    "neurons": ("results/{model}/neurons.parquet", "neuron_table"),
    "layers": ("results/{model}/layers.parquet", "neuron_table"),
    **{
        name: (f"results/tables/{{model}}/{name}.csv", "neuron_stats")
        for name in (
            "fig1a_layer_projections",
            "fig1b_cumulative_reduction",
            "table5_group_shares",
            "fig2b_group_shares_by_rank",
            "fig3_layer_group_reduction",
        )
    },
    "table_editing_grid": ("results/tables/{model}/table_editing_grid.csv", "tables"),
    **{
        name: (f"results/tables/{{model}}/{name}.csv", "methods_tables")
        for name in ("table_methods", "table_methods_layers")
    },
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
    #: Drawn only where the config trains more than DPO (alignment.methods, alignment.seeds).
    methods: bool = False


_NEURON_COLS = (
    "layer",
    "neuron",
    "cos",
    "cos_dpo",
    "mbar_base",
    "mbar_dpo",
    "shift",
    "proj_base",
    "proj_dpo",
    "delta",
    "group",
    "rank_delta",
    "rank_cos",
)
FIGURES: dict[str, FigureSpec] = {
    f.name: f
    for f in (
        FigureSpec(
            "fig1a_layer_projections",
            "MLP outputs projected on the toxicity probe",
            "Yang et al. 2024, Fig. 1a",
            {"fig1a_layer_projections": ("layer", "base", "dpo")},
            "neurons:layer_projections",
        ),
        FigureSpec(
            "fig1b_cumulative_reduction",
            "Cumulative toxicity reduction by neuron rank",
            "Yang et al. 2024, Fig. 1b",
            {"fig1b_cumulative_reduction": ("rank", "cumulative_reduction")},
            "neurons:cumulative_reduction",
        ),
        FigureSpec(
            "fig2a_group_shares",
            "Share of the toxicity reduction by neuron group",
            "Yang et al. 2024, Fig. 2a (Yang et al. 2025, Fig. 6a)",
            {"table5_group_shares": ("group", "pct_of_reduction", "n_neurons")},
            "neurons:group_shares",
        ),
        FigureSpec(
            "fig2b_group_shares_by_rank",
            "Neuron groups along the reduction ranking",
            "Yang et al. 2024, Fig. 2b (Yang et al. 2025, Figs. 2b, 6b)",
            {"fig2b_group_shares_by_rank": ("bin_start", "bin_end", "group", "share")},
            "neurons:group_shares_by_rank",
        ),
        FigureSpec(
            "fig2c_projection_arrows",
            "Projection before and after DPO, top neurons",
            "Yang et al. 2024, Fig. 2c (Yang et al. 2025, Figs. 2c, 6c)",
            {"neurons": _NEURON_COLS},
            "neurons:projection_arrows",
            options=("arrows_top",),
        ),
        FigureSpec(
            "fig3_layer_group_reduction",
            "Per-layer toxicity reduction by neuron group",
            "Yang et al. 2024, Fig. 3 (Yang et al. 2025, Fig. 8)",
            {"fig3_layer_group_reduction": ("layer", "TP", "TN", "AP", "AN", "net")},
            "neurons:layer_group_reduction",
        ),
        FigureSpec(
            "fig4_toxic_neuron_activations",
            "Mean activations of the most toxic-aligned neurons",
            "Yang et al. 2024, Fig. 4 (Yang et al. 2025, Fig. 3)",
            {"neurons": _NEURON_COLS},
            "neurons:toxic_neuron_activations",
            options=("activations_top",),
        ),
        FigureSpec(
            "appH_activation_shifts",
            "Distribution of DPO's activation shifts",
            "Yang et al. 2025, Appendix H, Fig. 4",
            {"neurons": _NEURON_COLS},
            "neurons:activation_shifts",
            options=("shift_bins",),
        ),
        FigureSpec(
            "appI_layer_opposing_effects",
            "Opposing neuron effects per layer",
            "Yang et al. 2025, Appendix I, Fig. 5",
            {"layers": ("layer", "reduction", "reduction_by_reducing", "increase_by_increasing")},
            "neurons:layer_opposing_effects",
        ),
        FigureSpec(
            "editing_tradeoff",
            "Activation editing: toxicity against fluency",
            "ours, from Yang et al. 2025, Tables 2 and 19",
            {
                "table_editing_grid": (
                    "condition",
                    "method",
                    "beta",
                    "alpha",
                    "toxicity",
                    "ci_low",
                    "ci_high",
                    "log_ppl",
                    "f1",
                )
            },
            "editing:editing_tradeoff",
            n_cols=2,
        ),
        FigureSpec(
            "methods_comparison",
            "Alignment methods: toxicity, the neurons that carry the reduction, and patching them",
            "ours (the papers' claims C2-C4, Tables 3 and 5, for each method)",
            {
                "table_methods": (
                    "run",
                    "toxicity",
                    "toxicity_ci_low",
                    "toxicity_ci_high",
                    "pct_reducing",
                    *(f"share_{g}" for g in ("TP", "TN", "AP", "AN")),
                )
            },
            "methods:methods_comparison",
            n_cols=4,
            methods=True,
        ),
        FigureSpec(
            "methods_layer_groups",
            "Per-layer toxicity reduction by neuron group, each alignment run",
            "ours (the papers' Fig. 3 for each method)",
            {"table_methods_layers": ("run", "layer", "TP", "TN", "AP", "AN")},
            "methods:layer_groups",
            n_cols=4,
            methods=True,
        ),
    )
}


def figure_files(root: str, scope: str, methods: bool = False) -> list[str]:
    """Every file the figure rules write for ``scope`` (a model, or :data:`ALL_MODELS`); the
    alignment-methods figures only if ``methods``."""
    return [
        f"{root}/{scope}/{name}.{ext}"
        for name, spec in FIGURES.items()
        if methods or not spec.methods
        for ext in ("png", "pdf")
    ]


def figure_inputs(name: str, model: str) -> dict[str, str]:
    """The tables figure ``name`` reads for ``model``: table name -> path."""
    return {t: TABLE_SOURCES[t][0].format(model=model) for t in FIGURES[name].tables}
