"""Condition names: one typed parser and formatter, and the names the config's grids ask for.

A condition is what one evaluation runs: a model (``base``, ``dpo``) or an intervention spec
on one. Its name says what it does, and :func:`parse` turns a name into a typed
:class:`Condition` (kind plus parameters); ``str(condition)`` writes the name back. Every
part of dpotox that reads a name (the specs, the tables, the rule files, the tests) goes
through these classes, never through its own pattern.

- ``base``, ``dpo``: the models themselves; ``align-{method}[-seed{s}]``: the model another
  alignment method (or another seed) trained (:class:`ModelRun`, :mod:`dpotox.plan.alignment`).
- ``ablate-toxic-{n}``: zero the n value vectors most aligned with the probe, at every
  position, the prompt included (the papers zeroed the value vectors: Yang et al. 2024 workshop,
  Table 1 and Fig. 1a); ``ablate-toxic-pos-{n}``: the n most aligned among the neurons with a
  positive mean base activation (Lee et al. 2024 exclude the negative ones, whose ablation
  raises toxicity); ``ablate-toxic-gen-{n}``, ``ablate-toxic-pos-gen-{n}``: the same at the
  generated positions only (from the last prompt position on, as the other edits)
  (:class:`Ablation`).
- ``dpo-scale-keys-top{k}-x{f}``: the DPO model with the key vectors of its k most toxic
  neurons scaled by f (Lee et al. 2024's reversal) (:class:`KeyScaling`). A name starting
  with ``dpo`` runs the DPO model.
- ``patch-{set}``: a neuron set's activations in the base model set to their DPO means; sets
  ``toxic-{n}`` (top n by cosine), ``toxic-interpretable`` (those of the top n whose value
  vector unembeds to a toxic token), ``tp``, ``tp-an``, ``tp-an-tn``, ``four-groups``, ``all``,
  ``increased``. ``patch-{set}-per-prompt``: each prompt's own DPO means instead (beyond the
  papers, which patched means); ``patch-{set}-base-means``: the control, the same set set to
  its *base* means, so that a table shows how much of a patch's effect is DPO's shift rather
  than the replacement of live activations by constants; ``patch-{set}-fit-{a|b}``: the set's
  neurons and their DPO means taken from one half of the evaluation prompts only (a: the
  tuning half, b: the held-out one), for cross-fitting; ``patch-{set}-cross-fit`` is what the
  tables make of the two: each prompt scored under the fit of the other half
  (:class:`Patching`).
- ``steer-probe-a{alpha}``: subtract alpha times the unit probe direction from the last
  layer's residual output (:class:`Steering`).
- ``edit-{probe|free}-{cos|act|ref}-b{beta}-a{alpha}``: activation editing (Yang et al.
  2025): in each sign group the fraction beta of neurons with the largest |cos| (``cos``), the
  smallest |activation| (``act``), or in the reference notebook's order (``ref``: the largest
  |cos| in TP and AN, the smallest in AP and TN) has its live activation scaled by 1 -/+ alpha;
  ``edit-const-...``: the reference's operation, each chosen neuron *set* to its base mean times
  1 -/+ alpha. ``probe`` takes cos against the probe, ``free`` against the contrast of toxic
  and neutral word embeddings (:class:`Editing`).

Numbers are written as ``f"{x:g}"``. The module imports neither torch nor transformers: the
Snakefile plans the DAG from it, and every cluster job parses the Snakefile. What each
condition does to a model is built in :mod:`dpotox.stages.sweeps`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dpotox.errors import DpotoxError
from dpotox.plan.alignment import RUN_NAME, RUN_PREFIX
from dpotox.plan.config import section_settings

# The four groups of Yang et al. (sign of cos x sign of the base activation) and the neurons
# whose projection rose under DPO (dpotox.stages.neurons).
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
SELECTIONS = ("cos", "act", "ref")
OPERATIONS = ("scale", "const")


class SweepError(DpotoxError, ValueError):
    """A sweep setting or input that cannot make a condition; the message names it."""


def _fmt(x: float) -> str:
    return f"{x:g}"


_NUM = r"\d+(?:\.\d+)?(?:e[-+]?\d+)?"  # a number as _fmt writes it


@dataclass(frozen=True)
class Condition:
    """A parsed condition name; ``str()`` gives the name back."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def on_dpo_model(self) -> bool:
        """Whether the condition runs the DPO model (else the base model)."""
        return False

    @property
    def numbers(self) -> tuple[float, ...]:
        """The name's numbers in order: a grid's rows sort by them."""
        return ()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ModelRun(Condition):
    """``base``, ``dpo`` or an alignment run ``align-{method}[-seed{s}]``: a model without an
    intervention."""

    model: str

    @property
    def name(self) -> str:
        return self.model

    @property
    def on_dpo_model(self) -> bool:
        return self.model == "dpo"

    @property
    def aligned(self) -> bool:
        """Whether this is a trained model (DPO or another run), not the base model."""
        return self.model != "base"


