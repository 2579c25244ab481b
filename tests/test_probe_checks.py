"""Rule probe_checks (dpotox.stages.probe_checks): group stability under refit directions and
the validity checks, on tiny models."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import dpo_like, prepared_gpt2, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.sources import load_prepared
from dpotox.stages.neurons import neuron_frame, value_cosines, value_geometry
from dpotox.stages.probe import ProbeConfig, ProbeError, save_probe
from dpotox.stages.probe_checks import (
    continuation_check,
    dpo_shift_cosine,
    group_stability,
    probe_checks,
)


def _table(base: Adapter, dpo: Adapter, w: torch.Tensor, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    shape = (base.n_layers, base.d_mlp)
    return neuron_frame(
        value_geometry(base, w),
        value_geometry(dpo, w),
        value_cosines(base, dpo),
        rng.normal(size=shape),
        rng.normal(size=shape),
    )


@pytest.fixture
def pair():
    model = tiny_model("llama")
    return (
        Adapter(model),
        Adapter(dpo_like(model)),
        torch.randn(32, generator=torch.Generator().manual_seed(0)),
    )


def test_the_same_direction_moves_nothing(pair):
    base, dpo, w = pair
    got = group_stability(base, dpo, w, torch.stack([w, 3 * w]), _table(base, dpo, w))
    assert got["n"] == 2 and got["group_flip_share_max"] == 0.0
    assert got["alignment_flip_share_max"] == 0.0 and got["top_toxic_overlap_min"] == 1.0
    assert got["top_toxic"] == 32  # a quarter of the tiny model's 128 neurons


def test_the_opposite_direction_flips_every_alignment(pair):
    base, dpo, w = pair
    got = group_stability(base, dpo, w, (-w)[None], _table(base, dpo, w))
    assert got["alignment_flip_share_mean"] == 1.0 and got["top_toxic_overlap_mean"] == 0.0
    assert 0 < got["group_flip_share_mean"] <= 1


def test_a_nearby_direction_moves_a_few(pair):
    base, dpo, w = pair
    near = w + 0.1 * w.norm() * torch.nn.functional.normalize(torch.randn(32), dim=0)
    got = group_stability(base, dpo, w, near[None], _table(base, dpo, w))
    assert 0 < got["group_flip_share_mean"] < 0.5 and got["top_toxic_overlap_mean"] > 0.5


@pytest.mark.parametrize("decomposition", ["exact", "naive"])
def test_post_norm_models_regroup_as_their_table(decomposition):
    """Gemma-2: the groups are recomputed from the written means and the table's vectors."""
    model = tiny_model("gemma2")
    base, dpo = Adapter(model), Adapter(dpo_like(model))
    w = torch.randn(32, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    shape = (base.n_layers, base.d_mlp)
    table = neuron_frame(
        value_geometry(base, w, decomposition),
        value_geometry(dpo, w, decomposition),
        value_cosines(base, dpo, decomposition),
        rng.normal(size=shape),
        rng.normal(size=shape),
        rng.normal(size=shape),  # written means: not the raw ones
        rng.normal(size=shape),
    )
    got = group_stability(base, dpo, w, w[None], table, decomposition)
    assert got["group_flip_share_max"] == 0.0


def test_a_table_of_another_probe_is_refused(pair):
    base, dpo, w = pair
    with pytest.raises(ProbeError, match="built with another probe"):
        group_stability(base, dpo, w, w[None], _table(base, dpo, torch.randn(32)))


def test_the_stage_writes_its_checks(tmp_path):
    base_dir = prepared_gpt2(tmp_path / "b")
    base_m, tok = load_prepared(base_dir)
    dpo_m = dpo_like(base_m)
    dpo_m.save_pretrained(tmp_path / "dpo")
    tok.save_pretrained(tmp_path / "dpo")
    (tmp_path / "dpo" / "source.json").write_text((base_dir / "source.json").read_text())
    base, dpo = Adapter(base_m), Adapter(dpo_m)
    w = torch.randn(base.d_model, generator=torch.Generator().manual_seed(1))
    save_probe(tmp_path / "probe.safetensors", w, 0.1, {})
    save_file({"directions": torch.stack([w, -w])}, str(tmp_path / "bootstrap.safetensors"))
    _table(base, dpo, w).to_parquet(tmp_path / "neurons.parquet")
    evals = pd.DataFrame(
        {
            "prompt": ["You are such a", "The weather today", "What a", "I think that"],
            "continuation": [" stupid idiot", " is mild and sunny", " damn mess", ""],
            "score": [0.95, 0.01, 0.85, 0.02],
        }
    )
    evals.to_parquet(tmp_path / "base.parquet")
    out = tmp_path / "checks.json"
    metrics = {
        "test_accuracy": 0.8,
        "n_train": 10,
        "n_test": 2,
        "evaluation_prompts": {"removed": 3, "overlap": 0},
        "stability": {"n": 2, "cos_with_probe_mean": 0.9},
        "learning_curve": [{"share": 0.5, "n_train": 5, "test_auc": 0.7}],
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    got = probe_checks(
        metrics_path=tmp_path / "metrics.json",
        tables_root=tmp_path / "tables",
        model_name="m",
        base_model=base_dir,
        dpo_model=tmp_path / "dpo",
        probe_path=tmp_path / "probe.safetensors",
        bootstrap_path=tmp_path / "bootstrap.safetensors",
        neurons_path=tmp_path / "neurons.parquet",
        base_eval=tmp_path / "base.parquet",
        cfg={
            "probe": {"label_threshold": 0.8, "clean_threshold": 0.05},
            "sweeps": {"toxic_words": ["idiot", "damn"], "neutral_words": ["hello", "friend"]},
        },
        out=out,
    )
    written = json.loads(out.read_text())
    assert written["stability"]["n"] == 2
    assert written["stability"]["alignment_flip_share_max"] == 1.0  # -w flips every neuron
    assert -1 <= written["cos_probe_free"] <= 1 and -1 <= written["cos_dpo_shift"] <= 1
    # The empty continuation is not scored; two toxic, one clean remain.
    assert written["continuations"]["n"] == 3
    assert (written["continuations"]["n_toxic"], written["continuations"]["n_clean"]) == (2, 1)
    assert got["cos_dpo_shift"] == written["cos_dpo_shift"]
    table = pd.read_csv(tmp_path / "tables" / "m" / "table_probe.csv")
    by = dict(zip(table["measure"], table["value"]))
    assert float(by["evaluation prompts overlap left"]) == 0
    assert float(by["refits: share changing alignment, mean"]) == 0.5  # w, then -w
    assert (
        "# The probe: held-out quality"
        in (tmp_path / "tables" / "m" / "table_probe.md").read_text()
    )
    curve = pd.read_csv(tmp_path / "tables" / "m" / "table_probe_learning_curve.csv")
    assert curve["n_train"].tolist() == [5]


def test_the_continuation_check_scores_a_planted_probe(tmp_path):
    """A probe that is the difference of the two classes' mean features separates them."""
    model, tok = load_prepared(prepared_gpt2(tmp_path))
    adapter, pc = Adapter(model), ProbeConfig()
    toxic = [" you idiot", " stupid trash", " shut up idiot"]
    clean = [" a sunny day", " thank you friend", " the river bank"]
    from dpotox.stages.probe import pooled_features

    x = pooled_features(adapter, tok, toxic + clean, max_tokens=16, batch_size=4)
    w = x[:3].mean(0) - x[3:].mean(0)
    b = -float(w @ x.mean(0))
    evals = pd.DataFrame({"continuation": toxic + clean, "score": [0.9] * 3 + [0.01] * 3})
    got = continuation_check(adapter, tok, w, b, evals, pc)
    assert got["balanced_accuracy"] == 1.0 and got["auc"] == 1.0
    # A model against itself shifts nothing: no direction to compare (null in checks.json).
    assert math.isnan(dpo_shift_cosine(adapter, adapter, tok, w, evals.assign(prompt=""), pc))
