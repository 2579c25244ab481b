"""Interventions as data: every edit does what it says, for every family, and leaves no trace."""

import json

import pytest
import torch
from tiny_models import ALL_FAMILIES, D_MLP, D_MODEL, N_LAYERS, tiny_model

from dpotox.engine.arch import Adapter
from dpotox.engine.hooks import applied
from dpotox.engine.spec import (
    AddResidual,
    Intervention,
    InterventionError,
    ScaleKeys,
    ScaleNeurons,
    SetNeurons,
    ablate,
    sidecar_path,
)

IDS = torch.tensor([[5, 17, 99, 3, 42, 7], [8, 1, 250, 33, 2, 9]])


# The hook engine on every family the adapter knows (its tests are cheap).
@pytest.fixture(params=ALL_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def _all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _composite() -> Intervention:
    g = torch.Generator().manual_seed(1)
    return Intervention(
        "mix",
        [
            SetNeurons(0, [1, 5, 9], torch.tensor([0.5, -1.0, 2.0])),
            ablate(1, [0, 2, 4], where="all"),
            ScaleNeurons(1, [10, 11], torch.tensor([3.0, -0.5])),
            AddResidual(0, torch.randn(D_MODEL, generator=g), alpha=-2.0),
            ScaleKeys(1, [3, 7], torch.tensor([10.0, 5.0])),
        ],
        "every kind of edit",
    )


def _capture_m(adapter, layer, ctx_phase=None, spec=None, ids=IDS, prompt_ids=None):
    """m at the hook point, as the output projection receives it, under ``spec``."""
    seen = {}
    with applied(adapter, spec, prompt_ids=prompt_ids) as ctx:
        if ctx_phase:
            ctx.phase = ctx_phase
        ctx.prompt_ids = prompt_ids
        h = adapter.out_proj(layer).register_forward_pre_hook(
            lambda mod, args: seen.__setitem__("m", args[0].clone())
        )
        try:
            with torch.no_grad():
                logits = adapter.model(ids).logits
        finally:
            h.remove()
    return seen["m"], logits


def test_no_hooks_and_identical_weights_afterwards(model, family):
    adapter = Adapter(model)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    n_hooks = _all_hooks(model)
    with torch.no_grad():
        base = model(IDS).logits
    with applied(adapter, _composite()):
        assert _all_hooks(model) > n_hooks
        with torch.no_grad():
            edited = model(IDS).logits
    assert not torch.allclose(base, edited)
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the block cleans up too
        with applied(adapter, _composite()):
            raise RuntimeError("boom")
    assert _all_hooks(model) == n_hooks
    after = model.state_dict()
    for k, (v, ptr) in before.items():
        assert torch.equal(after[k], v) and after[k].data_ptr() == ptr, k
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base)


def test_set_and_scale_act_where_they_say(model):
    adapter = Adapter(model)
    m0, _ = _capture_m(adapter, 1)
    spec = Intervention(
        "s",
        [
            SetNeurons(1, [2, 3], torch.tensor([7.0, -7.0])),
            ScaleNeurons(1, [3, 4], torch.tensor([2.0, 0.5])),
        ],
    )
    # prefill with "generation": only the last position; set then scale, in list order
    m, _ = _capture_m(adapter, 1, "prefill", spec)
    assert torch.equal(m[:, :-1], m0[:, :-1])
    assert torch.allclose(m[:, -1, 2], torch.tensor(7.0)) and torch.allclose(
        m[:, -1, 3], torch.tensor(-14.0)
    )
    assert torch.allclose(m[:, -1, 4], m0[:, -1, 4] * 0.5)
    others = [i for i in range(D_MLP) if i not in (2, 3, 4)]
    assert torch.equal(m[:, -1, others], m0[:, -1, others])
    # every position when decoding or scoring; position 0 only for the reference quirk
    for phase in ("decode", "all"):
        m, _ = _capture_m(adapter, 1, phase, spec)
        assert torch.allclose(m[..., 2], torch.full_like(m[..., 2], 7.0))
    m, _ = _capture_m(adapter, 1, "first", spec)
    assert torch.allclose(m[:, 0, 2], torch.tensor(7.0)) and torch.equal(m[:, 1:], m0[:, 1:])


def test_per_prompt_values_follow_the_prompt_ids(model):
    adapter = Adapter(model)
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    spec = Intervention(
        "pp", [SetNeurons(0, [8, 9], values, prompt_ids=["a", "b", "c"], where="all")]
    )
    assert spec.per_prompt
    m, _ = _capture_m(adapter, 0, "all", spec, prompt_ids=["c", "a"])
    assert torch.allclose(m[0, :, 8:10], values[2].expand(IDS.shape[1], 2))
    assert torch.allclose(m[1, :, 8:10], values[0].expand(IDS.shape[1], 2))
    with pytest.raises(InterventionError, match="'zz'"):
        with applied(adapter, spec, prompt_ids=["a", "zz"]):
            pass
    assert _all_hooks(model) == 0


