"""The alignment methods side by side (dpotox.outputs.methods) on hand-made evaluations, neuron
tables and training records: the row per run, the seed spread and the groups' stability, the
per-layer table, and the figures drawn from them."""

import json

import numpy as np
import pandas as pd
import pytest
from test_tables import write_eval

from dpotox.errors import TablesError
from dpotox.outputs.figures import render_figure
from dpotox.outputs.methods import (
    layer_reduction,
    methods_table,
    seed_spread,
    write_methods_tables,
)
from dpotox.plan.alignment import alignment_runs
from dpotox.plan.outputs import METHOD_TABLES

CFG = {
    "seed": 0,
    "alignment": {
        "methods": {"dpo": {}, "kto": {"trainer": "kto"}},
        "seeds": {"dpo": [1, 2]},
    },
}
RUNS = alignment_runs(CFG)  # dpo, align-dpo-seed1, align-dpo-seed2, align-kto


def neurons(groups, deltas, layers=None):
    """A neuron table: one neuron per entry, two layers."""
    n = len(groups)
    return pd.DataFrame(
        {
            "layer": layers if layers is not None else [i % 2 for i in range(n)],
            "neuron": list(range(n)),
            "cos": np.linspace(-1, 1, n),
            "delta": np.asarray(deltas, float),
            "group": groups,
        }
    )


# Neuron tables of the four runs: 8 neurons. dpo and seed1 agree on every group; seed2 moves
# two neurons; kto reduces with few neurons.
TABLES = {
    "dpo": neurons(
        ["TP", "TP", "TN", "AP", "AN", "AN", "increased", "increased"],
        [3, 1, 1, 1, 2, 2, -1, -1],
    ),
    "align-dpo-seed1": neurons(
        ["TP", "TP", "TN", "AP", "AN", "AN", "increased", "increased"],
        [2, 2, 1, 1, 2, 2, -1, -1],
    ),
    "align-dpo-seed2": neurons(
        ["TP", "increased", "TN", "AP", "AN", "increased", "TP", "increased"],
        [3, -1, 1, 1, 2, -2, 1, -1],
    ),
    "align-kto": neurons(
        ["TP", "increased", "increased", "increased", "AN", "increased", "increased", "increased"],
        [5, -1, -1, -1, 5, -1, -1, -1],
    ),
}
SCORES = {
    "base": [0.5, 0.6, 0.4, 0.5, 0.7, 0.3, 0.5, 0.5],
    "dpo": [0.1] * 8,
    "align-dpo-seed1": [0.2] * 8,
    "align-dpo-seed2": [0.3] * 8,
    "align-kto": [0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1, 0.2],
}


