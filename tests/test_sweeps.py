"""The sweep conditions: names from the config's grids, neuron sets by their definitions, and
each kind of spec acting as the papers describe, on tiny models."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import D_MODEL, VOCAB, TokenIdTokenizer, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import greedy
from dpotox.engine.hooks import applied
from dpotox.engine.spec import AddResidual, ScaleKeys, ScaleNeurons, SetNeurons
from dpotox.errors import ConfigError
from dpotox.plan.conditions import (
    GROUPS,
    HALVES,
    SweepError,
    SweepsConfig,
    chunks,
    prompt_halves,
    spec_conditions,
    sweep_conditions,
)
from dpotox.plan.config import validate_config
from dpotox.stages.activations import cache_generation, mean_activations, prompt_means
from dpotox.stages.neurons import neuron_frame, refit, value_cosines, value_geometry
from dpotox.stages.sweeps import (
    edit,
    edit_selection,
    interpretable_toxic,
    make_spec,
    patch_set,
    positive_toxic,
    word_contrast,
)


def _cfg(**sweeps):
    return validate_config(
        {
            "models": {"m": {"source": {"kind": "hub", "id": "gpt2"}, "family": "gpt2"}},
            "sweeps": sweeps,
        }
    )


def test_condition_names_follow_the_grids():
    cfg = _cfg(
        ablate_toxic=[10],
        ablate_toxic_positive=[5],
        scale_keys_factors=[2, 0.5],
        patch_toxic=[8],
        patch_sets=["tp", "four-groups"],
        per_prompt=["toxic-8"],
        steer_alphas=[1.5],
        edit_probe=[[0.5, 0.2]],
        edit_selections=["cos", "act"],
        edit_free=[[0.8, 0.1]],
        edit_constant=[[0.5, 0.05]],
    )
    assert sweep_conditions(cfg, "m") == [
        "ablate-toxic-10",
        "ablate-toxic-pos-5",
        "dpo-scale-keys-top7-x2",
        "dpo-scale-keys-top7-x0.5",
        "patch-toxic-8",
        "patch-toxic-interpretable",
        "patch-tp",
        "patch-four-groups",
        "patch-toxic-8-per-prompt",
        # cross_fit's default: the sets table_claims judges
        "patch-toxic-8-fit-a",
        "patch-toxic-8-fit-b",
        "patch-four-groups-fit-a",
        "patch-four-groups-fit-b",
        "patch-toxic-8-base-means",
        "patch-toxic-interpretable-base-means",
        "patch-tp-base-means",
        "patch-four-groups-base-means",
        "steer-probe-a1.5",
        "edit-probe-cos-b0.5-a0.2",
        "edit-probe-act-b0.5-a0.2",
        "edit-free-cos-b0.8-a0.1",
        "edit-const-probe-ref-b0.5-a0.05",
    ]
    assert "ablate-toxic-10" not in spec_conditions(cfg, "m")
    cfg["models"]["m"]["steer_alphas"] = [3]  # a per-model grid wins
    assert "steer-probe-a3" in sweep_conditions(cfg, "m")
    # validate_config refuses the config; sweep_conditions itself on an unchecked one.
    with pytest.raises(ConfigError, match="sweeps.per_prompt.*'tp-an'.*toxic-8"):
        _cfg(patch_toxic=[8], patch_sets=["tp"], per_prompt=["tp-an"])
    unchecked = copy.deepcopy(cfg)
    unchecked["sweeps"].update(patch_toxic=[8], patch_sets=["tp"], per_prompt=["tp-an"])
    with pytest.raises(SweepError, match="sweeps.per_prompt.*'tp-an'.*toxic-8"):
        sweep_conditions(unchecked, "m")
    # An explicit cross_fit list: those sets only, each a set of the config.
    assert [c for c in sweep_conditions(_cfg(cross_fit=["tp"]), "m") if "-fit-" in c] == [
        "patch-tp-fit-a",
        "patch-tp-fit-b",
    ]
    assert not [c for c in sweep_conditions(_cfg(cross_fit=[]), "m") if "-fit-" in c]
    unchecked["sweeps"].update(per_prompt=[], cross_fit=["all"])
    with pytest.raises(SweepError, match="sweeps.cross_fit.*'all'"):
        sweep_conditions(unchecked, "m")
    # Conditions on the DPO model get jobs of their own.
    a, b, c = "patch-tp", "patch-all", "steer-probe-a1"
    x, y = "dpo-scale-keys-top7-x2", "dpo-scale-keys-top7-x5"
    assert chunks([a, x, b, c, y], 2) == [[a, b], [c], [x, y]]


def _table() -> pd.DataFrame:
    """A 2-layer x 4-neuron table with every sign combination and known groups."""
    cos = np.array([[0.9, 0.5, -0.7, -0.2], [0.3, -0.8, 0.6, -0.1]])
    mbar = np.array([[1.0, -0.5, 0.4, -1.0], [-0.2, 0.7, 0.0, -2.0]])
    rows = []
    for layer in range(2):
        for n in range(4):
            rows.append(
                {
                    "layer": layer,
                    "neuron": n,
                    "cos": cos[layer, n],
                    "mbar_base": mbar[layer, n],
                    "mbar_dpo": mbar[layer, n] * 0.5,
                    # Unit value vectors: the write along u is mbar * cos.
                    "proj_base": mbar[layer, n] * cos[layer, n],
                    "delta": 0.5 * mbar[layer, n] * cos[layer, n],
                    "group": ["TP", "TN", "AP", "AN", "increased", "increased", "TP", "AN"][
                        layer * 4 + n
                    ],
                }
            )
    return pd.DataFrame(rows)


def test_neuron_sets_follow_their_definitions():
    t = _table()
    assert patch_set(t, "toxic-3")[["layer", "neuron"]].values.tolist() == [[0, 0], [1, 2], [0, 1]]
    assert set(map(tuple, patch_set(t, "tp-an")[["layer", "neuron"]].values)) == {
        (0, 0),
        (0, 3),
        (1, 2),
        (1, 3),
    }
    assert len(patch_set(t, "four-groups")) == 6 and len(patch_set(t, "increased")) == 2
    assert len(patch_set(t, "all")) == 8
    # Positive activations only (0.0 is not positive): (0,0) cos .9, (1,1) is anti-aligned.
    assert positive_toxic(t, 1)[["layer", "neuron"]].values.tolist() == [[0, 0]]
    with pytest.raises(SweepError, match="sweeps.ablate_toxic_positive.*9 neurons"):
        positive_toxic(t, 9)
    with pytest.raises(SweepError, match="sweeps.patch_toxic.*100 neurons.*8"):
        patch_set(t, "toxic-100")


def test_editing_shrinks_every_chosen_neurons_write_along_the_probe():
    t = _table()
    cos = t["cos"].to_numpy().reshape(2, 4)
    chosen = edit_selection(t, cos, 1.0, "cos")
    assert len(chosen) == 8
    # m' (v.u) = m (v.u) (1 - alpha sign(cos) sign(m)): the write along u falls by alpha |m (v.u)|.
    for alpha in (0.1, 0.5):
        before = chosen["mbar_base"] * chosen["_cos"]
        after = before * (1 - alpha * chosen["factor_sign"])
        assert np.allclose(before - after, alpha * before.abs())
    # beta: a fraction of each sign group; by |cos| or by ascending |activation|.
    half = edit_selection(t, cos, 0.5, "cos")
    assert len(half) == 4 and set(half["_group"]) == {"TP", "TN", "AP", "AN"}
    tp = t[(t["cos"] > 0) & (t["mbar_base"] >= 0)]
    assert len(tp) == 2  # (0,0) |cos| .9 |m| 1.0 and (1,2) |cos| .6 |m| 0
    assert (0, 0) in set(map(tuple, half[["layer", "neuron"]].values))
    by_act = edit_selection(t, cos, 0.5, "act")
    assert (1, 2) in set(map(tuple, by_act[["layer", "neuron"]].values))
    with pytest.raises(SweepError, match="beta 1.5"):
        edit_selection(t, cos, 1.5, "cos")


def test_the_reference_editing_order_filter_and_constants():
    """The reference notebook: strict sign groups, the 0.8 quantile of base activation dropped,
    TP and AN by descending |cos|, AP and TN by ascending |cos|, floor(beta x group); each chosen
    neuron set to its base mean x (1 - alpha) in TP/AN, x (1 + alpha) in AP/TN."""
    t = _table()
    cos = t["cos"].to_numpy().reshape(2, 4)
    # mbar: 1.0 -0.5 0.4 -1.0 | -0.2 0.7 0.0 -2.0; its 0.8 quantile is 0.52: (0,0) and (1,1)
    # go; (1,2) has activation 0 and no strict sign.
    ref = edit_selection(t, cos, 1.0, "ref", quantile=0.8)
    assert sorted(map(tuple, ref[["layer", "neuron"]].values)) == [
        (0, 1), (0, 2), (0, 3), (1, 0), (1, 3)
    ]  # fmt: skip
    # AN holds (0,3) |cos| .2 and (1,3) |cos| .1: half (floor) keeps the larger |cos|; TN holds
    # (0,1) |cos| .5 and (1,0) |cos| .3: ascending keeps the smaller.
    half = edit_selection(t, cos, 0.5, "ref")
    picked = set(map(tuple, half[["layer", "neuron"]].values))
    assert (0, 3) in picked and (1, 3) not in picked and (1, 0) in picked and (0, 1) not in picked
    spec = edit("c", t, cos, 1.0, 0.5, "ref", "d", operation="const", quantile=0.8)
    got = {(e.layer, int(n)): float(v) for e in spec.edits for n, v in zip(e.neurons, e.values)}
    assert isinstance(spec.edits[0], SetNeurons)
    assert got == pytest.approx(
        {
            (0, 1): -0.5 * 1.5,  # TN: x (1 + alpha)
            (0, 2): 0.4 * 1.5,  # AP
            (0, 3): -1.0 * 0.5,  # AN: x (1 - alpha)
            (1, 0): -0.2 * 1.5,  # TN
            (1, 3): -2.0 * 0.5,  # AN
        }
    )
    # The projected reduction: alpha x sign x proj over the chosen; DPO's: the summed delta.
    want = 0.5 * sum(
        (1 if g in ("TP", "AN") else -1) * mbar * c
        for (mbar, c, g) in [(-0.5, 0.5, "TN"), (0.4, -0.7, "AP"), (-1.0, -0.2, "AN"),
                             (-0.2, 0.3, "TN"), (-2.0, -0.1, "AN")]
    )  # fmt: skip
    assert spec.meta["projected_reduction"] == pytest.approx(want)
    assert spec.meta["dpo_net_reduction"] == pytest.approx(t["delta"].sum())
    # Scaling takes the same neurons and factors as multipliers of the live activation.
    scaled = edit("s", t, cos, 1.0, 0.5, "ref", "d", quantile=0.8)
    assert scaled.meta["projected_reduction"] == pytest.approx(want)
    with pytest.raises(SweepError, match=r"must be in \(0, 1\)"):
        edit("s", t, cos, 1.0, 1.0, "ref", "d")
    assert edit("c1", t, cos, 1.0, 1.0, "ref", "d", operation="const").meta["n_neurons"] == 7


@pytest.fixture
def tables(tmp_path):
    """A tiny GPT-2, a nudged 'DPO' copy, their caches and neuron table, a random probe."""
    model = tiny_model("gpt2")
    dpo = copy.deepcopy(model)
    with torch.no_grad():
        for p in dpo.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    base_a, dpo_a, tok = Adapter(model), Adapter(dpo), TokenIdTokenizer(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB - 1, (5,), generator=g).tolist() for _ in range(4)]
    ids = ["a", "b", "c", "d"]
    cache_generation(base_a, tok, prompts, ids, tmp_path / "base", new_tokens=4)
    cache_generation(dpo_a, tok, prompts, ids, tmp_path / "dpo", new_tokens=4)
    w = torch.randn(D_MODEL, generator=g)
    neurons = neuron_frame(
        value_geometry(base_a, w),
        value_geometry(dpo_a, w),
        value_cosines(base_a, dpo_a),
        mean_activations(tmp_path / "base"),
        mean_activations(tmp_path / "dpo"),
    )
    return base_a, dpo_a, tok, prompts, ids, w, neurons, tmp_path / "dpo"


def _spec(name, base_a, w, neurons, dpo_acts, sc=None, **kw):
    cos = neurons["cos"].to_numpy().reshape(base_a.n_layers, base_a.d_mlp)
    return make_spec(
        name,
        neurons,
        sc or SweepsConfig(),
        adapter=base_a,
        w=w,
        cos_probe=cos,
        cos_free=kw.get("cos_free"),
        interpretable=kw.get("interpretable"),
        dpo_acts=dpo_acts,
        fits=kw.get("fits"),
    )


def _captured(adapter, tok, prompts, ids, spec):
    """Each layer's m at the generation positions, recorded while generating under ``spec``."""
    seen = {}

    class Rec:
        def start(self, ctx):
            pass

        def finish(self, ctx):
            pass

        def record(self, layer, m, ctx, scale=None):
            seen.setdefault(layer, []).append(m.detach().clone())

    greedy(adapter, tok, prompts, ids, spec=spec, new_tokens=3, recorder=Rec())
    return seen


