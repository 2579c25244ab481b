"""Every figure drawn from the tables that the package computes for tiny random-weight models
(value vectors of two families, random mean activations, hand-made evaluation summaries): the
images and their sizes, a row of panels per model, and the errors that name the rule to rerun.
The workflow's figure rules and the report are tested on the embedded model in test_workflow."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_tables import write_eval
from tiny_models import D_MLP, D_MODEL, N_LAYERS, dpo_like, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.outputs.figures import FigureError, render_figure
from dpotox.outputs.figures.style import (
    GROUP_COLORS,
    GROUP_LABELS,
    GROUPS,
    OKABE_ITO,
    figure_pixels,
)
from dpotox.outputs.methods import write_methods_tables
from dpotox.outputs.neuron_stats import write_stats
from dpotox.outputs.tables import build_tables
from dpotox.plan.alignment import alignment_runs
from dpotox.plan.outputs import FIGURES, TABLE_SOURCES, figure_files, figure_inputs
from dpotox.stages.neurons import layer_frame, neuron_frame, value_geometry

MODELS = {"tiny-gpt2": "gpt2", "tiny-gemma2": "gemma2"}
CONDITIONS = [
    "base",
    "dpo",
    "steer-probe-a8",
    "edit-probe-cos-b0.5-a0.2",
    "edit-probe-act-b0.5-a0.2",
    "edit-free-cos-b0.8-a0.1",
]
CFG = {"figures": {"dpi": 60, "arrows_top": 50, "activations_top": 20, "shift_bins": 10}}


def _write_model_tables(model: str, family: str, seed: int) -> None:
    """What rules neuron_table, neuron_stats and tables write for one model, under ./results."""
    base = tiny_model(family, seed=seed)
    dpo = dpo_like(base, seed=seed + 1)
    w = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))
    gb, gd = value_geometry(Adapter(base), w), value_geometry(Adapter(dpo), w)
    rng = np.random.default_rng(seed)
    mbar_base = rng.normal(0, 1, (N_LAYERS, D_MLP))
    neurons = neuron_frame(
        gb,
        gd,
        np.ones((N_LAYERS, D_MLP)),
        mbar_base,
        mbar_base + rng.normal(0, 0.2, (N_LAYERS, D_MLP)),
    )
    root = f"results/{model}"
    Path(root).mkdir(parents=True)
    neurons.to_parquet(f"{root}/neurons.parquet")
    layer_frame(gb, gd, neurons).to_parquet(f"{root}/layers.parquet")
    pd.DataFrame(
        [
            {
                "kind": "toxic",
                "rank": 1,
                "layer": 0,
                "neuron": 0,
                "cos": 0.5,
                "negated": False,
                "top_tokens": ["a"],
            }
        ]
    ).to_parquet(f"{root}/tokens.parquet")
    write_stats(
        neurons_path=f"{root}/neurons.parquet",
        layers_path=f"{root}/layers.parquet",
        tokens_path=f"{root}/tokens.parquet",
        ablated_acts=None,
        cfg={"neurons": {"rank_top": D_MLP, "rank_bin": 16}},
        out_dir=f"results/tables/{model}",
        model=model,
    )
    eval_dir = Path(root) / "eval"
    eval_dir.mkdir()
    for c in CONDITIONS:
        write_eval(
            eval_dir,
            c,
            rng.uniform(0, 1, 8),
            log_ppl=float(rng.uniform(2, 4)),
            f1=float(rng.uniform(0.1, 0.3)),
        )
    build_tables(
        eval_dir, CONDITIONS, model, f"results/tables/{model}", n_neurons_total=N_LAYERS * D_MLP
    )
    # A second alignment method, for the methods' figures: its own neuron table and evaluation.
    runs = alignment_runs({"alignment": {"methods": {"dpo": {}, "kto": {"trainer": "kto"}}}})
    other = neurons.assign(delta=neurons["delta"] * rng.uniform(0, 2, len(neurons)))
    Path(f"{root}/align/kto").mkdir(parents=True)
    other.to_parquet(f"{root}/align/kto/neurons.parquet")
    write_eval(eval_dir, "align-kto", rng.uniform(0, 1, 8), log_ppl=3.1, f1=0.2)
    models = {"dpo": Path(f"{root}/dpo/model"), "align-kto": Path(f"{root}/align/kto/model")}
    patch_dirs = {"dpo": eval_dir, "align-kto": Path(f"{root}/align/kto/eval")}
    patch_dirs["align-kto"].mkdir()
    for d in patch_dirs.values():
        write_eval(d, "patch-four-groups", rng.uniform(0, 1, 8))
    for m in models.values():
        m.mkdir(parents=True)
        (m / "source.json").write_text('{"dpo": {"settings": {}, "steps": 4}}')
    write_methods_tables(
        runs,
        eval_dir,
        {"dpo": f"{root}/neurons.parquet", "align-kto": f"{root}/align/kto/neurons.parquet"},
        models,
        f"results/tables/{model}",
        patches=["patch-four-groups"],
        patch_dirs=patch_dirs,
        bootstrap_samples=50,
    )


@pytest.fixture(scope="module")
def tables_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for seed, (model, family) in enumerate(MODELS.items()):
            _write_model_tables(model, family, seed)
    return root


def _check_image(png, pdf, size):
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == size
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # drawn on, not a blank canvas
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_for_one_model_and_for_all(name, tables_dir, monkeypatch):
    monkeypatch.chdir(tables_dir)
    out = tables_dir / "results" / "figures"
    n_cols = FIGURES[name].n_cols
    for scope, models in (("tiny-gpt2", ["tiny-gpt2"]), ("all-models", list(MODELS))):
        png, pdf = out / scope / f"{name}.png", out / scope / f"{name}.pdf"
        size = render_figure(name, {m: figure_inputs(name, m) for m in models}, png, pdf, CFG)
        assert size == figure_pixels(len(models), n_cols, 60)
        _check_image(png, pdf, size)
        assert {f"{scope}/{name}.png", f"{scope}/{name}.pdf"} <= {
            f.removeprefix("results/figures/")
            for f in figure_files("results/figures", scope, methods=True)
        }


def test_editing_grid_table_parses_method_beta_alpha(tables_dir):
    grid = pd.read_csv(tables_dir / "results/tables/tiny-gpt2/table_editing_grid.csv")
    rows = grid.set_index("condition")
    assert rows.loc["edit-free-cos-b0.8-a0.1", ["method", "beta", "alpha"]].tolist() == [
        "edit-free-cos",
        0.8,
        0.1,
    ]
    assert rows.loc["edit-probe-act-b0.5-a0.2", "method"] == "edit-probe-act"
    assert rows.loc["steer-probe-a8", "method"] == "steering"
    assert rows.loc["steer-probe-a8", "alpha"] == 8 and np.isnan(rows.loc["steer-probe-a8", "beta"])
    assert grid["method"].iloc[:2].tolist() == ["base", "dpo"]


def test_missing_table_names_the_rule_and_writes_nothing(tables_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tables_dir)
    png, pdf = tmp_path / "f.png", tmp_path / "f.pdf"
    paths = figure_inputs("fig3_layer_group_reduction", "tiny-gpt2")
    paths["fig3_layer_group_reduction"] = str(tmp_path / "nowhere.csv")
    with pytest.raises(FigureError, match="run rule neuron_stats"):
        render_figure("fig3_layer_group_reduction", {"tiny-gpt2": paths}, png, pdf, CFG)
    assert not png.exists() and not pdf.exists()


def test_stale_table_names_the_column_and_the_rerun(tables_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tables_dir)
    grid = pd.read_csv("results/tables/tiny-gpt2/table_editing_grid.csv").drop(columns="method")
    grid.to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(FigureError, match=r"lacks column\(s\) method.*--forcerun tables"):
        render_figure(
            "editing_tradeoff",
            {"m": {"table_editing_grid": tmp_path / "old.csv"}},
            tmp_path / "f.png",
            tmp_path / "f.pdf",
            CFG,
        )
    assert not list(tmp_path.glob("f.*"))


def test_unknown_figure_is_named():
    with pytest.raises(FigureError, match="unknown figure 'fig9'.*fig1a_layer_projections"):
        render_figure("fig9", {"m": {}}, "x.png", "x.pdf")


def test_registry_reads_only_tables_of_earlier_stages():
    for spec in FIGURES.values():
        assert spec.tables and set(spec.tables) <= set(TABLE_SOURCES)
        for path, rule in (TABLE_SOURCES[t] for t in spec.tables):
            assert path.endswith((".csv", ".parquet")) and rule in (
                "neuron_table",
                "neuron_stats",
                "tables",
                "methods_tables",
            )


def test_group_styling_is_colour_blind_safe_and_named_as_in_the_papers():
    assert set(GROUP_COLORS.values()) <= set(OKABE_ITO.values())
    assert len({GROUP_COLORS[g] for g in GROUPS}) == 4
    assert [GROUP_LABELS[g] for g in GROUPS] == ["TP$_-$", "TN$_+$", "AP$_+$", "AN$_-$"]
