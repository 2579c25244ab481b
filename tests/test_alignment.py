"""Alignment methods and seeds (dpotox.plan.alignment): run names, the settings each method
trains with, what the rules pass, and the config errors; no training here (test_dpo.py and
test_methods.py train)."""

from pathlib import Path

import pytest

from dpotox.errors import ConfigError
from dpotox.plan.alignment import alignment_run, alignment_runs, trained_method, training_config
from dpotox.plan.conditions import ModelRun, parse, runs_dpo_model
from dpotox.plan.config import load_config
from dpotox.plan.params import rule_params
from dpotox.plan.training import DPOSettings

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "dpo": {},
    "ipo": {"trainer": "dpo", "loss_type": "ipo"},
    "kto": {"trainer": "kto", "beta": 0.2},
    "simpo": {"trainer": "cpo", "loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0},
}


def cfg(methods=None, seeds=None, seed=0, dpo=None):
    out = {"seed": seed, "models": {"m": {}}, "dpo": dpo or {"learning_rate": 1e-5}}
    if methods is not None or seeds is not None:
        out["alignment"] = {"methods": methods or {"dpo": {}}, "seeds": seeds or {}}
    return out


def test_runs_are_named_dpo_then_each_method_and_seed():
    runs = alignment_runs(cfg(METHODS, {"dpo": [2, 1], "kto": [5]}, seed=3))
    assert [(r.name, r.method, r.seed, r.trainer) for r in runs] == [
        ("dpo", "dpo", 3, "dpo"),
        ("align-dpo-seed1", "dpo", 1, "dpo"),
        ("align-dpo-seed2", "dpo", 2, "dpo"),
        ("align-ipo", "ipo", 3, "dpo"),
        ("align-kto", "kto", 3, "kto"),
        ("align-kto-seed5", "kto", 5, "kto"),
        ("align-simpo", "simpo", 3, "cpo"),
    ]
    assert [r.folder for r in runs[:3]] == ["dpo", "align/dpo-seed1", "align/dpo-seed2"]
    # Without an alignment section: the papers' DPO alone.
    assert [r.name for r in alignment_runs(cfg())] == ["dpo"]


def test_run_names_are_conditions_on_their_own_models():
    for name in ("align-kto", "align-dpo-seed1", "dpo", "base"):
        c = parse(name)
        assert isinstance(c, ModelRun) and str(c) == name
        assert c.aligned == (name != "base")
    assert runs_dpo_model("dpo") and not runs_dpo_model("align-kto")
    assert not parse("patch-four-groups").on_dpo_model


@pytest.mark.parametrize(
    "methods, seeds, message",
    [
        ({"kto": {"trainer": "kto"}}, {}, r"'alignment\.methods' must name the method 'dpo'"),
        ({"dpo": {}, "K-TO": {}}, {}, r"'alignment\.methods\.K-TO': a method's name is lower"),
        ({"dpo": {}, "x": {"trainer": "ppo"}}, {}, r"'alignment\.methods\.x\.trainer': got 'ppo'"),
        ({"dpo": {"trainer": "kto"}}, {}, r"'alignment\.methods\.dpo\.trainer' must be dpo"),
        ({"dpo": {}}, {"kto": [1]}, r"'alignment\.seeds\.kto': no such method"),
        ({"dpo": {}}, {"dpo": [0, 1]}, r"'alignment\.seeds\.dpo' lists the top-level seed 0"),
    ],
)
def test_bad_alignment_sections_name_the_key(methods, seeds, message):
    with pytest.raises(ConfigError, match=message):
        alignment_runs(cfg(methods, seeds))