@dataclass(frozen=True)
class Ablation(Condition):
    """``ablate-toxic-{n}`` / ``ablate-toxic-pos-{n}``, ``-gen-`` before ``{n}`` for the
    generated positions only."""

    n: int
    positive: bool = False
    generation_only: bool = False

    @property
    def name(self) -> str:
        pos = "pos-" if self.positive else ""
        gen = "gen-" if self.generation_only else ""
        return f"ablate-toxic-{pos}{gen}{self.n}"

    @property
    def where(self) -> str:
        """Where the spec's edits act (:data:`dpotox.engine.spec.Where`)."""
        return "generation" if self.generation_only else "all"

    @property
    def numbers(self) -> tuple[float, ...]:
        return (self.n,)


@dataclass(frozen=True)
class KeyScaling(Condition):
    """``dpo-scale-keys-top{top}-x{factor}``."""

    top: int
    factor: float

    @property
    def name(self) -> str:
        return f"dpo-scale-keys-top{self.top}-x{_fmt(self.factor)}"

    @property
    def on_dpo_model(self) -> bool:
        return True

    @property
    def numbers(self) -> tuple[float, ...]:
        return (self.top, self.factor)


@dataclass(frozen=True)
class Patching(Condition):
    """``patch-{neurons}`` / ``patch-{neurons}-per-prompt`` / ``patch-{neurons}-base-means``;
    ``neurons`` is a patch set."""

    neurons: str
    per_prompt: bool = False
    base_means: bool = False
    # "a" or "b": the neurons and means are fitted on that half of the evaluation prompts;
    # "cross": the two fits combined, each on the other half's prompts (built by the tables
    # from the two evaluations, never evaluated itself).
    fit: Literal["a", "b", "cross"] | None = None

    def __post_init__(self) -> None:
        if self.per_prompt + self.base_means + (self.fit is not None) > 1:
            raise SweepError(
                "a patch is one of per-prompt (DPO activations), base-means or fitted on a "
                "half, not several"
            )

    @property
    def name(self) -> str:
        suffix = (
            PER_PROMPT
            if self.per_prompt
            else BASE_MEANS
            if self.base_means
            else CROSS_FIT
            if self.fit == "cross"
            else f"{FIT}{self.fit}"
            if self.fit
            else ""
        )
        return f"patch-{self.neurons}{suffix}"

    @property
    def toxic_top(self) -> int | None:
        """n of the set ``toxic-{n}``; None for the other sets."""
        head, _, n = self.neurons.partition("-")
        return int(n) if head == "toxic" and n.isdigit() else None

    @property
    def numbers(self) -> tuple[float, ...]:
        return () if self.toxic_top is None else (self.toxic_top,)

    @property
    def means(self) -> Patching:
        """The same set patched with the DPO means (the twin of a per-prompt or base-means
        condition)."""
        return Patching(self.neurons)

    @property
    def control(self) -> Patching:
        """The same set patched with its base means (the control of a DPO-means patch)."""
        return Patching(self.neurons, base_means=True)

    def fitted(self, half: Literal["a", "b", "cross"]) -> Patching:
        """The same set with neurons and means fitted on one half of the prompts (or the two
        fits cross-combined)."""
        return Patching(self.neurons, fit=half)


@dataclass(frozen=True)
class Steering(Condition):
    """``steer-probe-a{alpha}``."""

    alpha: float

    @property
    def name(self) -> str:
        return f"steer-probe-a{_fmt(self.alpha)}"

    @property
    def numbers(self) -> tuple[float, ...]:
        return (self.alpha,)


@dataclass(frozen=True)
class Editing(Condition):
    """``edit-[const-]{direction}-{selection}-b{beta}-a{alpha}``."""

    direction: Literal["probe", "free"]
    selection: Literal["cos", "act", "ref"]
    beta: float
    alpha: float
    operation: Literal["scale", "const"] = "scale"

    @property
    def name(self) -> str:
        return f"{self.method}-b{_fmt(self.beta)}-a{_fmt(self.alpha)}"

    @property
    def method(self) -> str:
        """The name without its grid point: ``edit-[const-]{direction}-{selection}``."""
        const = "const-" if self.operation == "const" else ""
        return f"edit-{const}{self.direction}-{self.selection}"

    @property
    def numbers(self) -> tuple[float, ...]:
        return (self.beta, self.alpha)


