"""The names of the sweep conditions, from the config's grids, and of the neuron groups they
patch: what the Snakefile needs to plan the DAG, importable without torch or transformers
(every cluster job parses the Snakefile). The conditions themselves, and what each name
means, are in :mod:`dpotox.sweeps`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpotox.config import section_settings
from dpotox.errors import DpotoxError

# The four groups of Yang et al. (sign of cos x sign of the base activation) and the neurons
# whose projection rose under DPO (dpotox.neurons).
GROUPS = ("TP", "TN", "AP", "AN")
INCREASED = "increased"

# Patch sets of the group rows of Table 2 / 19, by condition suffix.
GROUP_SETS: dict[str, tuple[str, ...]] = {
    "tp": ("TP",),
    "tp-an": ("TP", "AN"),
    "tp-an-tn": ("TP", "AN", "TN"),
    "four-groups": GROUPS,
    "increased": (INCREASED,),
}
SELECTIONS = ("cos", "act")


class SweepError(DpotoxError, ValueError):
    """A sweep setting or input that cannot make a condition; the message names it."""


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass
class SweepsConfig:
    """The ``sweeps`` section of the config (defaults and bounds: the schema)."""

    ablate_toxic: list[int] = field(default_factory=lambda: [100, 200, 1000])
    ablate_toxic_positive: list[int] = field(default_factory=lambda: [100, 200, 1000, 2000])
    scale_keys_top: int = 7
    scale_keys_factors: list[float] = field(default_factory=lambda: [2, 5, 10])
    patch_toxic: list[int] = field(default_factory=lambda: [256, 128])
    patch_interpretable: bool = True
    interpretable_tokens: int = 10
    interpretable_threshold: float = 0.5
    patch_sets: list[str] = field(default_factory=lambda: [
        "tp", "tp-an", "tp-an-tn", "four-groups", "all", "increased"])
    per_prompt: list[str] = field(default_factory=lambda: ["toxic-256", "tp", "four-groups"])
    steer_alphas: list[float] = field(default_factory=list)
    edit_probe: list[list[float]] = field(default_factory=list)
    edit_selections: list[str] = field(default_factory=lambda: ["cos", "act"])
    edit_free: list[list[float]] = field(default_factory=list)
    toxic_words: list[str] = field(default_factory=lambda: [
        "fuck", "shit", "crap", "damn", "asshole"])
    neutral_words: list[str] = field(default_factory=lambda: [
        "hello", "thanks", "friend", "peace", "welcome"])
    conditions_per_job: int = 8

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SweepsConfig:
        return section_settings(cls, cfg, "sweeps")

    def patch_sets_all(self) -> list[str]:
        """Every patch set, in table order: toxic sets first, then the groups."""
        sets = [f"toxic-{n}" for n in self.patch_toxic]
        if self.patch_interpretable:
            sets.append("toxic-interpretable")
        return sets + list(self.patch_sets)


def sweep_conditions(cfg: Mapping[str, Any], model: str) -> list[str]:
    """Every condition the config's grids ask for ``model``, in table order (``ablate-toxic-*``
    too). Steering alphas: ``models.<model>.steer_alphas``, else ``sweeps.steer_alphas``."""
    sc = SweepsConfig.from_config(cfg)
    alphas = cfg.get("models", {}).get(model, {}).get("steer_alphas")
    if alphas is not None:
        sc.steer_alphas = list(alphas)
    names = [f"ablate-toxic-{n}" for n in sc.ablate_toxic]
    names += [f"ablate-toxic-pos-{n}" for n in sc.ablate_toxic_positive]
    names += [f"dpo-scale-keys-top{sc.scale_keys_top}-x{_fmt(f)}" for f in sc.scale_keys_factors]
    sets = sc.patch_sets_all()
    names += [f"patch-{s}" for s in sets]
    unknown = [p for p in sc.per_prompt if p not in sets]
    if unknown:
        raise SweepError(f"config key 'sweeps.per_prompt': {unknown[0]!r} is not a patch set of "
                         f"this config; choose from {', '.join(sets)}")
    names += [f"patch-{s}-per-prompt" for s in sc.per_prompt]
    names += [f"steer-probe-a{_fmt(a)}" for a in sc.steer_alphas]
    for sel in sc.edit_selections:
        names += [f"edit-probe-{sel}-b{_fmt(b)}-a{_fmt(a)}" for b, a in sc.edit_probe]
    names += [f"edit-free-cos-b{_fmt(b)}-a{_fmt(a)}" for b, a in sc.edit_free]
    return list(dict.fromkeys(names))


def spec_conditions(cfg: Mapping[str, Any], model: str) -> list[str]:
    """The sweep conditions whose specs rule ``sweep_specs`` writes (all but the ablations of
    ``ablate-toxic-{n}``, which rule ``toxic_ablation_spec`` writes before the neuron table)."""
    return [c for c in sweep_conditions(cfg, model) if not c.startswith("ablate-toxic-")
            or c.startswith("ablate-toxic-pos-")]


def chunks(conditions: Sequence[str], size: int) -> list[list[str]]:
    """``conditions`` in jobs of ``size``; conditions that run the DPO model go in jobs of
    their own (one job loads one model)."""
    out: list[list[str]] = []
    for model_conds in ([c for c in conditions if not c.startswith("dpo-")],
                        [c for c in conditions if c.startswith("dpo-")]):
        out += [list(model_conds[i:i + size]) for i in range(0, len(model_conds), size)]
    return out
