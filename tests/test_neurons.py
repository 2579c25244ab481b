"""The neuron table and its statistics: the projection identity for every family, the groups,
and the papers' tables computed from a table whose answers are known."""

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import D_MLP, D_MODEL, N_LAYERS, VOCAB, TokenIdTokenizer, dpo_like, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.errors import DpotoxError, NeuronsError
from dpotox.outputs.neuron_stats import (
    activation_signs,
    cumulative_reduction,
    decomposition_comparison,
    group_shares,
    group_shares_by_rank,
    layer_group_reduction,
    layer_projections,
    projection_change,
    shift_correlations,
    to_markdown,
    write_stats,
)
from dpotox.plan.conditions import GROUPS, INCREASED
from dpotox.plan.outputs import NEURON_STATS as TABLES
from dpotox.stages.activations import cache_generation, mean_activations, prompt_means
from dpotox.stages.neurons import (
    decomposition_frame,
    layer_frame,
    neuron_frame,
    refit,
    sign_groups,
    top_cosine_neurons,
    toxic_ablation,
    value_cosines,
    value_geometry,
)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, VOCAB - 1, (int(k),), generator=g).tolist()
        for k in torch.randint(2, 9, (n,), generator=g)
    ]


def _mlp_output_along(model, prompts, gens, u: torch.Tensor, *, written: bool) -> np.ndarray:
    """Per layer: the MLP block's output (``written``: what joins the residual stream, the
    post-MLP norm's output where there is one) projected on ``u``, averaged over the positions
    that produce each prompt's continuation, from unpadded teacher-forced passes (no dpotox
    code)."""
    adapter = Adapter(model)
    sums, n = np.zeros(adapter.n_layers), 0
    for prompt, new in zip(prompts, gens):
        seen = {}
        hooks = [
            (
                adapter.post_mlp_norm(layer)
                if written and adapter.post_mlp_norm(layer) is not None
                else adapter.mlp(layer)
            ).register_forward_hook(
                lambda mod, args, out, layer=layer: seen.__setitem__(layer, out[0].detach())
            )
            for layer in range(adapter.n_layers)
        ]
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt + new]))
        for h in hooks:
            h.remove()
        first = len(prompt) - 1
        for layer in range(adapter.n_layers):
            sums[layer] += float((seen[layer][first : first + len(new)].double() @ u).sum())
        n += len(new)
    return sums / n


