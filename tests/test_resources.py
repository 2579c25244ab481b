"""Cluster requests computed from model sizes (dpotox.plan.resources): exact parameter counts on the
meta device, GPU counts that follow memory, overrides, and errors that name the fix."""

import copy
from pathlib import Path

import pytest
import yaml
from tiny_models import FAMILIES, tiny_model

from dpotox.errors import ConfigError
from dpotox.plan.config import load_config
from dpotox.plan.resources import FALLBACK, GPU_RULES, model_size, requests, rule_work

REPO = Path(__file__).resolve().parents[1]
PAPER = load_config(REPO / "config" / "paper.yaml", check_paths=False)
# The published sizes of the papers' models (their model cards).
PAPER_PARAMS = {
    "gpt2-medium": 354_823_168,
    "llama-3.1-8b": 8_030_261_248,
    "gemma-2-2b": 2_614_341_888,
    "mistral-7b": 7_241_732_096,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_of_every_family_is_exact(family):
    model = tiny_model(family)
    arch = {
        k: v
        for k, v in model.config.to_diff_dict().items()
        if k not in ("model_type", "transformers_version", "architectures", "dtype")
    }
    size = model_size(family, arch)
    assert size.n_params == sum(p.numel() for p in model.parameters())
    assert size.n_layers == 2 and size.vocab == model.config.vocab_size


def test_paper_models_have_their_published_sizes():
    for name, n in PAPER_PARAMS.items():
        m = PAPER["models"][name]
        assert model_size(m["family"], m["arch"]).n_params == n, name


def test_paper_requests_follow_memory():
    llama = {r: requests(r, "llama-3.1-8b", PAPER) for r in (*GPU_RULES, "neuron_table")}
    # DPO state of 8B parameters (12 bytes each, plus the bf16 reference) needs two 80 GB GPUs.
    assert llama["train_dpo"]["gpu"] == 2 and llama["train_dpo"]["gpu_mem_mb"] <= 72000
    assert all(llama[r]["gpu"] == 1 for r in GPU_RULES if r != "train_dpo")
    assert llama["evaluate"]["gpu_mem_mb"] > 16000  # the bf16 weights alone are 16 GB
    assert llama["neuron_table"]["gpu"] == 0 and llama["neuron_table"]["mem_mb"] >= 32000
    for name in PAPER_PARAMS:
        r = requests("train_dpo", name, PAPER)
        assert 30 <= r["runtime"] <= 2880 and r["mem_mb"] >= 8000
    assert requests("train_dpo", "gpt2-medium", PAPER)["gpu"] == 1
    # A larger GPU takes the 8B model's DPO on one.
    big = copy.deepcopy(PAPER)
    big["cluster"]["gpu_mem_gb"] = 141
    assert requests("train_dpo", "llama-3.1-8b", big)["gpu"] == 1
    # Longer jobs for more work.
    more = copy.deepcopy(PAPER)
    more["dpo"]["epochs"] *= 4
    assert requests("train_dpo", "llama-3.1-8b", more)["runtime"] > llama["train_dpo"]["runtime"]


def test_sweep_jobs_stack_conditions():
    cfg = copy.deepcopy(PAPER)
    one = rule_work("sweep", cfg)
    cfg["sweeps"]["conditions_per_job"] = 8
    eight = rule_work("sweep", cfg)
    assert eight.tokens == 8 * one.tokens
    assert eight.rows == min(cfg["evaluation"]["stack_rows"], 8 * cfg["evaluation"]["batch_size"])
    assert eight.decode_steps < 8 * one.decode_steps  # stacked rows share decoding steps


def test_overrides_cpu_models_and_models_without_size():
    cfg = copy.deepcopy(PAPER)
    cfg["models"]["llama-3.1-8b"]["resources"] = {"runtime": 5000, "cpus_per_task": 16}
    r = requests("train_dpo", "llama-3.1-8b", cfg)
    assert r["runtime"] == 5000 and r["cpus_per_task"] == 16 and r["gpu"] == 2
    cfg["models"]["llama-3.1-8b"]["device"] = "cpu"
    assert requests("evaluate", "llama-3.1-8b", cfg)["gpu"] == 0
    default = load_config(REPO / "config" / "config.yaml")
    assert requests("train_dpo", "smollm2-135m", default) == FALLBACK


def test_impossible_or_unknown_requests_name_the_fix():
    cfg = copy.deepcopy(PAPER)
    cfg["cluster"]["gpu_mem_gb"] = 8
    with pytest.raises(ConfigError, match=r"train_dpo.*'llama-3.1-8b'.*cluster.gpu_mem_gb"):
        requests("train_dpo", "llama-3.1-8b", cfg)
    with pytest.raises(ConfigError, match="no resource model for rule 'tables'"):
        rule_work("tables", PAPER)
    with pytest.raises(ConfigError, match="cannot build a llama model.*config.json"):
        model_size("llama", {"hidden_size": 4096, "num_attention_heads": 5})


def test_fsdp_launch_config_is_valid_for_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "config" / "accelerate" / "fsdp.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type == "FSDP" and cfg.mixed_precision == "bf16"
    assert (
        yaml.safe_load(path.read_text())["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    )


def test_sizes_are_counted_once_and_kept(tmp_path, monkeypatch):
    """Each cluster job parses the Snakefile: the second count of a model is read back (keyed
    by family, arch and transformers version), without building the model again."""
    import json

    from dpotox.plan.resources import _size, size_cache

    monkeypatch.setenv("DPOTOX_CACHE", str(tmp_path))
    assert size_cache() == tmp_path / "model_sizes.json"
    arch = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
    }
    _size.cache_clear()
    try:
        first = model_size("llama", arch)
        kept = json.loads(size_cache().read_text())
        (key,) = kept
        assert key.startswith("llama ") and "transformers==" in key
        assert kept[key]["n_params"] == first.n_params
        kept[key]["n_params"] = 7  # what a later process finds is what it uses
        size_cache().write_text(json.dumps(kept))
        _size.cache_clear()
        assert model_size("llama", arch).n_params == 7
        size_cache().write_text("{not json")  # a damaged file is counted again and rewritten
        _size.cache_clear()
        assert model_size("llama", arch) == first
        assert json.loads(size_cache().read_text())[key]["n_params"] == first.n_params
    finally:
        _size.cache_clear()
