"""The training settings of one model and one alignment method, checked: :class:`DPOSettings`.

The ``dpo`` section holds the settings every method shares (optimizer, schedule, budgets, early
stopping); ``alignment.methods.<method>`` picks the TRL trainer and overrides any of them
(:mod:`dpotox.plan.alignment`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from dpotox.errors import ConfigError, DPOError
from dpotox.plan.config import model_setting

# TRL 1.16's loss types per trainer (DPOConfig.loss_type, CPOConfig.loss_type).
DPO_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# Settings of one trainer only: another ignores the dpo section's values of DPO's and refuses
# any of them in its own entry.
_ONLY = {
    "dpo": ("kl_weight", "kl", "precompute_ref_log_probs"),
    "cpo": ("simpo_gamma", "cpo_alpha"),
    "kto": ("desirable_weight", "undesirable_weight"),
}
#: What every trainer takes from the dpo section: optimisation, budgets, validation, checkpoints.
SHARED = (
    "learning_rate", "optimizer", "warmup_steps", "batch_size", "gradient_accumulation_steps",
    "eval_batch_size", "max_prompt_length", "max_completion_length", "max_length",
    "max_grad_norm", "epochs", "max_steps", "eval_steps", "early_stopping_patience",
    "validation_fraction", "save_steps",
)  # fmt: skip


@dataclass(frozen=True)
class DPOSettings:
    """The training settings of one alignment method for one model: the ``dpo`` section
    (without ``dpo.pairs``) under the method's own entry of ``alignment.methods``.

    Defaults follow Yang et al. 2025, App. C; the schema holds the same defaults and bounds.
    Construction checks the bounds and the relations the schema cannot express.
    """

    #: TRL trainer: ``dpo`` (DPOTrainer with the KL term below; its ``loss_type`` gives IPO,
    #: robust DPO, hinge...), ``kto`` (KTOTrainer: each pair's chosen text a desirable example
    #: and its rejected text an undesirable one), ``orpo`` (ORPOTrainer: no reference model),
    #: ``cpo`` (CPOTrainer: no reference model; SimPO is ``loss_type: simpo``).
    trainer: Literal["dpo", "kto", "orpo", "cpo"] = "dpo"
    #: The trainer's loss: for ``dpo`` one of TRL's DPO losses (``sigmoid`` is the papers'
    #: DPO, ``ipo`` IPO); for ``cpo`` ``sigmoid``, ``hinge``, ``ipo``, ``simpo``, ``alphapo``;
    #: for ``kto`` ``kto`` or ``apo_zero_unpaired``; ``orpo`` has one loss (``sigmoid``).
    loss_type: str = "sigmoid"
    #: Temperature of the preference loss (DPO's beta; IPO's regularisation tau; ORPO's
    #: lambda, the weight of its odds-ratio term; SimPO's reward scale).
    beta: float = 0.1
    #: Weight of the KL penalty added to the DPO loss; 0 = plain DPO.
    kl_weight: float = 0.05
    #: The KL penalty: ``full``, the exact KL(reference || policy) over the vocabulary, per pair
    #: the mean over each side's completion tokens, chosen plus rejected (Yang et al.'s
    #: trainer); ``k3``, the estimate exp(r) - r - 1 at each completion token's own
    #: log-probs, averaged over the tokens of a micro-batch (cheaper; any reference).
    kl: Literal["full", "k3"] = "full"
    #: Peak learning rate, reached linearly after ``warmup_steps`` and then held constant.
    learning_rate: float = 1.0e-6
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    #: Optimizer steps of linear warmup from 0 to ``learning_rate``.
    warmup_steps: int = 150
    #: Pairs per device per micro-batch. The reference trainer's "batch 4, accumulation 4"
    #: is 4 pairs per optimizer step in micro-batches of one: batch_size 1 here.
    batch_size: int = 1
    #: Micro-batches per optimizer step.
    gradient_accumulation_steps: int = 4
    eval_batch_size: int = 8
    #: Prompts longer than this many tokens lose their beginning.
    max_prompt_length: int = 64
    #: Completions longer than this many tokens lose their end.
    max_completion_length: int = 64
    #: Bound on prompt + completion tokens; must hold max_prompt_length + max_completion_length.
    max_length: int = 256
    #: Gradient clipping (global L2 norm).
    max_grad_norm: float = 10.0
    epochs: int = 5
    #: Stop after this many optimizer steps; -1 runs all ``epochs``.
    max_steps: int = -1
    #: Validate every this many optimizer steps (and once at the end).
    eval_steps: int = 50
    #: Stop after this many validations in a row without a lower validation loss.
    early_stopping_patience: int = 30
    #: Share of the pairs held out for validation (at least one pair).
    validation_fraction: float = 0.1
    #: Checkpoint every this many optimizer steps (and whenever the validation loss improves);
    #: a multiple of ``eval_steps``, as transformers requires for restoring the best model.
    save_steps: int = 50
    #: Run the reference model once over every pair before training and free it, rather than
    #: once per micro-batch: one forward pass per step instead of two, no reference in GPU memory.
    #: Kept per completion token: its log-prob, and for ``kl: full`` its final hidden state
    #: (host memory: pairs x completion tokens x hidden size x 4 bytes) and the output embedding.
    precompute_ref_log_probs: bool = False
    #: SimPO's target reward margin (``cpo`` with ``loss_type: simpo``).
    simpo_gamma: float = 0.5
    #: Weight of CPO's behaviour-cloning NLL term; 0 for pure SimPO.
    cpo_alpha: float = 1.0
    #: KTO's weights of the desirable (chosen) and undesirable (rejected) examples.
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("invalid DPO settings:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        out: list[str] = []

        def bad(name: str, rule: str) -> None:
            out.append(f"config key 'dpo.{name}': got {getattr(self, name)!r}, expected {rule}")

        for name in (
            "beta",
            "learning_rate",
            "max_grad_norm",
            "desirable_weight",
            "undesirable_weight",
        ):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a number > 0")
        for name in ("kl_weight", "simpo_gamma", "cpo_alpha"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "a number >= 0")
        losses = {
            "dpo": DPO_LOSSES,
            "cpo": CPO_LOSSES,
            "kto": ("kto", "apo_zero_unpaired"),
            "orpo": ("sigmoid",),
        }
        if self.trainer not in losses:
            bad("trainer", f"one of {', '.join(losses)}")
        elif self.loss_type not in losses[self.trainer]:
            allowed = ", ".join(losses[self.trainer])
            bad("loss_type", f"for trainer {self.trainer}, one of {allowed}")
        if not _is_number(self.validation_fraction) or not 0 < self.validation_fraction < 1:
            bad("validation_fraction", "a number in (0, 1)")
        if self.optimizer not in ("rmsprop", "adamw"):
            bad("optimizer", "one of 'rmsprop', 'adamw'")
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "eval_batch_size",
            "max_prompt_length",
            "max_completion_length",
            "epochs",
            "eval_steps",
            "early_stopping_patience",
            "save_steps",
        ):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name, low in (("warmup_steps", 0), ("seed", 0), ("max_length", 2)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                bad(name, f"an integer >= {low}")
        if not _is_int(self.max_steps) or not (self.max_steps == -1 or self.max_steps >= 1):
            bad("max_steps", "-1 (run all epochs) or an integer >= 1")
        if not isinstance(self.precompute_ref_log_probs, bool):
            bad("precompute_ref_log_probs", "true or false")
        if self.kl not in ("full", "k3"):
            bad("kl", "one of 'full', 'k3'")
        if out:  # the relations below need valid numbers
            return out
        if self.max_prompt_length + self.max_completion_length > self.max_length:
            out.append(
                f"config keys 'dpo.max_prompt_length' ({self.max_prompt_length}) + "
                f"'dpo.max_completion_length' ({self.max_completion_length}) exceed "
                f"'dpo.max_length' ({self.max_length}); raise dpo.max_length or shorten the others"
            )
        if self.save_steps % self.eval_steps:
            out.append(
                f"config key 'dpo.save_steps' ({self.save_steps}) must be a multiple of "
                f"'dpo.eval_steps' ({self.eval_steps}): the best model is restored from a "
                "checkpoint taken at a validation step"
            )
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model: str, method: str = "dpo") -> DPOSettings:
        """Settings of ``method`` for ``model``: the defaults, under ``dpo.*``, under
        ``models.<model>.dpo.kl_weight/learning_rate``, under ``alignment.methods.<method>``;
        the top-level ``seed``. A method whose trainer is not ``dpo`` takes from the ``dpo``
        section only the shared settings, not DPO's loss, KL term or reference precompute.

        Raises:
            ConfigError: an unknown key, or a value out of range (the message names the key).
        """
        if model not in config.get("models", {}):
            raise ConfigError(
                f"no model {model!r} under 'models'; known: "
                f"{', '.join(config.get('models', {})) or 'none'}"
            )
        defaults = {f.name: f.default for f in fields(cls)}
        settable = sorted(set(defaults) - {"seed", "trainer"})
        section = {k: v for k, v in (config.get("dpo") or {}).items() if k != "pairs"}
        unknown = sorted(set(section) - set(settable) - {"seed"})
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} under 'dpo'; "
                f"allowed: {', '.join(settable)}, pairs"
            )
        methods = (config.get("alignment") or {}).get("methods") or {}
        entry = dict(methods.get(method) or {})
        unknown = sorted(set(entry) - set(settable) - {"trainer"})
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))} under "
                f"'alignment.methods.{method}'; allowed: trainer, {', '.join(settable)}"
            )
        trainer = entry.get("trainer", "dpo")
        if trainer != "dpo":
            section = {k: v for k, v in section.items() if k in SHARED}
        for owner, keys in _ONLY.items():
            refused = sorted(set(entry) & set(keys)) if owner != trainer else []
            if refused:
                raise ConfigError(
                    f"config key(s) {', '.join(f'alignment.methods.{method}.{k}' for k in refused)}"
                    f": only trainer {owner} has {'them' if len(refused) > 1 else 'it'}; "
                    f"this method's trainer is {trainer}: remove the key(s)"
                )
        section = {**{k: v for k, v in defaults.items() if k != "seed"}, **section}
        per_model = config["models"][model].get("dpo") or {}
        merged = {"models": config["models"], "dpo": section}
        for key, rule, ok in (
            ("kl_weight", "a number >= 0", lambda v: v >= 0),
            ("learning_rate", "a number > 0", lambda v: v > 0),
        ):
            if key in per_model and not (_is_number(per_model[key]) and ok(per_model[key])):
                raise ConfigError(
                    f"config key 'models.{model}.dpo.{key}': got "
                    f"{per_model[key]!r}, expected {rule}"
                )
            if trainer == "dpo" or key in SHARED:
                section[key] = model_setting(merged, model, "dpo", key)
        if trainer == "kto" and "loss_type" not in entry:
            entry["loss_type"] = "kto"
        if trainer != "dpo":
            section["kl_weight"] = 0.0  # the record says what ran: no KL term
        section.update(entry)
        try:
            return cls(**section, seed=config.get("seed", 0))
        except ConfigError as e:
            # Name the key where the value came from: the method's entry over the dpo section.
            text = str(e)
            for key in entry:
                text = text.replace(f"'dpo.{key}'", f"'alignment.methods.{method}.{key}'")
            raise ConfigError(text) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def accumulation_per_process(settings: DPOSettings, n_processes: int) -> int:
    """The gradient accumulation steps of each of ``n_processes`` processes that keep the
    effective batch at ``batch_size * gradient_accumulation_steps``.

    Raises:
        DPOError: ``n_processes`` does not divide ``dpo.gradient_accumulation_steps``.
    """
    steps = settings.gradient_accumulation_steps
    if steps % n_processes:
        raise DPOError(
            f"config key 'dpo.gradient_accumulation_steps' is {steps}, which {n_processes} "
            f"GPUs cannot share: the effective batch (batch_size x "
            f"gradient_accumulation_steps) is split over the GPUs; make it a multiple "
            f"of {n_processes}, or set models.<model>.resources.gpu"
        )
    return steps // n_processes