PER_PROMPT = "-per-prompt"
BASE_MEANS = "-base-means"
FIT = "-fit-"
CROSS_FIT = "-cross-fit"
HALVES = ("a", "b")
_PATCH_SETS = "|".join([r"toxic-\d+", "toxic-interpretable", "all", *map(re.escape, GROUP_SETS)])
# One pattern per kind, and the only ones: each builds its Condition from the match.
_GRAMMAR: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Condition]]] = [
    (re.compile(rf"base|dpo|{RUN_PREFIX}{RUN_NAME.pattern}"), lambda m: ModelRun(m[0])),
    (
        re.compile(r"ablate-toxic-(pos-)?(gen-)?(\d+)"),
        lambda m: Ablation(int(m[3]), bool(m[1]), bool(m[2])),
    ),
    (
        re.compile(rf"dpo-scale-keys-top(\d+)-x({_NUM})"),
        lambda m: KeyScaling(int(m[1]), float(m[2])),
    ),
    (
        re.compile(
            rf"patch-({_PATCH_SETS})(?:({PER_PROMPT}|{BASE_MEANS})|{FIT}([ab])|({CROSS_FIT}))?"
        ),
        lambda m: Patching(m[1], m[2] == PER_PROMPT, m[2] == BASE_MEANS, "cross" if m[4] else m[3]),
    ),
    (re.compile(rf"steer-probe-a({_NUM})"), lambda m: Steering(float(m[1]))),
    (
        re.compile(rf"edit-(const-)?(probe|free)-(cos|act|ref)-b({_NUM})-a({_NUM})"),
        lambda m: Editing(m[2], m[3], float(m[4]), float(m[5]), "const" if m[1] else "scale"),
    ),
]


