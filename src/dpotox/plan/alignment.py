"""Alignment runs: which preference methods and seeds train a model, their names and folders.

``alignment.methods`` names the methods (each a TRL trainer and its settings, over the ``dpo``
section's shared ones) and ``alignment.seeds`` repeats a method with other seeds. Each (method,
seed) is a *run*, and a run's name is a condition name (:class:`dpotox.plan.conditions.ModelRun`):

- ``dpo``: the ``dpo`` method at the top-level ``seed``, the papers' run. Every table and claim of
  the papers compares against it, and its files keep their places (``results/{model}/dpo/...``).
- ``align-{method}``: another method at the top-level seed, e.g. ``align-kto``;
- ``align-{method}-seed{s}``: a method at another seed, e.g. ``align-dpo-seed1``.

A run other than ``dpo`` trains into ``results/{model}/align/{method}[-seed{s}]/`` and its neuron
table is written there too; its evaluation and its activation cache are conditions like any
other (``results/{model}/eval/align-kto.json``, ``results/{model}/activations/align-kto``).

Like :mod:`dpotox.plan.conditions`, this module imports neither torch nor transformers: the
Snakefile plans from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpotox.errors import ConfigError

DEFAULT_METHOD = "dpo"
#: The run every paper table compares against.
DEFAULT_RUN = "dpo"
RUN_PREFIX = "align-"
#: TRL trainers a method can name: DPO (any of its loss types; the papers' KL term), KTO
#: (unpaired), ORPO and CPO (SimPO is CPO's ``loss_type: simpo``), the last two without a
#: reference model.
TRAINERS = ("dpo", "kto", "orpo", "cpo")
METHOD_NAME = re.compile(r"[a-z][a-z0-9]*")
#: The grammar of a run's name after ``align-`` (also used by the condition parser).
RUN_NAME = re.compile(r"(?P<method>[a-z][a-z0-9]*)(?:-seed(?P<seed>\d+))?")


@dataclass(frozen=True)
class AlignmentRun:
    """One training of one method at one seed."""

    name: str
    method: str
    seed: int
    trainer: str

    @property
    def folder(self) -> str:
        """The run's folder under ``results/{model}``: ``dpo`` or ``align/<method>[-seed<s>]``."""
        return "dpo" if self.name == DEFAULT_RUN else f"align/{self.name[len(RUN_PREFIX) :]}"

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_RUN

    def root(self, model: str) -> str:
        """Where the run's analysis lives (neuron table, patches' evaluations): DPO's is the
        model's results folder, as before there were runs; another run's is its own folder."""
        return f"results/{model}" if self.is_default else f"results/{model}/{self.folder}"


def run_patches(cfg: Mapping[str, Any]) -> list[str]:
    """The patch conditions evaluated for every run (``alignment.patch``: sets patched to the
    run's own means): ``patch-toxic-256``, ``patch-four-groups`` by default."""
    sets = (cfg.get("alignment") or {}).get("patch") or ["toxic-256", "four-groups"]
    return [f"patch-{s}" for s in sets]


def run_name(method: str, seed: int, default_seed: int) -> str:
    """The condition name of ``method`` trained at ``seed``."""
    if method == DEFAULT_METHOD and seed == default_seed:
        return DEFAULT_RUN
    return f"{RUN_PREFIX}{method}" + ("" if seed == default_seed else f"-seed{seed}")


