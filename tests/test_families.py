"""The families a researcher may bring beyond the papers' (tiny_models.NEW_FAMILIES): batched
generation under a spec, the shared-prefix stacking of the sweeps, and the activation cache,
as the stage tests check them on the papers' families."""

import numpy as np
import pytest
import torch
from test_activations import _recompute
from test_generate import _prompts, _spec
from tiny_models import NEW_FAMILIES, TokenIdTokenizer, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.engine.generate import generate_many, greedy
from dpotox.engine.spec import Intervention, ScaleKeys
from dpotox.stages.activations import cache_generation, prompt_means


@pytest.fixture(params=NEW_FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_batched_under_a_spec_equals_one_at_a_time(model):
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(7)
    ids = [f"p{i}" for i in range(len(prompts))]
    batched = greedy(adapter, tok, prompts, ids, spec=_spec(), new_tokens=8, batch_size=3)
    single = [
        greedy(adapter, tok, [p], [i], spec=_spec(), new_tokens=8, batch_size=1).new_tokens[0]
        for p, i in zip(prompts, ids)
    ]
    assert batched.new_tokens == single


def test_stacked_conditions_equal_each_alone(model):
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts = _prompts(5, seed=3)
    ids = [f"p{i}" for i in range(len(prompts))]
    keys = Intervention("keys", [ScaleKeys(0, [4, 9], torch.tensor([3.0, 0.0]))])
    specs = [None, _spec(), keys]
    together = generate_many(adapter, tok, prompts, ids, specs, new_tokens=6, batch_size=5)
    for spec, got in zip(specs, together):
        alone = greedy(adapter, tok, prompts, ids, spec=spec, new_tokens=6, batch_size=5)
        assert got.new_tokens == alone.new_tokens


def test_cached_means_equal_a_recomputation(model, tmp_path):
    adapter, tok = Adapter(model), TokenIdTokenizer(model)
    prompts, ids = _prompts(4, seed=1), ["a", "b", "c", "d"]
    gen, _ = cache_generation(adapter, tok, prompts, ids, tmp_path / "c", new_tokens=4)
    for layer in range(adapter.n_layers):
        cached_ids, means, _ = prompt_means(tmp_path / "c", layer)
        for row, pid in enumerate(cached_ids):
            i = ids.index(pid)
            ref = _recompute(model, prompts[i], gen.new_tokens[i])[layer].mean(0)
            np.testing.assert_allclose(means[row], ref.numpy(), rtol=1e-4, atol=1e-5)
