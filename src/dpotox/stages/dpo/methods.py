"""The alignment methods other than DPO: TRL's KTO, ORPO and CPO (SimPO) trainers.

Each trains from the same pairs, base model, split, optimiser, schedule, early stopping and
checkpoints as DPO (:func:`dpotox.stages.dpo.trainer.training_args`); only the loss differs.

- **KTO** (Ethayarajh et al. 2024) learns from unpaired examples: each pair gives its chosen
  text as a desirable example and its rejected text as an undesirable one (TRL's
  ``KTOTrainer``, stable API), in a seeded order (:func:`unpaired`), twice as many per batch
  as pairs. It keeps a frozen reference, as DPO does.
- **ORPO** (Hong et al. 2024; ``trl.experimental.orpo``) adds an odds-ratio term, weighted by
  ``beta``, to the chosen text's NLL. No reference model.
- **CPO** (Xu et al. 2024; ``trl.experimental.cpo``): with ``loss_type: simpo`` and
  ``cpo_alpha: 0`` it is SimPO (Meng et al. 2024), a length-normalised margin loss with target
  margin ``simpo_gamma``. No reference model.

ORPO and CPO live in ``trl.experimental`` in TRL 1.16 (pyproject bounds TRL below 2).

Budgets. DPO's trainer cuts prompts and completions after TRL tokenises them (see
:mod:`dpotox.stages.dpo`). These trainers tokenise on their own, so the texts are cut before:
each prompt to its last ``max_prompt_length`` tokens, each completion to its first
``max_completion_length``, decoded back to text; TRL's ``max_length`` is then left above their
sum so that it cuts nothing more. These trainers append EOS to each completion, which DPO's
trainer removes again: a pair text here is a continuation cut at a token budget, and this one
token of difference between the methods is left as TRL has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformers import TrainerCallback

from dpotox.plan.training import DPOSettings
from dpotox.sources.models import load_prepared


def _quiet(cls: type) -> type:
    """``cls`` without TRL's ping of the Hugging Face hub when a trainer starts."""
    return type(cls.__name__, (cls,), {"_send_telemetry": lambda self: None})


def budget_texts(
    pairs: pd.DataFrame, tokenizer: Any, max_prompt: int, max_completion: int
) -> pd.DataFrame:
    """``pairs`` (prompt, chosen, rejected) with each prompt cut to its last ``max_prompt``
    tokens and each completion to its first ``max_completion`` tokens (special tokens not
    counted); texts within their budget are returned unchanged."""

    def cut(text: str, n: int, keep_end: bool) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= n:
            return text
        return tokenizer.decode(ids[-n:] if keep_end else ids[:n])

    out = pairs[["prompt", "chosen", "rejected"]].copy()
    out["prompt"] = [cut(t, max_prompt, True) for t in out["prompt"]]
    for col in ("chosen", "rejected"):
        out[col] = [cut(t, max_completion, False) for t in out[col]]
    return out.reset_index(drop=True)


def unpaired(pairs: pd.DataFrame, seed: int | None = None) -> pd.DataFrame:
    """KTO's examples: each pair's chosen text desirable, its rejected text undesirable; in
    pair order (chosen then rejected), or shuffled with ``seed``.

    TRL's KTO reads its training examples in a fixed order (its reference point is estimated
    from each example's prompt with its neighbour's completion), so the order is set here: a
    seeded shuffle, which keeps a pair's two texts from being neighbours (but by chance) and
    makes the order one of the things a seed changes.
    """
    rows = [
        (p, text, label)
        for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True)
        for text, label in ((c, True), (r, False))
    ]
    out = pd.DataFrame(rows, columns=["prompt", "completion", "label"])
    if seed is not None:
        out = out.iloc[np.random.default_rng(seed).permutation(len(out))].reset_index(drop=True)
    return out


def make_method_trainer(
    model_dir: str | Path,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    settings: DPOSettings,
    *,
    args: dict[str, Any],
    callbacks: Sequence[TrainerCallback],
) -> Any:
    """A ready KTO, ORPO or CPO trainer (``settings.trainer``) on the prepared ``model_dir``,
    with the shared Trainer ``args`` and ``callbacks``.

    Raises:
        ValueError: ``settings.trainer`` is ``dpo`` (its trainer is
            :func:`dpotox.stages.dpo.trainer.make_trainer`'s) or unknown.
    """
    import datasets

    from dpotox.stages.dpo.trainer import quiet_progress_bars

    with quiet_progress_bars():
        policy, tok = load_prepared(model_dir, dtype="float32")
    policy.train()
    train, validation = (
        budget_texts(df, tok, settings.max_prompt_length, settings.max_completion_length)
        for df in (train, validation)
    )
    # Room for BOS and the EOS TRL appends: TRL's max_length must cut nothing the budgets kept.
    max_length = settings.max_prompt_length + settings.max_completion_length + 4

    def dataset(df: pd.DataFrame) -> datasets.Dataset:
        return datasets.Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)

    common = dict(processing_class=tok, callbacks=list(callbacks))
    with quiet_progress_bars():
        if settings.trainer == "kto":
            from trl import KTOConfig, KTOTrainer

            reference, _ = load_prepared(model_dir)
            reference.requires_grad_(False)
            # A pair is two KTO examples: twice the examples per batch keep the pairs per
            # optimizer step, and so the steps, warm-up and validations, those of the other
            # methods (and TRL's KTO refuses a batch of one).
            args = {
                **args,
                "per_device_train_batch_size": 2 * args["per_device_train_batch_size"],
                "per_device_eval_batch_size": 2 * args["per_device_eval_batch_size"],
            }
            return _quiet(KTOTrainer)(
                model=policy,
                ref_model=reference,
                args=KTOConfig(
                    **args,
                    beta=settings.beta,
                    loss_type=settings.loss_type,
                    desirable_weight=settings.desirable_weight,
                    undesirable_weight=settings.undesirable_weight,
                    max_length=max_length,
                ),
                train_dataset=dataset(unpaired(train, settings.seed)),
                eval_dataset=dataset(unpaired(validation, settings.seed)),
                **common,
            )
        paired = dict(train_dataset=dataset(train), eval_dataset=dataset(validation), **common)
        # TRL's max_completion_length too must cut nothing the budgets kept.
        lengths = dict(max_length=max_length, max_completion_length=max_length)
        if settings.trainer == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            config = ORPOConfig(**args, beta=settings.beta, **lengths)
            return _quiet(ORPOTrainer)(model=policy, args=config, **paired)
        if settings.trainer == "cpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            config = CPOConfig(
                **args,
                beta=settings.beta,
                loss_type=settings.loss_type,
                simpo_gamma=settings.simpo_gamma,
                cpo_alpha=settings.cpo_alpha,
                **lengths,
            )
            return _quiet(CPOTrainer)(model=policy, args=config, **paired)
    raise ValueError(f"no method trainer for {settings.trainer!r} (dpo has its own)")
