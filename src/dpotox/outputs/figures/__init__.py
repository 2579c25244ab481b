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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from dpotox.errors import DpotoxError
from dpotox.plan.config import section_settings
from dpotox.plan.outputs import FIGURES, TABLE_SOURCES


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


def load_tables(name: str, paths: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Read the tables of figure ``name`` (table name -> path), only the columns it draws,
    checked so that a stale or missing table names the rule that rebuilds it."""
    out = {}
    for table, columns in FIGURES[name].tables.items():
        path, rule = Path(paths[table]), TABLE_SOURCES[table][1]
        if not path.is_file():
            raise FigureError(
                f"figure {name}: {path} does not exist; run rule {rule} first (snakemake {path})"
            )
        if path.suffix == ".parquet":  # the schema first, then only the columns drawn
            have = set(pq.read_schema(path).names)
            df = None
        else:
            # Every column of a CSV: some figures read a column the table names by its
            # settings (fig1a's ablated_top{n}).
            df = pd.read_csv(path)
            have = set(df.columns)
        if missing := [c for c in columns if c not in have]:
            raise FigureError(
                f"figure {name}: {path} lacks column(s) {', '.join(missing)}; it "
                f"was written by an older dpotox: rerun rule {rule} "
                f"(snakemake {path} --forcerun {rule})"
            )
        if df is None:
            df = pd.read_parquet(path, columns=list(columns))
        if df.empty:
            raise FigureError(f"figure {name}: {path} has no rows; rerun rule {rule}")
        out[table] = df
    return out


def render_figure(
    name: str,
    tables: Mapping[str, Mapping[str, str | Path]],
    png: str | Path,
    pdf: str | Path,
    cfg: Mapping[str, Any] | None = None,
) -> tuple[int, int]:
    """Draw figure ``name`` with a row of panels per model (``tables``: model -> table name
    -> path, in row order) and write it as PNG and PDF. Returns the PNG's size in pixels."""
    from dpotox.outputs.figures import style

    if name not in FIGURES:
        raise FigureError(f"unknown figure {name!r}; the figures are {', '.join(FIGURES)}")
    if not tables:
        raise FigureError(f"figure {name}: no model to draw")
    spec, fc = FIGURES[name], FiguresConfig.from_config(cfg or {})
    data = {model: load_tables(name, paths) for model, paths in tables.items()}
    module, func = spec.draw.split(":")
    draw = getattr(importlib.import_module(f"dpotox.outputs.figures.{module}"), func)
    options = {k: getattr(fc, k) for k in spec.options}
    with style.panels(len(data), spec.n_cols, f"{spec.title}\n{spec.paper}") as (fig, axes):
        for row, (model, d) in enumerate(data.items()):
            draw(axes[row], d, legend=row == 0, **options)
            for ax in axes[row]:
                ax.set_title(f"{model}: {ax.get_title()}" if ax.get_title() else model)
        style.save(fig, png, pdf, dpi=fc.dpi)
    return style.figure_pixels(len(data), spec.n_cols, fc.dpi)
