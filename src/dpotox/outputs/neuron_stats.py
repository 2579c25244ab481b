"""The papers' statistics of the neuron table, as tables (CSV, and markdown for the small ones).

Tables are numbered as in Yang et al. 2025, figures as in Yang et al. 2024 workshop
(docs/papers.md); each function says which. Every table is computed from
``neurons.parquet`` and ``layers.parquet`` (rule ``neuron_table``) and, for Fig. 1a, the
activation cache of the base model with the top toxic neurons ablated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dpotox.errors import NeuronsError
from dpotox.io import atomic_path
from dpotox.outputs.claims import shift_cos_r
from dpotox.plan.conditions import GROUPS, INCREASED, Ablation
from dpotox.plan.outputs import NEURON_STATS

log = logging.getLogger("dpotox")


def group_shares(neurons: pd.DataFrame) -> pd.DataFrame:
    """Table 5 and Fig. 2a: each group's share of the neurons that reduced their projection,
    and of the total reduction (the sum of the positive ``delta``); then the neurons that
    increased it, and all neurons (the net reduction)."""
    reducing = neurons["delta"] > 0
    total = neurons.loc[reducing, "delta"].sum()
    rows = []
    for g in (*GROUPS, INCREASED):
        sel = neurons["group"] == g
        rows.append((g, int(sel.sum()), neurons.loc[sel, "delta"].sum()))
    rows.insert(4, ("reducing", int(reducing.sum()), total))
    rows.append(("all", len(neurons), neurons["delta"].sum()))
    df = pd.DataFrame(rows, columns=["group", "n_neurons", "reduction"])
    n_reducing = max(int(reducing.sum()), 1)
    df.insert(
        2,
        "pct_of_reducing_neurons",
        np.where(
            df["group"].isin([*GROUPS, "reducing"]), 100 * df["n_neurons"] / n_reducing, np.nan
        ),
    )
    df.insert(3, "pct_of_all_neurons", 100 * df["n_neurons"] / len(neurons))
    df["pct_of_reduction"] = 100 * df["reduction"] / total if total > 0 else np.nan
    return df


def activation_signs(neurons: pd.DataFrame) -> pd.DataFrame:
    """Table 13: the share of neurons with a negative (and non-negative) mean activation."""
    rows = []
    for variant in ("base", "dpo"):
        neg = neurons[f"mbar_{variant}"] < 0
        rows.append((variant, int(neg.sum()), 100 * neg.mean(), 100 * (1 - neg.mean())))
    return pd.DataFrame(rows, columns=["model", "n_negative", "pct_negative", "pct_positive"])


def projection_change(neurons: pd.DataFrame) -> pd.DataFrame:
    """Table 18: the share of neurons whose projection fell (``delta > 0``) or rose; with Fig.
    1b's headline numbers: the reduction by the reducing neurons (the peak of the cumulative
    curve), the increase by the others, and the net reduction."""
    red = neurons["delta"] > 0
    return pd.DataFrame(
        [
            {
                "n_reduce": int(red.sum()),
                "n_increase": int((~red).sum()),
                "pct_reduce": 100 * red.mean(),
                "pct_increase": 100 * (~red).mean(),
                "reduction_by_reducing": neurons.loc[red, "delta"].sum(),
                "increase_by_increasing": -neurons.loc[~red, "delta"].sum(),
                "net_reduction": neurons["delta"].sum(),
            }
        ]
    )


def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value (t-test with n - 2 degrees of freedom)."""
    from scipy import stats

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan, math.nan
    res = stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def shift_correlations(neurons: pd.DataFrame) -> pd.DataFrame:
    """Table 17: Pearson correlation of the activation shift (``wbar_dpo - wbar_base``, the
    written means: ``mbar`` but through a post-MLP norm under the exact decomposition) with
    the probe alignment (``cos``) and with the base activation, over all neurons."""
    rows = []
    for name, col in (
        ("probe alignment (cos)", "cos"),
        ("base activation (wbar_base)", "wbar_base"),
    ):
        r, p = pearson(neurons["shift"].to_numpy(), neurons[col].to_numpy())
        rows.append(("activation shift (wbar_dpo - wbar_base)", name, r, p, len(neurons)))
    return pd.DataFrame(rows, columns=["x", "y", "pearson_r", "p_value", "n"])