def methods_section(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``alignment.methods`` with every entry a dict; ``{dpo: {}}`` when the config names none."""
    methods = (cfg.get("alignment") or {}).get("methods") or {DEFAULT_METHOD: {}}
    return {name: dict(entry or {}) for name, entry in methods.items()}


def alignment_runs(cfg: Mapping[str, Any]) -> list[AlignmentRun]:
    """Every run the config asks for, ``dpo`` first, then each method in config order, each
    followed by its other seeds.

    Raises:
        ConfigError: a method name that is not lower-case letters and digits, no ``dpo`` method,
            an unknown trainer, or seeds for a method that is not listed (the key is named).
    """
    methods = methods_section(cfg)
    seeds = (cfg.get("alignment") or {}).get("seeds") or {}
    default_seed = int(cfg.get("seed", 0))
    problems = []
    if DEFAULT_METHOD not in methods:
        problems.append(
            f"config key 'alignment.methods' must name the method {DEFAULT_METHOD!r} (the "
            "papers' DPO, which every table compares against); add `dpo: {}`"
        )
    for name, entry in methods.items():
        if not METHOD_NAME.fullmatch(str(name)):
            problems.append(
                f"config key 'alignment.methods.{name}': a method's name is lower-case letters "
                "and digits, starting with a letter (it becomes part of file and condition names)"
            )
        trainer = entry.get("trainer", "dpo")
        if trainer not in TRAINERS:
            problems.append(
                f"config key 'alignment.methods.{name}.trainer': got {trainer!r}, expected one "
                f"of {', '.join(TRAINERS)}"
            )
        if name == DEFAULT_METHOD and trainer != "dpo":
            problems.append(
                f"config key 'alignment.methods.{DEFAULT_METHOD}.trainer' must be dpo: the "
                "method named dpo is the papers' run; give another trainer another name"
            )
    for name, extra in seeds.items():
        if name not in methods:
            problems.append(
                f"config key 'alignment.seeds.{name}': no such method under alignment.methods "
                f"(known: {', '.join(methods)})"
            )
        elif default_seed in list(extra or []):
            problems.append(
                f"config key 'alignment.seeds.{name}' lists the top-level seed {default_seed}, "
                "which the method's main run uses already; list only the other seeds"
            )
    if problems:
        raise ConfigError("invalid alignment settings:\n  - " + "\n  - ".join(problems))
    runs = []
    for name, entry in methods.items():
        trainer = entry.get("trainer", "dpo")
        for seed in [default_seed, *sorted(set(seeds.get(name) or []))]:
            runs.append(AlignmentRun(run_name(name, seed, default_seed), name, int(seed), trainer))
    return runs


def alignment_run(cfg: Mapping[str, Any], name: str) -> AlignmentRun:
    """The run called ``name``.

    Raises:
        ConfigError: the config has no such run; the message lists the runs it has.
    """
    runs = {r.name: r for r in alignment_runs(cfg)}
    if name not in runs:
        raise ConfigError(
            f"no alignment run {name!r} in this config; it has {', '.join(runs)} "
            "(alignment.methods and alignment.seeds)"
        )
    return runs[name]


def training_config(cfg: Mapping[str, Any], model: str, name: str) -> dict[str, Any]:
    """What training run ``name`` of ``model`` is passed (its job's params, so a change reruns
    it): the ``dpo`` section and the model's ``dpo`` entry (:func:`dpotox.plan.params.
    rule_params`), with :func:`run_overrides`. A trainer other than DPO's gets only the shared
    settings of both, so that a change to DPO's beta or KL term does not retrain it."""
    from dpotox.plan.params import rule_params
    from dpotox.plan.training import SHARED

    out = {**rule_params(cfg, "train_dpo", model), **run_overrides(cfg, name)}
    if alignment_run(cfg, name).trainer != "dpo":
        out["dpo"] = {k: v for k, v in (out.get("dpo") or {}).items() if k in SHARED}
        entry = out["models"][model]
        if entry.get("dpo"):
            entry["dpo"] = {k: v for k, v in entry["dpo"].items() if k in SHARED}
    return out


def trained_method(run_config: Mapping[str, Any]) -> str:
    """The method a training job's config names (:func:`training_config`): the one method
    under ``alignment.methods``, or ``dpo`` where there is none.

    Raises:
        ConfigError: several methods; the job cannot tell which one to train.
    """
    methods = list((run_config.get("alignment") or {}).get("methods") or {})
    if len(methods) > 1:
        raise ConfigError(
            f"the training config names {len(methods)} methods ({', '.join(methods)}); "
            "pass the one to train (dpotox train-dpo --method NAME)"
        )
    return methods[0] if methods else DEFAULT_METHOD


def run_overrides(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What training run ``name`` reads beyond the ``dpo`` section and the model's entry: its
    ``seed`` and, where the method sets anything, its entry under ``alignment.methods``. Other
    methods or seeds added to the config leave this unchanged, so adding them does not retrain
    the runs there were."""
    run = alignment_run(cfg, name)
    out: dict[str, Any] = {"seed": run.seed}
    entry = dict(methods_section(cfg)[run.method])
    if entry.get("trainer") == "dpo":
        entry.pop("trainer")
    if entry or run.method != DEFAULT_METHOD:
        out["alignment"] = {"methods": {run.method: entry}}
    return out
