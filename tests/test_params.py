"""Rule params hold only what a rule reads (dpotox.plan.params), so that Snakemake's params
rerun trigger reruns what a config change affects and nothing else."""

import copy
import dataclasses
from pathlib import Path

import pytest

from dpotox.errors import ConfigError
from dpotox.outputs.figures import FiguresConfig
from dpotox.plan.conditions import SweepsConfig, sweep_conditions
from dpotox.plan.config import load_config
from dpotox.plan.params import READS, SKIPS, rule_params
from dpotox.stages.activations import ActivationsConfig
from dpotox.stages.dpo import DPOSettings
from dpotox.stages.evaluate import EvalConfig
from dpotox.stages.neurons import NeuronsConfig
from dpotox.stages.pairs import PairsConfig
from dpotox.stages.probe import ProbeConfig

CONFIG = Path(__file__).resolve().parents[1] / "config"
ONE = load_config(CONFIG / "config.yaml", check_paths=False)
TWO = load_config(CONFIG / "config.yaml", CONFIG / "two-models.yaml", check_paths=False)
PAPER = load_config(CONFIG / "paper.yaml", check_paths=False)
FIRST = next(iter(ONE["models"]))


@pytest.mark.parametrize("rule", READS)
def test_adding_a_model_changes_no_params_of_the_first(rule):
    assert len(TWO["models"]) == 2
    assert rule_params(ONE, rule, FIRST) == rule_params(TWO, rule, FIRST)


@pytest.mark.parametrize("rule", READS)
def test_one_models_steering_grid_changes_no_rule_params(rule):
    """A model's steer_alphas changes its sweep conditions (the sweep jobs' names and the
    sweep_specs job's conditions), never the params of its other rules or of other models."""
    changed = copy.deepcopy(TWO)
    other = [m for m in TWO["models"] if m != FIRST][0]
    changed["models"][other]["steer_alphas"] = [7.0]
    for model in TWO["models"]:
        assert rule_params(TWO, rule, model) == rule_params(changed, rule, model)
    assert sweep_conditions(changed, FIRST) == sweep_conditions(TWO, FIRST)
    assert sweep_conditions(changed, other) != sweep_conditions(TWO, other)


def _spec_settings(cfg):
    # conditions_per_job spreads the specs over jobs; it is not a setting of any spec.
    return dataclasses.replace(SweepsConfig.from_config(cfg), conditions_per_job=1)


def _eval_settings(rule):
    """EvalConfig as ``rule`` reads it: the keys SKIPS leaves out of its params at their
    defaults (the stage does not read them)."""
    skipped = [p.split(".", 1)[1] for p in SKIPS.get(rule, ()) if p.startswith("evaluation.")]

    def read(cfg):
        defaults = EvalConfig()
        return dataclasses.replace(
            EvalConfig.from_config(cfg), **{k: getattr(defaults, k) for k in skipped}
        )

    return read


@pytest.mark.parametrize("cfg", [ONE, TWO, PAPER], ids=["default", "two-models", "paper"])
def test_stages_read_the_same_settings_from_params_as_from_the_config(cfg):
    """Byte-identical outputs: each stage builds the same settings from its params."""
    for model in cfg["models"]:
        for rule, read in [
            ("train_probe", ProbeConfig.from_config),
            ("make_pairs", PairsConfig.from_config),
            ("make_pairs", _eval_settings("make_pairs")),
            ("evaluate", EvalConfig.from_config),
            ("cache_activations", ActivationsConfig.from_config),
            ("cache_activations", _eval_settings("cache_activations")),
            ("neuron_table", NeuronsConfig.from_config),
            ("sweep_specs", _spec_settings),
            ("figure", FiguresConfig.from_config),
        ]:
            assert read(rule_params(cfg, rule, model)) == read(cfg), (rule, read)
        params = rule_params(cfg, "train_dpo", model)
        assert DPOSettings.from_config(params, model) == DPOSettings.from_config(cfg, model)
        assert "pairs" not in params["dpo"]
        spec = rule_params(cfg, "prepare_model", model)["models"][model]
        assert spec["source"] == cfg["models"][model]["source"]
        assert "steer_alphas" not in spec and "device" not in spec


def test_an_unknown_rule_is_named():
    with pytest.raises(ConfigError, match="rule 'nope' has no entry"):
        rule_params(ONE, "nope")
