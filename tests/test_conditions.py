"""Condition names: the one parser and formatter (dpotox.plan.conditions)."""

from pathlib import Path

import pytest

from dpotox.plan.conditions import (
    Ablation,
    Editing,
    KeyScaling,
    ModelRun,
    Patching,
    Steering,
    SweepError,
    chunks,
    parse,
    runs_dpo_model,
    spec_conditions,
    sweep_conditions,
    toxic_ablation,
    try_parse,
)
from dpotox.plan.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "config"
NAMES = {
    "base": ModelRun("base"),
    "dpo": ModelRun("dpo"),
    "ablate-toxic-200": Ablation(200),
    "ablate-toxic-pos-1000": Ablation(1000, positive=True),
    "dpo-scale-keys-top7-x2.5": KeyScaling(7, 2.5),
    "patch-toxic-256": Patching("toxic-256"),
    "patch-toxic-interpretable": Patching("toxic-interpretable"),
    "patch-tp-an-tn": Patching("tp-an-tn"),
    "patch-four-groups-per-prompt": Patching("four-groups", per_prompt=True),
    "patch-all": Patching("all"),
    "steer-probe-a120": Steering(120),
    "steer-probe-a0.5": Steering(0.5),
    "edit-probe-act-b0.8-a0.2": Editing("probe", "act", 0.8, 0.2),
    "edit-free-cos-b1e-05-a3": Editing("free", "cos", 1e-5, 3),
}


@pytest.mark.parametrize("name", NAMES)
def test_parse_and_format_round_trip(name):
    assert parse(name) == NAMES[name]
    assert str(NAMES[name]) == NAMES[name].name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ablate-toxic-",
        "ablate-toxic-1.5",
        "patch-toxic-",
        "patch-nonsense",
        "steer-probe-a",
        "edit-probe-abs-b0.5-a1",
        "edit-probe-cos-b0.5",
        "dpo-scale-keys-x2",
        "base-per-prompt",
        "my-own-spec",
    ],
)
def test_unknown_names_are_refused_with_the_grammar(name):
    with pytest.raises(SweepError, match=r"unknown condition.*ablate-toxic-\[pos-\]\[gen-\]N"):
        parse(name)
    assert try_parse(name) is None


def test_model_and_parameters():
    assert [
        parse(n).on_dpo_model for n in ("dpo", "dpo-scale-keys-top7-x2", "base", "patch-tp")
    ] == [True, True, False, False]
    assert Patching("toxic-128").toxic_top == 128 and Patching("tp").toxic_top is None
    assert Patching("tp", per_prompt=True).means == Patching("tp")
    assert Editing("probe", "cos", 0.5, 2).method == "edit-probe-cos"
    assert parse("edit-probe-cos-b0.5-a2").numbers == (0.5, 2.0)
    assert toxic_ablation("ablate-toxic-100") and not toxic_ablation("ablate-toxic-pos-100")
    assert not toxic_ablation("whatever") and not toxic_ablation("ablate-toxic-gen-100")
    # Ablation zeroes the value vectors (every position) unless named -gen-.
    assert parse("ablate-toxic-100").where == "all"
    assert parse("ablate-toxic-pos-gen-100") == Ablation(100, True, True)
    assert parse("ablate-toxic-pos-gen-100").where == "generation"


def test_base_means_controls():
    c = parse("patch-four-groups-base-means")
    assert c == Patching("four-groups", base_means=True) and c.means == Patching("four-groups")
    assert Patching("tp").control.name == "patch-tp-base-means"
    with pytest.raises(SweepError, match="not several"):
        Patching("tp", per_prompt=True, base_means=True)
    with pytest.raises(SweepError, match="not several"):
        Patching("tp", base_means=True, fit="a")


def test_cross_fitted_patch_names():
    for half in ("a", "b", "cross"):
        c = Patching("toxic-256").fitted(half)
        assert parse(c.name) == c and c.means == Patching("toxic-256")
    assert Patching("four-groups").fitted("cross").name == "patch-four-groups-cross-fit"
    assert parse("patch-tp-fit-b") == Patching("tp", fit="b")
    with pytest.raises(SweepError, match="unknown condition"):
        parse("patch-tp-fit-c")


def test_generation_only_ablations_join_when_asked():
    cfg = load_config(CONFIG / "config.yaml", check_paths=False)
    cfg["sweeps"]["ablate_generation_only"] = True
    names = sweep_conditions(cfg, "smollm2-135m")
    assert {"ablate-toxic-200", "ablate-toxic-gen-200", "ablate-toxic-pos-gen-1000"} <= set(names)
    assert "ablate-toxic-gen-200" in spec_conditions(cfg, "smollm2-135m")


def test_jobs_of_one_model_differ_by_at_most_one_condition():
    names = [f"patch-toxic-{n}" for n in range(1, 35)]
    assert [len(j) for j in chunks(names, 12)] == [12, 11, 11]
    assert [len(j) for j in chunks(names, 8)] == [7, 7, 7, 7, 6]
    assert [len(j) for j in chunks(names, 34)] == [34]
    assert [c for j in chunks(names, 8) for c in j] == names  # order kept


@pytest.mark.parametrize(
    "configs", [("config.yaml",), ("paper.yaml",), ("config.yaml", "two-models.yaml")]
)
def test_every_configured_condition_parses_back_to_its_name(configs):
    cfg = load_config(*(CONFIG / c for c in configs), check_paths=False)
    for model in cfg["models"]:
        names = sweep_conditions(cfg, model)
        assert names and all(parse(n).name == n for n in names)
        assert set(spec_conditions(cfg, model)) == {n for n in names if not toxic_ablation(n)}
        jobs = chunks(names, 5)
        assert sorted(c for job in jobs for c in job) == sorted(names)
        # one job runs one model
        assert all(len({parse(c).on_dpo_model for c in job}) == 1 for job in jobs)


def test_hand_written_specs_named_dpo_run_the_dpo_model():
    assert runs_dpo_model("dpo") and runs_dpo_model("dpo-scale-keys-top7-x2")
    assert runs_dpo_model("dpo-my-edit") and not runs_dpo_model("my-edit")
    assert not runs_dpo_model("patch-tp") and not runs_dpo_model("base")
