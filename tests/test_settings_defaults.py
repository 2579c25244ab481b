"""The schema is the one home of config defaults: every settings dataclass field that the
schema describes has the schema's default, so code built without a config (tests, notebooks)
behaves as a run with an empty config section."""

import dataclasses

import pytest

from dpotox.outputs.claims import ClaimsConfig
from dpotox.outputs.figures import FiguresConfig
from dpotox.plan.conditions import SweepsConfig
from dpotox.plan.config import load_schema
from dpotox.plan.resources import ClusterConfig
from dpotox.stages.activations import ActivationsConfig
from dpotox.stages.dpo import DPOSettings
from dpotox.stages.evaluate import EvalConfig
from dpotox.stages.neurons import NeuronsConfig
from dpotox.stages.pairs import PairsConfig
from dpotox.stages.probe import ProbeConfig

SECTIONS = [
    (NeuronsConfig, ("neurons",)),
    (ActivationsConfig, ("activations",)),
    (EvalConfig, ("evaluation",)),
    (PairsConfig, ("dpo", "pairs")),
    (DPOSettings, ("dpo",)),
    # A method's own settings (trainer, its loss and weights) are keys of its entry only.
    (DPOSettings, ("alignment", "methods", "*")),
    (ProbeConfig, ("probe",)),
    (ClusterConfig, ("cluster",)),
    (SweepsConfig, ("sweeps",)),
    (FiguresConfig, ("figures",)),
    (ClaimsConfig, ("claims",)),
]


def _section(schema, path):
    node = schema
    for key in path:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
    return node["properties"]


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _same(a, b):
    # JSON has no tuples; a YAML number 5 and a dataclass float 5.0 are one default.
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b and (isinstance(a, bool) == isinstance(b, bool))


IDS = [f"{c.__name__}-{'.'.join(p)}" for c, p in SECTIONS]


@pytest.mark.parametrize("cls, path", SECTIONS, ids=IDS)
def test_dataclass_defaults_are_the_schema_defaults(cls, path):
    props = _section(load_schema(), path)
    checked = []
    for f in dataclasses.fields(cls):
        if f.name not in props or "default" not in props[f.name]:
            continue
        ours, theirs = _default(f), props[f.name]["default"]
        assert _same(ours, theirs), (
            f"{cls.__name__}.{f.name} defaults to {ours!r}, the schema "
            f"({'.'.join(path)}.{f.name}) to {theirs!r}"
        )
        checked.append(f.name)
    assert checked, f"{cls.__name__}: no field matched a schema key of {'.'.join(path)}"


@pytest.mark.parametrize(
    "cls", list(dict.fromkeys(c for c, _ in SECTIONS)), ids=lambda c: c.__name__
)
def test_every_field_is_a_schema_key(cls):
    """A dataclass field that no schema key fills could never be set from a config."""
    paths = [p for c, p in SECTIONS if c is cls]
    props = {k for p in paths for k in _section(load_schema(), p)}
    extra = [f.name for f in dataclasses.fields(cls) if f.name not in props and f.name != "seed"]
    assert not extra, f"{cls.__name__} fields {extra} are not keys of {paths}"