def test_patching_sets_the_dpo_means_and_per_prompt_each_prompts_own(tables):
    base_a, _, tok, prompts, ids, w, neurons, dpo_acts = tables
    spec = _spec("patch-tp", base_a, w, neurons, dpo_acts)
    tp = neurons[neurons["group"] == "TP"]
    assert sum(e.neurons.numel() for e in spec.edits) == len(tp) > 0
    e = spec.edits[0]
    want = tp[tp["layer"] == e.layer].sort_values("neuron")["mbar_dpo"].to_numpy()
    assert isinstance(e, SetNeurons) and np.allclose(e.values.numpy(), want, atol=1e-6)
    seen = _captured(base_a, tok, prompts, ids, spec)
    for m in seen[e.layer]:
        assert torch.allclose(m[..., e.neurons], e.values.to(m.dtype).expand_as(m[..., e.neurons]))
    pp = _spec("patch-four-groups-per-prompt", base_a, w, neurons, dpo_acts)
    e = pp.edits[0]
    got_ids, means, _ = prompt_means(dpo_acts, e.layer)
    assert e.prompt_ids == tuple(got_ids) and e.values.shape == (4, e.neurons.numel())
    assert np.allclose(e.values.numpy(), means[:, e.neurons.numpy()], atol=1e-6)
    assert pp.per_prompt and pp.shares_prefix
    # The control: the same neurons at their base means.
    control = _spec("patch-tp-base-means", base_a, w, neurons, dpo_acts)
    c = control.edits[0]
    assert [x.neurons.tolist() for x in control.edits] == [x.neurons.tolist() for x in spec.edits]
    want = tp[tp["layer"] == c.layer].sort_values("neuron")["mbar_base"].to_numpy()
    assert np.allclose(c.values.numpy(), want, atol=1e-6) and "control" in control.description


