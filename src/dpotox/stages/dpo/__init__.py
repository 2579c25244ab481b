"""DPO fine-tuning of a prepared model on preference pairs (Yang et al. 2025, App. C).

Three modules, one concern each: :mod:`dpotox.plan.training` (the settings of a training
run, checked: the planner checks them before any job),
:mod:`.trainer` (TRL's trainer with what the papers need added; it imports TRL, so it is
imported only when training starts) and :mod:`.run` (the stage: claim or resume the
checkpoints, train, publish the model folder and the log).

TRL's ``DPOTrainer`` (1.16) does the work; :class:`DPOSettings` carries the papers'
hyper-parameters and :func:`train_dpo` adds what a pipeline stage needs around it: a seeded
train/validation split, a frozen reference copy of the base model, early stopping on the
validation loss with the best checkpoint restored at the end, resumable checkpoints, an
atomic output folder that :func:`dpotox.sources.models.load_prepared` reads, and a Parquet
log of every logged step.

Two things TRL 1.16 does not do are added by subclassing its trainer:

* **Separate prompt and completion budgets.** ``DPOConfig`` only has ``max_length`` (cut from
  the end of prompt+completion). Prompts are cut to their last ``max_prompt_length`` tokens
  (a leading BOS is kept) and completions to their first ``max_completion_length`` tokens,
  right after TRL tokenises them. TRL also appends EOS to every completion; pair texts here
  are continuations cut at a token budget, not finished texts, so that EOS is removed again
  (a completion whose text already ends with the EOS string keeps it).
* **A KL penalty** ``kl_weight * KL`` added to the DPO loss (the papers' "KL weight"), ``kl``
  choosing it: ``full``, Yang et al.'s exact KL(reference || policy) over the vocabulary, from
  the final hidden states of TRL's own forwards projected through the output embeddings at
  the completion positions only; or ``k3``, the estimate ``mean(exp(r) - r - 1)``,
  ``r = log p_ref(token) - log p_policy(token)``, at the completion tokens' own log-probs.
  Neither costs an extra forward pass, and both work with a precomputed reference (which
  keeps each completion token's log-prob and, for ``full``, its final hidden state). It is
  logged as ``kl`` (train) and ``eval_kl`` (validation), the plain DPO loss as ``dpo_loss``;
  ``loss`` is the sum the optimiser and early stopping see.

Launching
---------
One process (CPU, or one GPU): call :func:`train_dpo`; rule ``train_dpo`` runs it as
``python -m dpotox train-dpo``. Several GPUs: run the same call in every process of
``accelerate launch --num_processes N -m dpotox train-dpo ...`` (or ``torchrun``), with
identical arguments; the rule does so when a model asks for several GPUs.
The Trainer then runs DDP (or FSDP/DeepSpeed from the accelerate config); ``batch_size`` is
per device and each process accumulates ``gradient_accumulation_steps / N`` micro-batches, so
the effective batch is ``batch_size * gradient_accumulation_steps`` whatever N is (the
papers' batch on any GPU count; N must divide ``gradient_accumulation_steps``).
Every process must see the same ``checkpoint_dir`` (shared file system); process 0 alone
writes the run marker, the final model folder and the log.
"""

from dpotox.errors import DPOError
from dpotox.plan.training import DPOSettings, accumulation_per_process
from dpotox.stages.dpo.run import RUN_MARKER, checkpoints, log_table, split_pairs, train_dpo

__all__ = [
    "RUN_MARKER",
    "DPOError",
    "DPOSettings",
    "accumulation_per_process",
    "checkpoints",
    "log_table",
    "split_pairs",
    "train_dpo",
]