@pytest.fixture
def inputs(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    for run, scores in SCORES.items():
        write_eval(ev, run, scores, pairs_toxicity=float(np.mean(scores)) + 0.01)
    paths, models, patch_dirs = {}, {}, {"dpo": ev}
    for i, (run, table) in enumerate(TABLES.items()):
        paths[run] = tmp_path / run / "neurons.parquet"
        paths[run].parent.mkdir()
        table.to_parquet(paths[run])
        models[run] = tmp_path / run / "model"
        models[run].mkdir()
        settings = {"loss_type": "kto" if run == "align-kto" else "sigmoid", "beta": 0.1}
        (models[run] / "source.json").write_text(
            json.dumps({"dpo": {"settings": settings, "steps": 10 + i, "best_step": 9}})
        )
        if run != "dpo":
            patch_dirs[run] = tmp_path / run / "eval"
            patch_dirs[run].mkdir()
        # Patching recovers half of each run's reduction (base 0.5 on average); toxic-256 none.
        run_scores = np.asarray(SCORES[run])
        base = np.asarray(SCORES["base"])
        write_eval(patch_dirs[run], "patch-four-groups", (base + run_scores) / 2)
        write_eval(patch_dirs[run], "patch-toxic-256", base)
    return ev, paths, models, patch_dirs


PATCHES = ["patch-toxic-256", "patch-four-groups"]


def test_a_row_per_run_with_its_neurons_and_the_paired_difference_to_dpo(inputs):
    ev, paths, models, patch_dirs = inputs
    t = methods_table(
        RUNS, ev, paths, models, patches=PATCHES, patch_dirs=patch_dirs, bootstrap_samples=200
    ).set_index("run")
    assert list(t.index) == ["base", "dpo", "align-dpo-seed1", "align-dpo-seed2", "align-kto"]
    assert t.at["align-kto", "trainer"] == "kto" and t.at["align-kto", "loss_type"] == "kto"
    assert t.at["align-dpo-seed2", "seed"] == 2 and t.at["align-kto", "steps"] == 13
    assert t.at["dpo", "toxicity"] == pytest.approx(0.1)
    assert t.at["align-dpo-seed2", "minus_dpo"] == pytest.approx(0.2)
    assert t.at["align-dpo-seed2", "minus_dpo_low"] == pytest.approx(0.2)  # constant scores
    assert t.at["align-kto", "minus_dpo_low"] < 0.05 < t.at["align-kto", "minus_dpo_high"]
    # dpo: 6 of 8 neurons reduce; TP's share of the reduction 4/10.
    assert t.at["dpo", "pct_reducing"] == pytest.approx(75)
    assert t.at["dpo", "share_TP"] == pytest.approx(40) and t.at["dpo", "share_AN"] == 40
    assert t.at["align-kto", "pct_reducing"] == 25 and t.at["align-kto", "share_TN"] == 0
    assert t.at["align-kto", "net_reduction"] == pytest.approx(4)
    assert np.isnan(t.at["base", "pct_reducing"]) and t.at["base", "toxicity"] == 0.5
    # What patching to each run's own means recovers of that run's reduction.
    for run in ("dpo", "align-dpo-seed2", "align-kto"):
        assert t.at[run, "patch-four-groups_recovered"] == pytest.approx(50)
        assert t.at[run, "patch-toxic-256_recovered"] == pytest.approx(0)
        assert t.at[run, "patch-toxic-256_toxicity"] == pytest.approx(0.5)
    assert t.at["align-kto", "patch-four-groups_toxicity"] == pytest.approx(0.325)
    assert t.at["dpo", "patch-four-groups_recovered_low"] == pytest.approx(50)  # exact halves


def test_seed_spread_and_group_stability_across_seeds(inputs):
    ev, paths, models, patch_dirs = inputs
    table = methods_table(
        RUNS, ev, paths, models, patches=PATCHES, patch_dirs=patch_dirs, bootstrap_samples=200
    )
    spread = seed_spread(table, RUNS, paths).set_index("statistic")
    assert set(spread["method"]) == {"dpo"}  # kto has one seed
    tox = spread.loc["toxicity"]
    assert (tox["n"], tox["mean"], tox["min"], tox["max"]) == (3, pytest.approx(0.2), 0.1, 0.3)
    assert tox["sd"] == pytest.approx(0.1)
    four = spread.loc["patch-four-groups_toxicity"]
    assert (four["min"], four["max"]) == (pytest.approx(0.3), pytest.approx(0.4))
    assert spread.loc["patch-four-groups_recovered", "sd"] == pytest.approx(0, abs=1e-9)
    # TP: {0,1} in dpo and seed1, {0,6} in seed2: Jaccard 1, 1/3, 1/3 over the three pairs.
    tp = spread.loc["jaccard_TP"]
    assert (tp["n"], tp["over"]) == (3, "seed pairs")
    assert tp["mean"] == pytest.approx(5 / 9) and tp["min"] == pytest.approx(1 / 3)
    assert spread.loc["jaccard_TN", "mean"] == 1.0
    r = spread.loc["delta_r"]
    d = {k: v["delta"].to_numpy() for k, v in TABLES.items()}
    want = [
        np.corrcoef(d[a], d[b])[0, 1]
        for a, b in [
            ("dpo", "align-dpo-seed1"),
            ("dpo", "align-dpo-seed2"),
            ("align-dpo-seed1", "align-dpo-seed2"),
        ]
    ]
    assert r["mean"] == pytest.approx(np.mean(want)) and r["max"] == pytest.approx(max(want))
    assert seed_spread(table, RUNS[:1] + RUNS[3:], paths).empty


def test_layers_tables_figures_and_errors(inputs, tmp_path):
    ev, paths, models, patch_dirs = inputs
    layers = layer_reduction(paths)
    dpo = layers[layers["run"] == "dpo"].set_index("layer")
    assert dpo.at[0, "TP"] == 3 and dpo.at[1, "TP"] == 1 and dpo.at[0, "increased"] == -1
    assert dpo["net"].sum() == pytest.approx(TABLES["dpo"]["delta"].sum())
    out = tmp_path / "tables"
    write_methods_tables(
        RUNS, ev, paths, models, out, model="m", patches=PATCHES, patch_dirs=patch_dirs,
        bootstrap_samples=100,
    )  # fmt: skip
    assert "patch-four-groups_recovered" in pd.read_csv(out / "table_methods.csv")
    for name, title in METHOD_TABLES.items():
        assert (out / f"{name}.csv").is_file()
        assert (out / f"{name}.md").is_file() == bool(title)
    assert "table_methods (m)" in (out / "table_methods.md").read_text()
    for fig in ("methods_comparison", "methods_layer_groups"):
        tables = {
            "table_methods": out / "table_methods.csv",
            "table_methods_layers": out / "table_methods_layers.csv",
        }
        w, h = render_figure(
            fig, {"m": tables}, tmp_path / f"{fig}.png", tmp_path / f"{fig}.pdf", {"figures": {}}
        )
        assert (tmp_path / f"{fig}.png").stat().st_size > 10_000 and w > h
    paths = {**paths, "align-kto": tmp_path / "nowhere.parquet"}
    with pytest.raises(TablesError, match="nowhere.parquet does not exist"):
        methods_table(RUNS, ev, paths, models)
    with pytest.raises(TablesError, match="patch-four-groups.parquet does not exist"):
        methods_table(RUNS[:1], ev, paths, models, patches=["patch-four-groups"], patch_dirs={
            "dpo": tmp_path})  # fmt: skip
    (models["dpo"] / "source.json").write_text("{}")
    with pytest.raises(TablesError, match="no training record"):
        methods_table(RUNS[:1], ev, paths, models)