def layer_projections(
    layers: pd.DataFrame, neurons: pd.DataFrame, ablated_means: np.ndarray | None, ablate_top_n: int
) -> pd.DataFrame:
    """Fig. 1a: each layer's mean MLP output projected on the unit probe direction: base, DPO,
    and base with the top ``ablate_top_n`` toxic neurons ablated (from that cache's means)."""
    df = layers[["layer", "mlp_proj_base", "mlp_proj_dpo"]].rename(
        columns={"mlp_proj_base": "base", "mlp_proj_dpo": "dpo"}
    )
    if ablated_means is not None:
        n_layers = len(layers)
        if ablated_means.shape != (n_layers, len(neurons) // n_layers):
            raise NeuronsError(
                f"the ablation cache holds {ablated_means.shape} means, the "
                f"neuron table {n_layers} layers x {len(neurons) // n_layers}"
            )
        proj = (ablated_means * neurons["along_base"].to_numpy().reshape(n_layers, -1)).sum(axis=1)
        df[f"ablated_top{ablate_top_n}"] = proj + layers["bias_along_base"].to_numpy()
    return df


def decomposition_comparison(decomp: pd.DataFrame, top: int) -> pd.DataFrame:
    """The naive decomposition (down_proj columns, as the papers) against the exact one (what
    the layer writes through a post-MLP norm), from ``decomposition.parquet``
    (:func:`dpotox.stages.neurons.decomposition_frame`): each group's neurons and share of the
    total reduction, the share of neurons that reduce their projection (table_claims' C3), the
    correlation of the activation shift with the cosine (C7), and how many of the ``top`` most
    toxic-aligned neurons (by cosine) and of the ``top`` largest reductions the two have in
    common. For a family without a post-MLP norm the two columns are equal."""
    rows: list[tuple[str, float, float]] = []
    n = len(decomp)
    shares = {}
    for d in ("naive", "exact"):
        delta, group = decomp[f"delta_{d}"], decomp[f"group_{d}"]
        total = delta[delta > 0].sum()
        shares[d] = {
            "neurons reducing their projection (%)": 100 * float((delta > 0).mean()),
            **{
                f"{g}: neurons (% of all)": 100 * float((group == g).sum()) / n
                for g in (*GROUPS, INCREASED)
            },
            **{
                f"{g}: share of the reduction (%)": (
                    100 * float(delta[group == g].sum()) / total if total > 0 else np.nan
                )
                for g in GROUPS
            },
            f"top-{top} toxic-aligned: share of the reduction (%)": (
                100 * float(delta[decomp[f"rank_cos_{d}"] <= top].sum()) / total
                if total > 0
                else np.nan
            ),
        }
        # table_claims' C7 under each decomposition (written by older dpotox: no shift).
        if f"shift_{d}" in decomp:
            shares[d]["C7: Pearson r of the activation shift with cos"] = shift_cos_r(
                decomp[f"shift_{d}"], decomp[f"cos_{d}"]
            )
    for q in shares["naive"]:
        rows.append((q, shares["naive"][q], shares["exact"][q]))

    def overlap(col: str) -> float:
        a = set(np.flatnonzero(decomp[f"{col}_naive"].to_numpy() <= top))
        b = set(np.flatnonzero(decomp[f"{col}_exact"].to_numpy() <= top))
        return 100 * len(a & b) / max(min(len(a), len(b)), 1)

    same = 100 * float((decomp["group_naive"] == decomp["group_exact"]).mean())
    for q, v in (
        (f"top-{top} toxic-aligned (by cosine) in both (%)", overlap("rank_cos")),
        (f"top-{top} largest reductions in both (%)", overlap("rank_delta")),
        ("neurons in the same group (%)", same),
        (
            "Spearman correlation of the cosines",
            float(decomp["cos_naive"].rank().corr(decomp["cos_exact"].rank())),
        ),
    ):
        rows.append((q, v, v))
    return pd.DataFrame(rows, columns=["quantity", "naive", "exact"])


def cumulative_reduction(neurons: pd.DataFrame) -> pd.DataFrame:
    """Fig. 1b: neurons from the largest reduction to the largest increase, and the running sum."""
    df = neurons.sort_values("rank_delta")[["rank_delta", "layer", "neuron", "group", "delta"]]
    df = df.rename(columns={"rank_delta": "rank"}).reset_index(drop=True)
    df["cumulative_reduction"] = df["delta"].cumsum()
    return df


def group_shares_by_rank(neurons: pd.DataFrame, top: int, bin_size: int) -> pd.DataFrame:
    """Fig. 2b: among the ``top`` neurons with the largest reduction, in bins of ``bin_size``
    ranks, each group's count, share of the bin, and reduction."""
    df = neurons[(neurons["rank_delta"] <= top) & (neurons["delta"] > 0)].copy()
    df["bin_start"] = (df["rank_delta"] - 1) // bin_size * bin_size + 1
    out = (
        df.groupby(["bin_start", "group"])
        .agg(n_neurons=("delta", "size"), reduction=("delta", "sum"))
        .reindex(
            pd.MultiIndex.from_product(
                [sorted(df["bin_start"].unique()), GROUPS], names=["bin_start", "group"]
            ),
            fill_value=0,
        )
        .reset_index()
    )
    out.insert(1, "bin_end", out["bin_start"] + bin_size - 1)
    out["share"] = out["n_neurons"] / out.groupby("bin_start")["n_neurons"].transform("sum")
    return out


def layer_group_reduction(neurons: pd.DataFrame) -> pd.DataFrame:
    """Fig. 3: each layer's reduction by group (TP, TN, AP, AN), the increase by the others
    (negative), and the net (without the bias term, which ``layers.parquet`` holds)."""
    table = (
        neurons.pivot_table(index="layer", columns="group", values="delta", aggfunc="sum")
        .reindex(columns=[*GROUPS, INCREASED])
        .fillna(0.0)
    )
    table["net"] = table.sum(axis=1)
    return table.reset_index().rename_axis(columns=None)


def value_vector_tokens(tokens: pd.DataFrame) -> pd.DataFrame:
    """Tables 14 and 15: the logit-lens tokens as one string per vector."""
    df = tokens.copy()
    df["top_tokens"] = df["top_tokens"].map(lambda ts: ", ".join(repr(t)[1:-1] for t in ts))
    return df


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 4 significant digits, small ones in e-notation; a
    p-value of 0 is one below float64's range and shows as ``< 1e-300``)."""

    def cell(v: Any, column: str) -> str:
        if isinstance(v, float | np.floating):
            if math.isnan(v):
                return ""
            if v == 0 and column.startswith("p_value"):
                return "< 1e-300"
            return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = [
        "| " + " | ".join(cell(v, str(c)) for v, c in zip(row, df.columns)) + " |"
        for row in df.itertuples(index=False)
    ]
    return "\n".join([head, sep, *body]) + "\n"


def write_stats(
    *,
    neurons_path: str | Path,
    layers_path: str | Path,
    tokens_path: str | Path,
    ablated_acts: str | Path | None,
    cfg: Mapping[str, Any],
    out_dir: str | Path,
    model: str = "",
    decomposition_path: str | Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Rule ``neuron_stats``: compute every table of :data:`NEURON_STATS` and write it to
    ``out_dir``."""
    from dpotox.stages.activations import mean_activations, read_meta
    from dpotox.stages.neurons import NeuronsConfig

    nc = NeuronsConfig.from_config(cfg)
    neurons = pd.read_parquet(neurons_path)
    layers = pd.read_parquet(layers_path)
    ablated = None
    if ablated_acts is not None:
        meta = read_meta(ablated_acts)
        if meta.get("spec") != Ablation(nc.ablate_top_n).name:
            raise NeuronsError(
                f"{ablated_acts} was cached under spec {meta.get('spec')!r}, not "
                f"{Ablation(nc.ablate_top_n)} (neurons.ablate_top_n)"
            )
        normed = (pq.read_schema(neurons_path).metadata or {}).get(b"dpotox.post_mlp_norm")
        if normed not in (None, b"None") and not meta.get("written"):
            raise NeuronsError(
                f"{ablated_acts} has no written activations, which the neuron table's post-MLP "
                "norm needs: it was cached by an older dpotox; rerun rule cache_activations"
            )
        ablated = mean_activations(ablated_acts, written=nc.decomposition == "exact")
    tables = {
        "table5_group_shares": group_shares(neurons),
        "table13_activation_signs": activation_signs(neurons),
        "table17_shift_correlations": shift_correlations(neurons),
        "table18_projection_change": projection_change(neurons),
        "table14_15_value_vector_tokens": value_vector_tokens(pd.read_parquet(tokens_path)),
        "fig1a_layer_projections": layer_projections(layers, neurons, ablated, nc.ablate_top_n),
        "fig1b_cumulative_reduction": cumulative_reduction(neurons),
        "fig2b_group_shares_by_rank": group_shares_by_rank(neurons, nc.rank_top, nc.rank_bin),
        "fig3_layer_group_reduction": layer_group_reduction(neurons),
    }
    if decomposition_path is not None:
        tables["table_decomposition"] = decomposition_comparison(
            pd.read_parquet(decomposition_path), nc.compare_top
        )
    out_dir = Path(out_dir)
    for name, df in tables.items():
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        if NEURON_STATS[name]:
            title = f"# {name}" + (f" ({model})" if model else "")
            with atomic_path(out_dir / f"{name}.md") as tmp:
                tmp.write_text(f"{title}\n\n{to_markdown(df)}")
    return tables