def test_steering_adds_the_vector_to_the_residual(model):
    adapter = Adapter(model)
    vec = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
    for layer, nxt in ((0, adapter.layer(1)), (N_LAYERS - 1, adapter.final_norm())):
        seen = []
        h = nxt.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
        try:
            with torch.no_grad():
                model(IDS)
                with applied(adapter, Intervention("st", [AddResidual(layer, vec, alpha=-1.5)])):
                    model(IDS)
        finally:
            h.remove()
        assert torch.allclose(seen[1] - seen[0], -1.5 * vec.expand_as(seen[0]), atol=1e-5)


def test_scale_keys_scales_what_the_neuron_reads(model):
    adapter = Adapter(model)
    seen = {}
    h = adapter.mlp(1).register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("x", args[0].clone())
    )
    try:
        m, _ = _capture_m(adapter, 1, "all", Intervention("k", [ScaleKeys(1, [3, 7], [10.0, 5.0])]))
    finally:
        h.remove()
    keys = adapter.key_vectors(1).detach().clone()
    keys[[3, 7]] *= torch.tensor([[10.0], [5.0]])
    k = seen["x"] @ keys.T
    if adapter.key_bias(1) is not None:
        k = k + adapter.key_bias(1)
    expect = adapter.activation_fn(1)(k)
    if adapter.up_vectors(1) is not None:
        expect = expect * (seen["x"] @ adapter.up_vectors(1).T)
    assert torch.allclose(m, expect, atol=1e-5)


def test_identity_edits_change_nothing(model):
    adapter = Adapter(model)
    _, base = _capture_m(adapter, 0)
    spec = Intervention(
        "id",
        [
            ScaleNeurons(0, list(range(D_MLP)), 1.0, where="all"),
            AddResidual(1, torch.zeros(D_MODEL)),
        ],
    )
    _, out = _capture_m(adapter, 0, "all", spec)
    assert torch.equal(out, base)


def test_json_round_trip_inline_and_sidecar(tmp_path):
    spec = _composite()
    spec.edits.append(
        SetNeurons(1, list(range(D_MLP)), torch.randn(3, D_MLP), prompt_ids=["x", "y", "z"])
    )
    for limit, sidecar in ((10_000, False), (8, True)):
        path = spec.save(tmp_path / f"s{limit}.json", inline_limit=limit)
        assert sidecar_path(path).exists() == sidecar
        back = Intervention.load(path)
        assert back.to_dict() == spec.to_dict()
    data = json.loads((tmp_path / "s8.json").read_text())
    assert data["edits"][-1]["values"]["tensor"] == "edits.5.values"
    sidecar_path(tmp_path / "s8.json").unlink()
    with pytest.raises(InterventionError, match="sidecar"):
        Intervention.load(tmp_path / "s8.json")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            SetNeurons(N_LAYERS, [0], 1.0),
            f"layer {N_LAYERS} is out of range; the model has {N_LAYERS} layers",
        ),
        (SetNeurons(-1, [0], 1.0), "layer -1 is out of range"),
        (ablate(0, [D_MLP]), f"neuron {D_MLP} is out of range; layer 0 has {D_MLP} neurons"),
        (ablate(0, [-3]), "neuron -3 is out of range"),
        (ablate(0, [1, 1]), "listed twice"),
        (ScaleNeurons(0, [1, 2], [1.0, 2.0, 3.0]), "2 neurons but values of shape"),
        (AddResidual(0, torch.zeros(D_MODEL + 1)), f"expected \\({D_MODEL},\\)"),
        (ScaleKeys(0, [1], [float("nan")]), "NaN or infinity"),
        (
            SetNeurons(0, [1, 2], torch.zeros(2, 3), prompt_ids=["a", "b"]),
            "per-prompt values have shape",
        ),
    ],
)
def test_bad_specs_are_refused_before_anything_is_applied(model, edit, message):
    adapter = Adapter(model)
    with pytest.raises(InterventionError, match=message) as err:
        with applied(adapter, Intervention("bad", [ablate(0, [1]), edit])):
            pass
    assert "intervention 'bad' edit 1" in str(err.value)
    assert _all_hooks(model) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("[", "not valid JSON"),
        ('{"edits": []}', "'name' and a list 'edits'"),
        (
            '{"name": "x", "edits": [{"op": "zap", "layer": 0}]}',
            "'op' must be one of set, scale, add",
        ),
        ('{"name": "x", "edits": [{"op": "set", "layer": 0}]}', "edit 0 \\(set\\)"),
        (
            '{"name": "x", "edits": [{"op": "add", "layer": 0, "vector": [1], "where": "here"}]}',
            "where must be one of all, generation",
        ),
    ],
)
def test_malformed_spec_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "spec.json"
    path.write_text(text)
    with pytest.raises(InterventionError, match=message):
        Intervention.load(path)
    with pytest.raises(InterventionError, match="does not exist"):
        Intervention.load(tmp_path / "missing.json")


def test_composition_keeps_every_edit():
    a, b = Intervention("a", [ablate(0, [1])]), Intervention("b", [ScaleKeys(1, [2], 2.0)])
    both = a + b
    assert both.name == "a+b" and [e.op for e in both.edits] == ["set", "scale_keys"]
