"""The adapter's checks on the real model (dpotox.engine.verify): every family passes, a
misread model fails naming the check, and prepare_model runs them before writing anything."""

import dataclasses
import json

import pytest
import torch
from tiny_models import ALL_FAMILIES, tiny_model, tiny_multimodal_gemma3

from dpotox.engine import arch, hooks
from dpotox.engine.arch import Adapter
from dpotox.engine.verify import CHECKS, AdapterCheckError, verify_adapter
from dpotox.sources import assets, load_prepared, prepare_model
from dpotox.sources.models import text_only

IDS = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_passes(family, dtype):
    checks = verify_adapter(Adapter(tiny_model(family).to(dtype), family), IDS)
    assert list(checks) == list(CHECKS)
    assert checks["noop_hook"] == 0.0
    if dtype == torch.float32:
        assert checks["hook_read"] < 1e-5 and checks["write_sum"] < 1e-4


def _misread(family: str, **changes) -> Adapter:
    adapter = Adapter(tiny_model(family), family)
    adapter.family = dataclasses.replace(adapter.family, **changes)
    return adapter


@pytest.mark.parametrize(
    "family, changes, check",
    [
        # Gemma-2's block normalises the MLP output: plain sum_i m_i v_i is not what it adds.
        ("gemma2", {"post_mlp_norm": None}, "write_sum"),
        # The norm's gain misread: Gemma multiplies by 1 + weight, OLMo-2 by weight.
        ("gemma2", {"norm_gain_offset": 0.0}, "write_sum"),
        ("olmo2", {"norm_gain_offset": 1.0}, "write_sum"),
        # A norm that is not there (Llama adds the MLP output as it is).
        ("llama", {"post_mlp_norm": "input_layernorm"}, "write_sum"),
        # Gate and up swapped: the recomputed activations are not the hooked ones.
        ("llama", {"key_proj": "up_proj", "up_proj": "gate_proj"}, "hook_read"),
        # Phi-3's fused projection read as if it were unfused.
        ("phi3", {"fused_gate_up": False, "up_proj": None}, "hook_read"),
    ],
)
def test_a_misread_model_fails_naming_the_check(family, changes, check):
    with pytest.raises(AdapterCheckError, match=f"adapter check '{check}' failed at layer 0"):
        verify_adapter(_misread(family, **changes), IDS)


class _DoubledValues(Adapter):
    """An adapter that reads the value vectors at twice their size (a wrong scale or layout)."""

    def value_vectors(self, layer):
        return 2 * super().value_vectors(layer)


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "gpt_neox"])
def test_wrong_value_vectors_fail_write_sum(family):
    """Also behind a post-MLP norm (Gemma-2, OLMo-2), where the contributions are
    (m_i s)(g * v_i), s the norm's scale of the MLP output."""
    with pytest.raises(AdapterCheckError, match="'write_sum' failed at layer 0"):
        verify_adapter(_DoubledValues(tiny_model(family), family), IDS)


def test_a_hook_that_moves_numbers_fails_noop(monkeypatch):
    original = hooks._NeuronHook.__call__

    def nudged(self, module, args):
        (m, *rest) = original(self, module, args)
        return (m * (1 + 1e-6), *rest)

    monkeypatch.setattr(hooks._NeuronHook, "__call__", nudged)
    with pytest.raises(AdapterCheckError, match="'noop_hook' failed"):
        verify_adapter(Adapter(tiny_model("llama")), IDS)


def _save(model, root):
    model.save_pretrained(root / "src")
    assets.gpt2_tokenizer().save_pretrained(root / "src")
    return {"source": {"kind": "local", "path": str(root / "src")}, "dtype": "float32"}


def test_prepare_model_records_the_checks(tmp_path):
    spec = {**_save(tiny_model("gpt_neox", vocab=50257), tmp_path), "family": "gpt_neox"}
    out = prepare_model("pythia-tiny", spec, tmp_path / "base")
    meta = json.loads((out / "source.json").read_text())
    assert set(meta["adapter_checks"]) == set(CHECKS)


def test_prepare_model_refuses_a_misread_model_and_writes_nothing(tmp_path, monkeypatch):
    spec = {**_save(tiny_model("gemma2", vocab=50257), tmp_path), "family": "gemma2"}
    monkeypatch.setitem(
        arch.FAMILIES, "gemma2", dataclasses.replace(arch.FAMILIES["gemma2"], post_mlp_norm=None)
    )
    with pytest.raises(AdapterCheckError, match="'write_sum' failed"):
        prepare_model("g", spec, tmp_path / "base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_multimodal_gemma3_is_prepared_as_its_text_tower(tmp_path):
    full = tiny_multimodal_gemma3(vocab=50257)
    text = text_only(full)
    assert text.config.model_type == "gemma3_text" and Adapter(text, "gemma3").n_layers == 2
    ids = torch.randint(3, 5000, (2, 9))
    with torch.no_grad():
        assert torch.equal(full(ids).logits, text(ids).logits)
    assert Adapter(text).family.name == "gemma3"
    spec = {**_save(full, tmp_path), "family": "gemma3"}
    out = prepare_model("gemma3-mm", spec, tmp_path / "base")
    meta = json.loads((out / "source.json").read_text())
    assert meta["model_type"] == "gemma3_text" and meta["family"] == "gemma3"
    assert meta["n_parameters"] == sum(p.numel() for p in text.parameters())
    model, _ = load_prepared(out)
    assert not any("vision" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, text(ids).logits, rtol=0, atol=0)