def test_cross_fitted_patches_take_neurons_and_means_from_one_half(tables):
    """patch-SET-fit-a/b: the set as the neuron table refitted on that half of the prompts
    picks it, at that half's DPO means; the halves are the seeded ones the tables use."""
    base_a, _, tok, prompts, ids, w, neurons, dpo_acts = tables
    base_acts = dpo_acts.parent / "base"
    halves = dict(zip(HALVES, prompt_halves(ids, 0), strict=True))
    fits = {h: refit(neurons, base_acts, dpo_acts, halves[h]) for h in HALVES}
    got = {}
    for h in HALVES:
        spec = _spec(f"patch-four-groups-fit-{h}", base_a, w, neurons, dpo_acts, fits=fits)
        rows = fits[h][fits[h]["group"].isin(GROUPS)]
        assert sum(e.neurons.numel() for e in spec.edits) == len(rows) > 0
        for e in spec.edits:
            want = rows[rows["layer"] == e.layer].sort_values("neuron")
            assert e.neurons.tolist() == want["neuron"].tolist()
            assert np.allclose(e.values.numpy(), want["mbar_dpo"].to_numpy(), atol=1e-6)
        got[h] = {
            (e.layer, int(n)): float(v) for e in spec.edits for n, v in zip(e.neurons, e.values)
        }
        # toxic-N: the same neurons (cos does not depend on prompts), the half's means.
        top = _spec(f"patch-toxic-5-fit-{h}", base_a, w, neurons, dpo_acts, fits=fits)
        plain = _spec("patch-toxic-5", base_a, w, neurons, dpo_acts)
        assert [e.neurons.tolist() for e in top.edits] == [e.neurons.tolist() for e in plain.edits]
    assert got["a"] != got["b"]
    with pytest.raises(SweepError, match="not fitted on half a"):
        _spec("patch-tp-fit-a", base_a, w, neurons, dpo_acts)


