"""The architecture adapter: one hook point reads every neuron, and the MLP is sum_i m_i v_i."""

import pytest
import torch
from tiny_models import ALL_FAMILIES, D_MLP, D_MODEL, N_LAYERS, tiny_model
from torch import nn

from dpotox.engine.arch import SUPPORTED, Adapter, family_of
from dpotox.errors import UnsupportedModelError


# Every family the adapter knows, not only those the slower stage tests run on (conftest).
@pytest.fixture(params=ALL_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def test_every_supported_family_has_a_tiny_model():
    assert set(ALL_FAMILIES) == set(SUPPORTED)


def _capture(adapter: Adapter, layer: int, ids: torch.Tensor):
    """Run the model; return the MLP input, the out-projection input (m) and the MLP output."""
    seen = {}
    hooks = [
        adapter.mlp(layer).register_forward_pre_hook(
            lambda mod, args: seen.__setitem__("x", args[0])
        ),
        adapter.out_proj(layer).register_forward_pre_hook(
            lambda mod, args: seen.__setitem__("m", args[0])
        ),
        adapter.mlp(layer).register_forward_hook(
            lambda mod, args, out: seen.__setitem__("out", out)
        ),
    ]
    try:
        with torch.no_grad():
            adapter.model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen["x"], seen["m"], seen["out"]


def test_shapes(model, family):
    a = Adapter(model, family)
    assert a.family.name == family
    assert (a.n_layers, a.d_mlp, a.d_model) == (N_LAYERS, D_MLP, D_MODEL)
    assert a.key_vectors(0).shape == (D_MLP, D_MODEL)
    assert a.input_embedding().shape[1] == D_MODEL
    assert a.unembedding().shape[1] == D_MODEL
    assert isinstance(a.final_norm(), nn.Module)
    if family in ("gpt2", "gpt_neox"):
        assert a.up_vectors(0) is None and a.out_bias(0) is not None
    else:
        assert a.up_vectors(0).shape == (D_MLP, D_MODEL)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_mlp_output_is_sum_of_value_vectors(model, family, layer):
    a = Adapter(model, family)
    ids = torch.randint(3, 200, (2, 7))
    x, m, out = _capture(a, layer, ids)
    assert m.shape == (2, 7, D_MLP)
    recon = torch.einsum("bti,id->btd", m, a.value_vectors(layer))
    if a.out_bias(layer) is not None:
        recon = recon + a.out_bias(layer)
    torch.testing.assert_close(recon, out, atol=1e-5, rtol=0)
    # The value vectors really are per-neuron writes: neuron 5 alone writes m_5 * v_5.
    v5 = a.value_vectors(layer)[5]
    single = torch.zeros_like(m)
    single[..., 5] = m[..., 5]
    direct = a.out_proj(layer)(single) - (a.out_bias(layer) if a.out_bias(layer) is not None else 0)
    torch.testing.assert_close(direct, m[..., 5:6] * v5, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_hooked_activations_equal_recomputation(model, family, layer):
    a = Adapter(model, family)
    ids = torch.randint(3, 200, (3, 5))
    x, m, _ = _capture(a, layer, ids)
    with torch.no_grad():
        torch.testing.assert_close(a.activations_from_input(layer, x), m, atol=1e-5, rtol=0)


def test_value_vectors_are_views(model, family):
    """Writes through value_vectors reach the weights (weight edits in later stages rely on it)."""
    a = Adapter(model, family)
    assert a.value_vectors(0).data_ptr() == a.out_proj(0).weight.data_ptr()
    assert a.key_vectors(0).data_ptr() == a.key_proj(0).weight.data_ptr()


def test_unsupported_family_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        family_of("falcon")
    for name in SUPPORTED:
        assert name in str(e.value)


def test_family_mismatch_is_reported(model, family):
    other = "llama" if family != "llama" else "gpt2"
    with pytest.raises(UnsupportedModelError, match=f"family {other!r}"):
        Adapter(model, other)


def test_hook_point_writes_activations(model, family):
    """Replacing m at the hook point changes the MLP output by exactly (m' - m) v."""
    a = Adapter(model, family)
    ids = torch.randint(3, 200, (2, 6))
    _, m, out = _capture(a, 1, ids)
    new_m = m.clone()
    new_m[..., 7] = 3.0  # patch one neuron to a fixed value at every position
    new_m[..., 11] = 0.0  # ablate another
    h = a.out_proj(1).register_forward_pre_hook(lambda mod, args: (new_m,))
    try:
        _, _, patched = _capture(a, 1, ids)
    finally:
        h.remove()
    v = a.value_vectors(1)
    expected = out + (new_m - m)[..., [7, 11]] @ v[[7, 11]]
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=0)


def test_phi3_key_vectors_are_the_gate_half_of_the_fused_projection():
    a = Adapter(tiny_model("phi3"), "phi3")
    fused = a.key_proj(0).weight  # [2 d_mlp, d_model]: gate rows, then up rows
    assert fused.shape == (2 * D_MLP, D_MODEL)
    assert torch.equal(a.key_vectors(0), fused[:D_MLP]) and torch.equal(
        a.up_vectors(0), fused[D_MLP:]
    )
    with torch.no_grad():
        a.key_vectors(0)[3] *= 2  # what key scaling does: the gate row only
    assert torch.equal(a.key_proj(0).weight[D_MLP + 3], fused[D_MLP + 3])


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("mixtral", "mixture of experts"),
        ("qwen2_moe", "mixture of experts"),
        ("olmoe", "mixture of experts"),
    ],
)
def test_models_refused_with_their_reason(model_type, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        family_of(model_type)


class _Keep:
    """A recorder that keeps each layer's activations and post-MLP norm scale."""

    def __init__(self) -> None:
        self.m: dict[int, torch.Tensor] = {}
        self.scale: dict[int, torch.Tensor | None] = {}

    def start(self, ctx) -> None:
        pass

    def record(self, layer, m, ctx, scale=None) -> None:
        self.m[layer], self.scale[layer] = m.detach().clone(), scale

    def finish(self, ctx) -> None:
        pass


def test_recorded_contributions_sum_to_the_residual_increment(model, family):
    """The neuron table's decomposition, every family: what the hook engine records
    (``m``, times the post-MLP norm's scale where there is one) times the written vectors
    (value vectors, times the norm's gain) sums to what the layer adds to the residual stream
    through its MLP; the bias term is scaled alike."""
    from dpotox.engine.hooks import Hooks

    a = Adapter(model, family)
    ids = torch.randint(3, 200, (2, 6))
    increments: dict[int, torch.Tensor] = {}
    rec = _Keep()
    handles = []
    for layer in range(a.n_layers):
        # What joins the residual stream: the post-MLP norm's output, else the MLP's.
        where = a.post_mlp_norm(layer) if a.post_mlp_norm(layer) is not None else a.mlp(layer)
        handles.append(
            where.register_forward_hook(
                lambda mod, args, out, layer=layer: increments.__setitem__(layer, out.detach())
            )
        )
    try:
        with torch.no_grad(), Hooks(a, None, recorder=rec).attached() as ctx:
            ctx.phase = "all"
            a.model(ids)
    finally:
        for h in handles:
            h.remove()
    for layer in range(a.n_layers):
        m, scale = rec.m[layer].float(), rec.scale[layer]
        assert (scale is None) == (a.post_mlp_norm(layer) is None)
        s = scale if scale is not None else torch.ones_like(m[..., :1])
        recon = (m * s) @ a.written_vectors(layer).float()
        bias = a.out_bias(layer)
        if bias is not None:
            gain = a.post_mlp_norm_gain(layer)
            recon = recon + s * (bias * (gain if gain is not None else 1.0)).float()
        torch.testing.assert_close(recon, increments[layer].float(), atol=1e-5, rtol=1e-4)


def test_final_norm_gain(model, family):
    """Gemma's norms multiply by 1 + weight, OLMo-1's final LayerNorm has no gain, the others
    multiply by their weight."""
    a = Adapter(model, family)
    gain = a.final_norm_gain()
    if family == "olmo":
        assert gain is None
        return
    weight = a.final_norm().weight
    offset = 1.0 if family in ("gemma", "gemma2", "gemma3") else 0.0
    torch.testing.assert_close(gain, weight + offset)


def test_logit_lens_goes_through_the_final_norms_gain():
    from dpotox.stages.probe import top_tokens_batch

    class Tok:
        def decode(self, ids):
            return str(ids[0])

    a = Adapter(tiny_model("llama"), "llama")
    with torch.no_grad():
        a.final_norm().weight.copy_(torch.linspace(0.1, 3.0, D_MODEL))
    v = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(0))
    emb = a.unembedding().detach()
    want = torch.topk((v * a.final_norm().weight.detach()) @ emb.T, 5, dim=1).indices
    got = top_tokens_batch(a, Tok(), v, 5)
    assert [[int(t) for t, _ in row] for row in got] == want.tolist()
    raw = top_tokens_batch(a, Tok(), v, 5, final_gain=False)
    assert [[int(t) for t, _ in row] for row in raw] == torch.topk(
        v @ emb.T, 5, dim=1
    ).indices.tolist()
    assert got != raw  # a gain that is not uniform changes the ranking