@pytest.mark.parametrize("decomposition", ["exact", "naive"])
def test_projections_sum_to_the_mlp_output_along_the_probe(model, tmp_path, decomposition):
    """Per layer, sum_i mbar_i (v_i . u) + b . u equals the mean of what the layer adds to the
    residual stream projected on u (exact), or of the MLP output before a post-MLP norm
    (naive: down_proj's columns and the raw means, as the papers)."""
    written = decomposition == "exact"
    dpo = dpo_like(model)
    prompts, ids = _prompts(6), [f"p{i}" for i in range(6)]
    w = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(2))
    u = (w / w.norm()).double()
    gens = {}
    for name, m in (("base", model), ("dpo", dpo)):
        gen, _ = cache_generation(
            Adapter(m),
            TokenIdTokenizer(m),
            prompts,
            ids,
            tmp_path / name,
            new_tokens=5,
            batch_size=4,
        )
        gens[name] = gen.new_tokens
    g_base = value_geometry(Adapter(model), w, decomposition)
    g_dpo = value_geometry(Adapter(dpo), w, decomposition)
    neurons = neuron_frame(
        g_base,
        g_dpo,
        value_cosines(Adapter(model), Adapter(dpo), decomposition),
        mean_activations(tmp_path / "base"),
        mean_activations(tmp_path / "dpo"),
        mean_activations(tmp_path / "base", written=written),
        mean_activations(tmp_path / "dpo", written=written),
    )
    layers = layer_frame(g_base, g_dpo, neurons)
    for name, m in (("base", model), ("dpo", dpo)):
        expected = _mlp_output_along(m, prompts, gens[name], u, written=written)
        np.testing.assert_allclose(
            layers[f"mlp_proj_{name}"].to_numpy(), expected, rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(
        layers["reduction"], layers["mlp_proj_base"] - layers["mlp_proj_dpo"]
    )
    if model.config.model_type == "gpt2":
        assert (layers["bias_along_base"] != 0).all()  # the bias term really is exercised
    # The groups and "increased" partition all neurons; groups follow their definitions.
    assert len(neurons) == N_LAYERS * D_MLP
    assert set(neurons["group"]) <= {*GROUPS, INCREASED}
    red = neurons["delta"] > 0
    assert (neurons.loc[red, "group"] == neurons.loc[red, "edit_group"]).all()
    assert (neurons.loc[~red, "group"] == INCREASED).all()
    assert neurons.groupby("group").size().sum() == len(neurons)
    for g in GROUPS:
        sel = neurons[neurons["edit_group"] == g]
        assert ((sel["cos"] > 0) == g.startswith("T")).all()
        assert ((sel["wbar_base"] >= 0) == g.endswith("P")).all()
    assert sorted(neurons["rank_delta"]) == list(range(1, len(neurons) + 1))
    assert neurons.loc[neurons["rank_delta"] == 1, "delta"].item() == neurons["delta"].max()
    assert neurons.loc[neurons["rank_cos"] == 1, "cos"].item() == neurons["cos"].max()
    assert np.isclose(neurons["cos_base_dpo"], 1, atol=0.05).mean() > 0.9
    # Refitted on every prompt, the table is the same; on half of them, its means are those
    # prompts' position-weighted means and the rest follows from them.
    again = refit(neurons, tmp_path / "base", tmp_path / "dpo", ids, decomposition)
    pd.testing.assert_frame_equal(again, neurons, check_exact=False, rtol=1e-9, atol=1e-12)
    half = ids[:3]
    fitted = refit(neurons, tmp_path / "base", tmp_path / "dpo", half, decomposition)
    for side in ("base", "dpo"):
        got_ids, means, counts = prompt_means(tmp_path / side, 1, written=written)
        keep = np.isin(got_ids, half)
        want = counts[keep] @ means[keep] / counts[keep].sum()
        np.testing.assert_allclose(fitted.loc[fitted["layer"] == 1, f"wbar_{side}"], want)
    assert np.allclose(fitted["delta"], fitted["proj_base"] - fitted["proj_dpo"])
    assert not np.allclose(fitted["delta"], neurons["delta"])
    assert ((fitted["delta"] > 0) == (fitted["group"] != INCREASED)).all()
    with pytest.raises(DpotoxError, match="holds no positions of prompts"):
        refit(neurons, tmp_path / "base", tmp_path / "dpo", ["nope"], decomposition)


def test_geometry_of_known_vectors():
    model = tiny_model("llama")
    a = Adapter(model)
    w = a.value_vectors(1)[5].detach().clone() * 3  # neuron (1, 5) points along the probe
    g = value_geometry(a, w)
    assert g.cos[1, 5] == pytest.approx(1.0) and g.along[1, 5] == pytest.approx(float(w.norm() / 3))
    assert (g.bias_along == 0).all()  # no output bias in a GLU
    np.testing.assert_allclose(value_cosines(a, a), 1.0)
    assert top_cosine_neurons(g.cos, 1) == [(1, 5)]
    assert top_cosine_neurons(-g.cos, 1, anti=True) == [(1, 5)]
    spec = toxic_ablation(g.cos, 7)
    assert spec.name == "ablate-toxic-7" and sum(e.neurons.numel() for e in spec.edits) == 7
    # The papers zero the value vectors: every position, the prompt included.
    assert {e.where for e in spec.edits} == {"all"}
    gen = toxic_ablation(g.cos, 7, generation_only=True)
    assert gen.name == "ablate-toxic-gen-7" and {e.where for e in gen.edits} == {"generation"}
    assert [e.neurons.tolist() for e in gen.edits] == [e.neurons.tolist() for e in spec.edits]
    assert sign_groups(
        np.array([0.1, 0.1, -0.1, -0.1, 0.0]), np.array([0.0, -1.0, 2.0, -3.0, 1.0])
    ).tolist() == ["TP", "TN", "AP", "AN", "AP"]


def test_mismatched_inputs_are_named():
    g = value_geometry(Adapter(tiny_model("gpt2")), torch.ones(D_MODEL))
    with pytest.raises(NeuronsError, match="base mean activations"):
        neuron_frame(
            g,
            g,
            np.ones((N_LAYERS, D_MLP)),
            np.ones((N_LAYERS + 1, D_MLP)),
            np.ones((N_LAYERS, D_MLP)),
        )


def _known_table() -> pd.DataFrame:
    """Eight neurons in two layers whose groups and sums are worked out by hand."""
    rows = [  # layer, cos, mbar_base, mbar_dpo, along_base (= along_dpo)
        (0, 0.5, 1.0, 0.5, 1.0),  # TP: proj 1.0 -> 0.5, delta 0.5
        (0, 0.5, -1.0, -2.0, 1.0),  # TN: -1 -> -2, delta 1.0
        (0, -0.5, 1.0, 3.0, -1.0),  # AP: -1 -> -3, delta 2.0
        (0, -0.5, -2.0, -1.0, -1.0),  # AN: 2 -> 1, delta 1.0
        (1, 0.5, 1.0, 2.0, 1.0),  # increased: 1 -> 2, delta -1.0
        (1, 0.5, 2.0, 1.0, 1.0),  # TP: delta 1.0
        (1, -0.5, -1.0, -0.5, -1.0),  # AN: 1 -> 0.5, delta 0.5
        (1, -0.5, 1.0, 0.5, -1.0),  # increased: -1 -> -0.5, delta -0.5
    ]
    arr = np.array([r[1:] for r in rows]).reshape(2, 4, 4)
    from dpotox.stages.neurons import ValueGeometry

    geo = ValueGeometry(arr[..., 3], np.ones((2, 4)), arr[..., 0], np.array([0.25, 0.0]))
    neurons = neuron_frame(geo, geo, np.ones((2, 4)), arr[..., 1], arr[..., 2])
    return neurons, layer_frame(geo, geo, neurons)


def test_statistics_of_a_known_table(tmp_path):
    neurons, layers = _known_table()
    assert neurons["group"].tolist() == ["TP", "TN", "AP", "AN", INCREASED, "TP", "AN", INCREASED]
    np.testing.assert_allclose(neurons["delta"], [0.5, 1, 2, 1, -1, 1, 0.5, -0.5])
    shares = group_shares(neurons).set_index("group")
    assert shares.loc["reducing", "reduction"] == 6.0 and shares.loc["all", "reduction"] == 4.5
    assert shares.loc["TP", "n_neurons"] == 2 and shares.loc[
        "TP", "pct_of_reducing_neurons"
    ] == pytest.approx(100 / 3)
    assert shares.loc["AP", "pct_of_reduction"] == pytest.approx(100 * 2 / 6)
    assert shares.loc[list(GROUPS), "pct_of_reduction"].sum() == pytest.approx(100)
    assert shares.loc[list(GROUPS), "pct_of_reducing_neurons"].sum() == pytest.approx(100)
    signs = activation_signs(neurons).set_index("model")
    assert signs.loc["base", "pct_negative"] == pytest.approx(37.5)
    change = projection_change(neurons).iloc[0]
    assert (change["n_reduce"], change["n_increase"]) == (6, 2)
    assert change["reduction_by_reducing"] == 6.0 and change["increase_by_increasing"] == 1.5
    corr = shift_correlations(neurons)
    shift = neurons["mbar_dpo"] - neurons["mbar_base"]
    assert corr.loc[1, "pearson_r"] == pytest.approx(np.corrcoef(shift, neurons["mbar_base"])[0, 1])
    assert 0 <= corr.loc[1, "p_value"] <= 1
    cum = cumulative_reduction(neurons)
    assert cum["rank"].tolist() == list(range(1, 9))
    assert cum["cumulative_reduction"].max() == 6.0 and cum["cumulative_reduction"].iloc[-1] == 4.5
    by_rank = group_shares_by_rank(neurons, top=4, bin_size=2)
    assert by_rank.groupby("bin_start")["n_neurons"].sum().tolist() == [2, 2]
    assert by_rank.groupby("bin_start")["share"].sum().tolist() == [1.0, 1.0]
    per_layer = layer_group_reduction(neurons).set_index("layer")
    assert per_layer.loc[0, "AP"] == 2.0 and per_layer.loc[1, INCREASED] == -1.5
    np.testing.assert_allclose(per_layer["net"], [4.5, 0.0])
    # Layer 0 has a bias term of 0.25 along u: it enters the MLP output, not the neurons.
    assert layers["mlp_proj_base"].tolist() == [1 - 1 - 1 + 2 + 0.25, 1 + 2 + 1 - 1]
    ablated = np.array([[0.0, -1.0, 1.0, -2.0], [1.0, 2.0, -1.0, 1.0]])  # neuron (0, 0) ablated
    fig1a = layer_projections(layers, neurons, ablated, 1)
    assert fig1a["ablated_top1"].tolist() == [-1 - 1 + 2 + 0.25, 3.0]
    assert "| TP |" in to_markdown(shares.reset_index())
    assert "| < 1e-300 |" in to_markdown(pd.DataFrame({"p_value": [0.0], "r": [0.0]}))


def test_write_stats_writes_every_table(tmp_path):
    neurons, layers = _known_table()
    neurons.to_parquet(tmp_path / "neurons.parquet")
    layers.to_parquet(tmp_path / "layers.parquet")
    pd.DataFrame(
        [
            {
                "kind": "toxic",
                "rank": 1,
                "layer": 0,
                "neuron": 0,
                "cos": 0.5,
                "negated": False,
                "top_tokens": ["a|b", " c"],
            }
        ]
    ).to_parquet(tmp_path / "tok.parquet")
    decomposition_frame(neurons, neurons).to_parquet(tmp_path / "decomposition.parquet")
    tables = write_stats(
        neurons_path=tmp_path / "neurons.parquet",
        layers_path=tmp_path / "layers.parquet",
        tokens_path=tmp_path / "tok.parquet",
        ablated_acts=None,
        cfg={"neurons": {"rank_top": 4, "rank_bin": 2, "compare_top": 2}},
        out_dir=tmp_path / "t",
        model="tiny",
        decomposition_path=tmp_path / "decomposition.parquet",
    )
    # One decomposition against itself (a family without a post-MLP norm): equal columns,
    # full overlaps.
    same = tables["table_decomposition"].set_index("quantity")
    np.testing.assert_array_equal(same["naive"], same["exact"])
    assert same.loc["top-2 toxic-aligned (by cosine) in both (%)", "exact"] == 100.0
    assert same.loc["neurons in the same group (%)", "exact"] == 100.0
    assert set(tables) == set(TABLES)
    for name, md in TABLES.items():
        assert (tmp_path / "t" / f"{name}.csv").is_file()
        assert (tmp_path / "t" / f"{name}.md").is_file() == md
    assert "a\\|b" in (tmp_path / "t" / "table14_15_value_vector_tokens.md").read_text()
    assert "ablated_top200" not in pd.read_csv(tmp_path / "t" / "fig1a_layer_projections.csv")


def test_decomposition_comparison_of_a_constructed_case():
    """Two decompositions that disagree on one neuron's sign of reduction and swap the top
    cosine: the table counts the groups, shares and overlaps of each."""
    neurons, _ = _known_table()
    exact = neurons.copy()
    i = exact.index[exact["delta"] > 0][0]
    exact.loc[i, "delta"] = -1.0
    exact.loc[i, "group"] = INCREASED
    exact["rank_delta"] = exact["delta"].rank(ascending=False, method="first").astype(int)
    exact["cos"] = -exact["cos"]
    exact["rank_cos"] = exact["cos"].rank(ascending=False, method="first").astype(int)
    table = decomposition_comparison(decomposition_frame(exact, neurons), top=2).set_index(
        "quantity"
    )
    n = len(neurons)
    reducing = "neurons reducing their projection (%)"
    assert table.loc[reducing, "naive"] == pytest.approx(100 * 6 / n)
    assert table.loc[reducing, "exact"] == pytest.approx(100 * 5 / n)
    assert table.loc["neurons in the same group (%)", "exact"] == pytest.approx(100 * (n - 1) / n)
    # Negated cosines: the two most toxic-aligned are the two least of the other.
    assert table.loc["top-2 toxic-aligned (by cosine) in both (%)", "exact"] == 0.0
    assert table.loc["Spearman correlation of the cosines", "exact"] == pytest.approx(-1.0)
    for d in ("naive", "exact"):
        shares = table.loc[[f"{g}: share of the reduction (%)" for g in GROUPS], d]
        assert shares.sum() == pytest.approx(100.0)
    # C7 under each: the cosines were negated, so the correlation flips its sign.
    r = table.loc["C7: Pearson r of the activation shift with cos"]
    assert r["naive"] == pytest.approx(np.corrcoef(neurons["shift"], neurons["cos"])[0, 1])
    assert r["exact"] == pytest.approx(-r["naive"]) and r["naive"] != 0