def test_ablation_keys_steering_and_editing_specs(tables):
    base_a, _, tok, prompts, ids, w, neurons, dpo_acts = tables
    pos = _spec("ablate-toxic-pos-5", base_a, w, neurons, dpo_acts)
    chosen = {(e.layer, int(n)) for e in pos.edits for n in e.neurons}
    assert len(chosen) == 5 and all(float(e.values) == 0 for e in pos.edits)
    assert {e.where for e in pos.edits} == {"all"}  # the value vectors: every position
    gen = _spec("ablate-toxic-pos-gen-5", base_a, w, neurons, dpo_acts)
    assert {(e.layer, int(n)) for e in gen.edits for n in e.neurons} == chosen
    assert {e.where for e in gen.edits} == {"generation"}
    top = _spec("ablate-toxic-gen-5", base_a, w, neurons, dpo_acts)
    ranked = neurons.sort_values("rank_cos").head(5)
    assert {(e.layer, int(n)) for e in top.edits for n in e.neurons} == set(
        zip(ranked["layer"], ranked["neuron"])
    )
    assert all(neurons.set_index(["layer", "neuron"]).loc[c, "mbar_base"] > 0 for c in chosen)
    keys = _spec("dpo-scale-keys-top3-x10", base_a, w, neurons, dpo_acts)
    assert all(isinstance(e, ScaleKeys) and float(e.factors) == 10 for e in keys.edits)
    assert not keys.shares_prefix
    steer = _spec("steer-probe-a2.5", base_a, w, neurons, dpo_acts)
    (e,) = steer.edits
    assert isinstance(e, AddResidual) and e.layer == base_a.n_layers - 1 and e.alpha == -2.5
    assert torch.isclose(e.vector.norm(), torch.tensor(1.0)) and e.where == "all"
    edit = _spec("edit-probe-act-b0.5-a0.2", base_a, w, neurons, dpo_acts)
    factors = torch.cat([e.factors for e in edit.edits])
    assert all(isinstance(e, ScaleNeurons) for e in edit.edits)
    assert np.allclose(np.sort(np.unique(factors.numpy())), [0.8, 1.2])
    assert abs(len(factors) - 0.5 * len(neurons)) <= 4 and edit.shares_prefix
    with pytest.raises(SweepError, match="alpha 1"):
        _spec("edit-probe-cos-b0.5-a1", base_a, w, neurons, dpo_acts)
    with pytest.raises(SweepError, match="unknown condition 'frobnicate'"):
        _spec("frobnicate", base_a, w, neurons, dpo_acts)
    # The spec applies to the model and changes its continuations.
    with applied(base_a, edit):
        pass
    plain = greedy(base_a, tok, prompts, ids, new_tokens=4).new_tokens
    steered = greedy(
        base_a,
        tok,
        prompts,
        ids,
        new_tokens=4,
        spec=_spec("steer-probe-a50", base_a, w, neurons, dpo_acts),
    ).new_tokens
    assert plain != steered


