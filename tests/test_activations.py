"""Activation caching: the cached means are the activations of the greedy positions, the files
are plain Parquet, and an interrupted run leaves no cache behind."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import D_MLP, N_LAYERS, VOCAB, TokenIdTokenizer, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import greedy
from dpotox.engine.spec import Intervention, ablate
from dpotox.stages.activations import (
    META,
    ActivationsError,
    cache_generation,
    mean_activations,
    prompt_means,
    read_meta,
)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB - 1, (k,), generator=g).tolist() for k in lengths]


def _recompute(model, prompt: list[int], new: list[int]) -> list[torch.Tensor]:
    """Per layer ``[positions, d_mlp]``: ``m`` at the positions that produce ``new``, from one
    unpadded teacher-forced pass over prompt + continuation (no cache, no batching)."""
    adapter = Adapter(model)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        adapter.out_proj(layer).register_forward_pre_hook(
            lambda mod, args, layer=layer: seen.__setitem__(layer, args[0][0].detach().clone())
        )
        for layer in range(adapter.n_layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt + new]))
    finally:
        for h in hooks:
            h.remove()
    first = len(prompt) - 1
    return [seen[layer][first : first + len(new)].double() for layer in range(adapter.n_layers)]


def test_cached_means_equal_a_direct_recomputation(model, tmp_path):
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts, ids = _prompts(7), [f"p{i}" for i in range(7)]
    gen, meta = cache_generation(
        adapter,
        tok,
        prompts,
        ids,
        tmp_path / "base",
        new_tokens=6,
        batch_size=3,
        positions_dir=tmp_path / "pos",
    )
    assert meta["n_prompts"] == 7 and meta["n_layers"] == N_LAYERS and meta["d_mlp"] == D_MLP
    # The cache rides on the same generation: its tokens are plain greedy's.
    assert (
        gen.new_tokens == greedy(adapter, tok, prompts, ids, new_tokens=6, batch_size=3).new_tokens
    )
    every = {layer: [] for layer in range(N_LAYERS)}
    for layer in range(N_LAYERS):
        cached_ids, means, counts = prompt_means(tmp_path / "base", layer)
        assert sorted(cached_ids) == sorted(ids)
        per_pos = pd.read_parquet(tmp_path / "pos" / f"layer={layer:02d}")
        for row, pid in enumerate(cached_ids):
            i = ids.index(pid)
            ref = _recompute(model, prompts[i], gen.new_tokens[i])[layer]
            every[layer].append(ref)
            assert counts[row] == len(gen.new_tokens[i])
            np.testing.assert_allclose(means[row], ref.mean(0).numpy(), rtol=1e-4, atol=1e-5)
            mine = per_pos[per_pos["prompt_id"] == pid].pivot(
                index="position", columns="neuron", values="activation"
            )
            assert mine.index.tolist() == list(range(len(gen.new_tokens[i])))
            np.testing.assert_allclose(mine.to_numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)
    # The overall mean weighs every position equally, over all prompts.
    overall = mean_activations(tmp_path / "base")
    for layer in range(N_LAYERS):
        np.testing.assert_allclose(
            overall[layer], torch.cat(every[layer]).mean(0).numpy(), rtol=1e-4, atol=1e-5
        )


def test_a_finished_row_stops_counting(tmp_path):
    model = tiny_model("llama")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts, ids = _prompts(5, seed=3), [f"p{i}" for i in range(5)]
    free = greedy(adapter, tok, prompts, ids, new_tokens=8, batch_size=5)
    # Make the third token of prompt 0 the end-of-sequence token: that row stops after it.
    stop = free.new_tokens[0][2]
    model.generation_config.eos_token_id = stop
    gen, _ = cache_generation(
        adapter, tok, prompts, ids, tmp_path / "c", new_tokens=8, batch_size=5
    )
    lengths = {pid: len(t) for pid, t in zip(ids, gen.new_tokens)}
    assert lengths["p0"] == 3 and max(lengths.values()) == 8
    for layer in range(N_LAYERS):
        cached_ids, means, counts = prompt_means(tmp_path / "c", layer)
        assert dict(zip(cached_ids, counts.tolist())) == lengths
        row = cached_ids.index("p0")
        ref = _recompute(model, prompts[0], gen.new_tokens[0])[layer]
        np.testing.assert_allclose(means[row], ref.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_cache_under_a_spec_sees_the_edited_activations(tmp_path):
    model = tiny_model("gemma2")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    spec = Intervention("ablate", [ablate(1, [3, 7, 11])])
    cache_generation(
        adapter,
        tok,
        _prompts(4),
        ["a", "b", "c", "d"],
        tmp_path / "c",
        spec=spec,
        new_tokens=5,
        batch_size=2,
    )
    means = mean_activations(tmp_path / "c")
    assert (means[1, [3, 7, 11]] == 0).all() and (means[1] != 0).sum() == D_MLP - 3
    assert read_meta(tmp_path / "c")["spec"] == "ablate"


def test_plain_parquet_for_pandas_pyarrow_and_duckdb(tmp_path):
    model = tiny_model("mistral")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    ids = [f"p{i}" for i in range(6)]
    cache_generation(adapter, tok, _prompts(6), ids, tmp_path / "base", new_tokens=4, batch_size=4)
    root = tmp_path / "base"
    means = mean_activations(root)
    # pandas reads the whole folder (hive partitions; _meta.json is skipped as hidden).
    df = pd.read_parquet(root)
    assert set(df.columns) == {"prompt_id", "neuron", "activation", "n_positions", "layer"}
    assert len(df) == N_LAYERS * 6 * D_MLP
    one = pd.read_parquet(root / "layer=01")
    assert one["neuron"].dtype == np.int32 and one["activation"].dtype == np.float32
    w = one["activation"] * one["n_positions"]
    by_neuron = w.groupby(one["neuron"]).sum() / one["n_positions"].groupby(one["neuron"]).sum()
    np.testing.assert_allclose(by_neuron.to_numpy(), means[1], rtol=1e-6)
    assert pq.ParquetFile(root / "layer=00" / "part-0.parquet").metadata.num_row_groups == 2
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        f"SELECT layer, neuron, sum(activation * n_positions) / sum(n_positions) AS mbar "
        f"FROM read_parquet('{root}/layer=*/*.parquet', hive_partitioning = true) "
        "GROUP BY layer, neuron ORDER BY layer, neuron"
    ).fetchall()
    assert len(rows) == N_LAYERS * D_MLP
    np.testing.assert_allclose(
        np.array([r[2] for r in rows]).reshape(N_LAYERS, D_MLP), means, rtol=1e-6
    )
    assert json.loads((root / META).read_text())["columns"]["activation"].startswith("mean")


def test_an_interrupted_run_leaves_no_cache(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    target = tmp_path / "acts" / "base"
    calls = {"n": 0}
    original = adapter.model.forward

    def dies_in_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # batch 1 is 5 forward passes: this is mid-way through batch 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter.model, "forward", dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cache_generation(
            adapter,
            tok,
            _prompts(6),
            [str(i) for i in range(6)],
            target,
            new_tokens=5,
            batch_size=3,
            positions_dir=tmp_path / "acts" / "pos",
        )
    assert calls["n"] == 8
    assert not target.exists() and list((tmp_path / "acts").iterdir()) == []
    # The recorder's hooks went with the exception.
    assert not any(adapter.out_proj(layer)._forward_pre_hooks for layer in range(N_LAYERS))
    with pytest.raises(ActivationsError, match="does not exist"):
        read_meta(target)
    # A folder without its _meta.json (a copy cut short, a killed job) is not a cache either.
    (target / "layer=00").mkdir(parents=True)
    (target / "layer=00" / "part-0.parquet").write_bytes(b"")
    with pytest.raises(ActivationsError, match="incomplete"):
        mean_activations(target)


def test_a_rerun_replaces_the_cache_whole(tmp_path):
    model = tiny_model("gemma3")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    cache_generation(
        adapter,
        tok,
        _prompts(6),
        [str(i) for i in range(6)],
        tmp_path / "c",
        new_tokens=3,
        batch_size=6,
    )
    cache_generation(adapter, tok, _prompts(2), ["x", "y"], tmp_path / "c", new_tokens=3)
    assert read_meta(tmp_path / "c")["n_prompts"] == 2
    assert prompt_means(tmp_path / "c", 0)[1].shape == (2, D_MLP)
    with pytest.raises(ActivationsError, match="unique"):
        cache_generation(adapter, tok, _prompts(2), ["x", "x"], tmp_path / "d", new_tokens=3)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("family", ["gemma3", "olmo2"])
def test_post_norm_families_cache_the_written_activations(family, tmp_path):
    """``written`` is the mean of m times the post-MLP norm's per-token scale of the MLP output,
    at the same positions as ``activation``, in the means and in the per-position cache; the
    families without that norm store no such column and read it back as ``activation``."""
    model = tiny_model(family)
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts, ids = _prompts(3, seed=2), ["a", "b", "c"]
    gen, meta = cache_generation(
        adapter, tok, prompts, ids, tmp_path / "c", new_tokens=4, positions_dir=tmp_path / "p"
    )
    assert meta["written"] and "written" in meta["columns"]
    for layer in range(N_LAYERS):
        cached_ids, written, _ = prompt_means(tmp_path / "c", layer, written=True)
        _, plain, _ = prompt_means(tmp_path / "c", layer)
        assert not np.allclose(written, plain)
        for row, pid in enumerate(cached_ids):
            i = ids.index(pid)
            m = _recompute(model, prompts[i], gen.new_tokens[i])[layer]
            y = m.float() @ adapter.value_vectors(layer).detach()
            s = adapter.post_mlp_norm_scale(layer, y).double()
            np.testing.assert_allclose(written[row], (m * s).mean(0).numpy(), rtol=1e-4, atol=1e-6)
        per_pos = pd.read_parquet(tmp_path / "p" / f"layer={layer:02d}")
        assert "written" in per_pos.columns
    np.testing.assert_allclose(
        mean_activations(tmp_path / "c", written=True).shape, (N_LAYERS, D_MLP)
    )


def test_families_without_a_post_norm_read_written_as_the_activation(tmp_path):
    model = tiny_model("llama")
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    cache_generation(adapter, tok, _prompts(2), ["a", "b"], tmp_path / "c", new_tokens=3)
    assert not read_meta(tmp_path / "c")["written"]
    assert "written" not in pq.read_schema(tmp_path / "c" / "layer=00" / "part-0.parquet").names
    np.testing.assert_array_equal(
        mean_activations(tmp_path / "c", written=True), mean_activations(tmp_path / "c")
    )
