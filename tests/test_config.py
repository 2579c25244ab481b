"""Config validation: defaults fill in, and each kind of bad value stops with a clear message."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpotox.errors import ConfigError
from dpotox.plan.config import load_config, load_schema, model_setting, validate_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _cfg(**changes):
    cfg = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def test_default_config_is_valid_and_filled():
    cfg = load_config(REPO / "config" / "config.yaml")
    assert list(cfg["models"]) == ["smollm2-135m"]
    assert cfg["evaluation"]["new_tokens"] == 20 and cfg["evaluation"]["prompt_tokens"] == 32
    assert cfg["dpo"]["beta"] == 0.1 and cfg["dpo"]["optimizer"] == "rmsprop"
    assert cfg["models"]["smollm2-135m"]["resources"] == {}  # fixed requests: no arch given
    assert all(isinstance(v, list) for k, v in cfg["data"].items() if v is not None)
    assert cfg["data"]["prompts"][0]["limit"] is None  # defaults reach inside sources too


def test_minimal_config_gets_every_default():
    cfg = validate_config(
        {"models": {"m": {"source": {"kind": "hub", "id": "gpt2"}, "family": "gpt2"}}}
    )
    assert cfg["seed"] == 0
    assert cfg["models"]["m"]["source"]["revision"] == "main"
    assert {"prompts", "wiki", "probe_texts", "pairs"} <= set(cfg["data"])
    assert cfg["sweeps"]["ablate_toxic"] == [100, 200, 1000]


def test_per_model_override():
    cfg = validate_config(
        _cfg(
            models={
                "a": {
                    "source": {"kind": "hub", "id": "gpt2"},
                    "family": "gpt2",
                    "dpo": {"kl_weight": 0.02},
                }
            }
        )
    )
    assert model_setting(cfg, "a", "dpo", "kl_weight") == 0.02
    assert model_setting(cfg, "a", "dpo", "beta") == 0.1


BAD = [
    # (changes, words that must appear in the message)
    ({"seed": "zero"}, ["seed", "'zero'", "integer"]),
    ({"probe__n_per_class": -5}, ["probe.n_per_class", "-5", ">= 1"]),
    ({"evaluation__new_tokens": 0}, ["evaluation.new_tokens", "0", ">= 1"]),
    ({"probe__test_fraction": 1.5}, ["probe.test_fraction", "1.5", "(0, 1)"]),
    ({"dpo__pairs__margin": -0.1}, ["dpo.pairs.margin", "-0.1", "[0, 1]"]),
    ({"sweeps__edit_probe": [[0.5, 0.2], [2, 0.1]]}, ["sweeps.edit_probe[1][0]", "2", "(0, 1]"]),
    ({"sweeps__patch_sets": ["tq"]}, ["sweeps.patch_sets[0]", "'tq'", "four-groups"]),
    ({"probe__learning_rat": 0.1}, ["unknown key", "'learning_rat'", "probe", "l2"]),
    ({"colour": "blue"}, ["unknown key", "'colour'"]),
    (
        {"models__smollm2-135m__family": "falcon"},
        ["models.smollm2-135m.family", "unknown model family", "'falcon'", "gpt2", "gemma3"],
    ),
    (
        {"models__smollm2-135m__source": {"kind": "ftp", "url": "x"}},
        ["models.smollm2-135m.source.kind", "unknown source kind", "'ftp'", "gguf-package"],
    ),
    (
        {"data__prompts": [{"kind": "s3", "path": "x"}]},
        ["data.prompts[0].kind", "unknown source kind", "'s3'", "jsonl"],
    ),
    (
        {"data__prompts": [{"kind": "jsonl", "path": "/nonexistent/prompts.jsonl"}]},
        ["data.prompts[0].path", "/nonexistent/prompts.jsonl", "does not exist"],
    ),
    (
        {"models__smollm2-135m__source": {"kind": "local", "path": "no/such/model"}},
        ["models.smollm2-135m.source.path", "no/such/model", "does not exist"],
    ),
    ({"models__smollm2-135m__source": {"kind": "hub"}}, ["models.smollm2-135m.source", "'id'"]),
    ({"models__smollm2-135m__dtype": "int4"}, ["dtype", "'int4'", "bfloat16"]),
    ({"models": {}}, ["models", "at least 1"]),
    (
        {"models": {"all-models": {"source": {"kind": "hub", "id": "gpt2"}, "family": "gpt2"}}},
        ["models", "'all-models' is not allowed", "reserved", "rename the model"],
    ),
    ({"figures__dpi": 10}, ["figures.dpi", "10", "[50, 600]"]),
    ({"toxicity__scorer": "perspective"}, ["toxicity.scorer", "'perspective'", "jigsaw-bilstm"]),
    ({"toxicity__checkpoint": "/no/such.ckpt"}, ["toxicity.checkpoint", "/no/such.ckpt"]),
    ({"dpo__batch_size": 2.5}, ["dpo.batch_size", "2.5", "integer"]),
    (
        {"data__wiki": {"kind": "embedded", "asset": "enwiki-full"}},
        ["data.wiki.asset", "'enwiki-full'", "ovos-wiki-summaries"],
    ),
    (
        {"data__prompts": [{"kind": "hub", "id": "x", "columns": {"txt": "a"}}]},
        ["data.prompts[0].columns", "txt"],
    ),
]


@pytest.mark.parametrize("changes,words", BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_bad_config_is_rejected_with_a_clear_message(changes, words):
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(**changes))
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in message:\n{msg}"


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(seed=-1, probe__max_tokens=0))
    assert "seed" in str(e.value) and "probe.max_tokens" in str(e.value)


def test_existing_local_paths_pass(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "hi"}\n')
    validate_config(_cfg(data__prompts=[{"kind": "jsonl", "path": str(f)}]))


def test_schema_defaults_obey_their_own_bounds():
    """Every default in the schema passes validation (the minimal config used them all)."""
    schema = load_schema()
    cfg = validate_config(
        {"models": {"m": {"source": {"kind": "hub", "id": "gpt2"}, "family": "gpt2"}}}, schema
    )
    validate_config(copy.deepcopy(cfg), schema)


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml", "two-models.yaml"])
def test_shipped_configs_validate(name):
    load_config(REPO / "config" / name, check_paths=False)


def test_snakemake_stops_before_any_job(tmp_path):
    """A bad value fails at parse time: the message names the key, and nothing is created."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("probe:\n  test_fraction: 2\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--cores",
            "1",
            "--configfile",
            str(REPO / "config" / "config.yaml"),
            str(bad),
            "--directory",
            str(tmp_path),
            "--snakefile",
            str(REPO / "Snakefile"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "probe.test_fraction" in out and "(0, 1)" in out
    assert not (tmp_path / "resources").exists()