def test_probe_free_direction_and_interpretable_neurons(tables):
    base_a, _, tok, _, _, w, neurons, _ = tables
    contrast = word_contrast(base_a, tok, ["7", "8"], ["9"])
    emb = base_a.input_embedding().detach().double()

    def ids(word):
        return tok(" " + word, add_special_tokens=False)["input_ids"]

    want = (emb[ids("7")].mean(0) + emb[ids("8")].mean(0)) / 2 - emb[ids("9")].mean(0)
    assert torch.allclose(contrast, want)
    with pytest.raises(SweepError, match="sweeps.neutral_words"):
        word_contrast(base_a, tok, ["7"], [])
    pool = neurons.sort_values("cos", ascending=False).head(6)
    # A scorer that calls one token text toxic: exactly the vectors listing it are kept.
    _, judged = interpretable_toxic(
        base_a, tok, pool, lambda texts: [0.0] * len(texts), n_tokens=3, threshold=0.5
    )
    token = judged["top_tokens"].iloc[0][0].strip()
    chosen, judged = interpretable_toxic(
        base_a,
        tok,
        pool,
        lambda texts: [1.0 if t == token else 0.0 for t in texts],
        n_tokens=3,
        threshold=0.5,
    )
    listing = judged[judged["top_tokens"].map(lambda ts: token in [t.strip() for t in ts])]
    assert len(chosen) == len(listing) >= 1
    assert all(judged.loc[listing.index, "toxic_tokens"].map(len) > 0)