def prompt_halves(ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    """``(tuning, held-out)``: the prompt ids split in two by a permutation seeded with
    ``seed`` (sorted first, so the split does not depend on the file's row order). A choice
    (the best editing point) is made on the first half and reported on the second; a
    cross-fitted patch (``patch-SET-fit-a``) is fitted on the first and judged on the second,
    ``-fit-b`` the other way round."""
    import numpy as np  # here: the Snakefile imports this module and plans without numpy

    order = [str(i) for i in np.random.default_rng(seed).permutation(sorted(map(str, ids)))]
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def parse(name: str) -> Condition:
    """The :class:`Condition` a name stands for.

    Raises:
        SweepError: ``name`` follows none of the forms in this module's docstring.
    """
    for pattern, build in _GRAMMAR:
        if m := pattern.fullmatch(name):
            return build(m)
    raise SweepError(
        f"unknown condition {name!r}: a condition is base, dpo, align-METHOD[-seedS], "
        "ablate-toxic-[pos-][gen-]N, "
        "dpo-scale-keys-topK-xF, patch-SET[-per-prompt|-base-means|-fit-a|-fit-b|-cross-fit], "
        "steer-probe-aALPHA or edit-[const-]{probe,free}-{cos,act,ref}-bBETA-aALPHA "
        "(see dpotox.plan.conditions)"
    )


def runs_dpo_model(name: str) -> bool:
    """Whether condition ``name`` runs the DPO model: ``dpo``, a sweep condition on the DPO
    model, or a hand-written spec whose name starts with ``dpo-``."""
    c = try_parse(name)
    return c.on_dpo_model if c is not None else name.startswith("dpo-")


def try_parse(name: str) -> Condition | None:
    """:func:`parse`, or None for a name that is not a condition (a hand-written spec's)."""
    try:
        return parse(name)
    except SweepError:
        return None


@dataclass
class SweepsConfig:
    """The ``sweeps`` section of the config. Defaults and bounds: the schema (a test keeps the
    defaults here equal to it)."""

    ablate_toxic: list[int] = field(default_factory=lambda: [100, 200, 1000])
    ablate_toxic_positive: list[int] = field(default_factory=lambda: [100, 200, 1000, 2000])
    ablate_generation_only: bool = False
    base_mean_controls: bool = True
    scale_keys_top: int = 7
    scale_keys_factors: list[float] = field(default_factory=lambda: [2, 5, 10])
    patch_toxic: list[int] = field(default_factory=lambda: [256, 128])
    patch_interpretable: bool = True
    interpretable_tokens: int = 10
    interpretable_threshold: float = 0.5
    patch_sets: list[str] = field(
        default_factory=lambda: ["tp", "tp-an", "tp-an-tn", "four-groups", "all", "increased"]
    )
    per_prompt: list[str] = field(default_factory=lambda: ["toxic-256", "tp", "four-groups"])
    # None: the sets table_claims judges (every toxic-N of patch_toxic, and four-groups).
    cross_fit: list[str] | None = None
    steer_alphas: list[float] = field(default_factory=lambda: [10, 20, 30])
    edit_probe: list[list[float]] = field(
        default_factory=lambda: [[0.5, 0.2], [0.8, 0.1], [0.8, 0.2]]
    )
    edit_selections: list[str] = field(default_factory=lambda: ["cos", "act"])
    edit_free: list[list[float]] = field(
        default_factory=lambda: [[0.5, 0.2], [0.8, 0.1], [0.8, 0.2]]
    )
    edit_constant: list[list[float]] = field(
        default_factory=lambda: [[0.5, 0.05], [0.5, 0.2], [0.5, 0.5], [0.8, 0.5], [0.8, 1.0]]
    )
    edit_constant_selections: list[str] = field(default_factory=lambda: ["ref"])
    edit_constant_quantile: float | None = 0.8
    toxic_words: list[str] = field(
        default_factory=lambda: ["fuck", "shit", "crap", "damn", "asshole"]
    )
    neutral_words: list[str] = field(
        default_factory=lambda: ["hello", "thanks", "friend", "peace", "welcome"]
    )
    conditions_per_job: int = 8
    threads_per_job: int = 2

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
    gens = (False, True) if sc.ablate_generation_only else (False,)
    conds: list[Condition] = [Ablation(n, False, g) for n in sc.ablate_toxic for g in gens]
    conds += [Ablation(n, True, g) for n in sc.ablate_toxic_positive for g in gens]
    conds += [KeyScaling(sc.scale_keys_top, f) for f in sc.scale_keys_factors]
    sets = sc.patch_sets_all()
    conds += [Patching(s) for s in sets]
    conds += [Patching(s, per_prompt=True) for s in _known_sets("per_prompt", sc.per_prompt, sets)]
    if sc.cross_fit is None:
        cross = [s for s in sets if Patching(s).toxic_top is not None or s == "four-groups"]
    else:
        cross = _known_sets("cross_fit", sc.cross_fit, sets)
    conds += [Patching(s).fitted(h) for s in cross for h in HALVES]
    if sc.base_mean_controls:
        conds += [Patching(s, base_means=True) for s in sets]
    conds += [Steering(a) for a in sc.steer_alphas]
    for sel in sc.edit_selections:
        conds += [Editing("probe", sel, b, a) for b, a in sc.edit_probe]
    conds += [Editing("free", "cos", b, a) for b, a in sc.edit_free]
    for sel in sc.edit_constant_selections:
        conds += [Editing("probe", sel, b, a, "const") for b, a in sc.edit_constant]
    names = [c.name for c in conds]
    return list(dict.fromkeys(names))


def _known_sets(key: str, names: Sequence[str], sets: Sequence[str]) -> list[str]:
    """``names``, each checked to be one of the config's patch ``sets``."""
    unknown = [p for p in names if p not in sets]
    if unknown:
        raise SweepError(
            f"config key 'sweeps.{key}': {unknown[0]!r} is not a patch set of "
            f"this config; choose from {', '.join(sets)}"
        )
    return list(names)


def spec_conditions(cfg: Mapping[str, Any], model: str) -> list[str]:
    """The sweep conditions whose specs rule ``sweep_specs`` writes (all but the ablations of
    ``ablate-toxic-{n}``, which rule ``toxic_ablation_spec`` writes before the neuron table;
    ``ablate-toxic-gen-{n}`` is ``sweep_specs``')."""
    return [c for c in sweep_conditions(cfg, model) if not toxic_ablation(c)]


def toxic_ablation(name: str) -> bool:
    """Whether ``name`` is an ``ablate-toxic-{n}`` condition, whose spec rule
    ``toxic_ablation_spec`` writes from the probe alone (``results/{model}/specs/``)."""
    c = try_parse(name)
    return isinstance(c, Ablation) and not c.positive and not c.generation_only


def chunks(conditions: Sequence[str], size: int) -> list[list[str]]:
    """``conditions`` in jobs of at most ``size``, in order; conditions that run the DPO model
    go in jobs of their own (one job loads one model). Each model's conditions take as few
    jobs as ``size`` allows, of sizes that differ by at most one, so that jobs running side by
    side finish together (34 conditions in jobs of 12 are 12, 11 and 11, not 12, 12 and 10)."""
    out: list[list[str]] = []
    on_dpo = {c: parse(c).on_dpo_model for c in conditions}
    for model_conds in (
        [c for c in conditions if not on_dpo[c]],
        [c for c in conditions if on_dpo[c]],
    ):
        n_jobs = -(-len(model_conds) // size)
        start = 0
        for k in range(n_jobs):
            stop = start + len(model_conds) // n_jobs + (k < len(model_conds) % n_jobs)
            out.append(list(model_conds[start:stop]))
            start = stop
    return out