def test_each_method_trains_with_the_shared_settings_and_its_own():
    c = cfg(METHODS, dpo={"learning_rate": 1e-5, "beta": 0.3, "kl_weight": 0.07, "epochs": 3})
    dpo = DPOSettings.from_config(c, "m")
    assert (dpo.trainer, dpo.loss_type, dpo.beta, dpo.kl_weight) == ("dpo", "sigmoid", 0.3, 0.07)
    ipo = DPOSettings.from_config(c, "m", "ipo")
    assert (ipo.loss_type, ipo.beta, ipo.kl_weight, ipo.epochs) == ("ipo", 0.3, 0.07, 3)
    kto = DPOSettings.from_config(c, "m", "kto")
    # Another trainer takes the shared settings only: not DPO's beta or KL term.
    assert (kto.trainer, kto.loss_type, kto.beta, kto.kl_weight) == ("kto", "kto", 0.2, 0.0)
    assert (kto.learning_rate, kto.epochs) == (1e-5, 3)
    simpo = DPOSettings.from_config(c, "m", "simpo")
    assert (simpo.trainer, simpo.loss_type, simpo.cpo_alpha, simpo.beta) == ("cpo", "simpo", 0, 2)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"trainer": "kto", "kl_weight": 0.1},
            r"alignment\.methods\.x\.kl_weight: only trainer dpo",
        ),
        ({"trainer": "dpo", "simpo_gamma": 1}, r"methods\.x\.simpo_gamma: only trainer cpo"),
        ({"trainer": "cpo", "desirable_weight": 2}, r"x\.desirable_weight: only trainer kto"),
        ({"trainer": "cpo", "loss_type": "kto"}, r"'alignment\.methods\.x\.loss_type': got 'kto'"),
        ({"trainer": "dpo", "lr": 1.0}, r"unknown key\(s\) 'lr' under 'alignment\.methods\.x'"),
        ({"trainer": "orpo", "beta": -1}, r"'alignment\.methods\.x\.beta': got -1"),
    ],
)
def test_bad_method_settings_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        DPOSettings.from_config(cfg({"dpo": {}, "x": entry}), "m", "x")


def test_a_bad_method_stops_the_config_before_any_job(tmp_path):
    extra = tmp_path / "bad.yaml"
    extra.write_text("alignment:\n  methods:\n    dpo: {}\n    x: {trainer: cpo, loss_type: kto}\n")
    with pytest.raises(ConfigError, match=r"method 'x', model 'smollm2-135m'.*loss_type"):
        load_config(REPO / "config" / "config.yaml", extra, check_paths=False)
    extra.write_text("alignment:\n  seeds: {dpo: [0]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "config" / "config.yaml", extra, check_paths=False)
    assert "\n  - config key 'alignment.seeds.dpo' lists the top-level seed 0" in str(err.value)


def test_adding_methods_or_seeds_does_not_retrain_dpo():
    """What rule train_dpo passes (its params: a change reruns the job) is the same with and
    without other methods and seeds in the config."""
    base = load_config(REPO / "config" / "config.yaml", check_paths=False)
    more = load_config(
        REPO / "config" / "config.yaml", REPO / "config" / "methods.yaml", check_paths=False
    )

    def params(c, run):
        return training_config(c, "smollm2-135m", run)

    # Exactly what train_dpo passed before there were methods: its existing models stay.
    assert params(base, "dpo") == rule_params(base, "train_dpo", "smollm2-135m")
    assert params(base, "dpo") == params(more, "dpo")
    assert trained_method(params(more, "dpo")) == "dpo"
    assert trained_method(params(more, "align-kto")) == "kto"
    seed1 = params(more, "align-dpo-seed1")
    assert seed1["seed"] == 1 and "alignment" not in seed1
    assert params(more, "align-kto")["alignment"] == {
        "methods": {"kto": more["alignment"]["methods"]["kto"]}
    }
    # The job rebuilds the run's settings from what it was passed.
    s = DPOSettings.from_config(params(more, "align-simpo"), "smollm2-135m", "simpo")
    assert (s.trainer, s.loss_type, s.learning_rate) == ("cpo", "simpo", 1e-5)
    with pytest.raises(ConfigError, match="no alignment run 'align-ppo'.*it has dpo"):
        alignment_run(more, "align-ppo")
    # A change to DPO's own settings (beta, the KL term) retrains DPO's runs, not the others.
    changed = {**more, "dpo": {**more["dpo"], "beta": 0.5, "kl_weight": 0.2}}
    assert params(changed, "align-orpo") == params(more, "align-orpo")
    assert params(changed, "align-ipo") != params(more, "align-ipo")
    assert params(changed, "align-dpo-seed1") != params(more, "align-dpo-seed1")
