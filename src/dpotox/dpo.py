"""DPO fine-tuning of a prepared model on preference pairs (Yang et al. 2025, App. C).

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
* **A KL penalty** ``kl_weight * KL`` added to the DPO loss (the papers' "KL weight"). KL is
  the non-negative k3 estimate of KL(policy || reference) per completion token,
  ``mean(exp(r) - r - 1)`` with ``r = log p_ref(token) - log p_policy(token)``, averaged over
  the completion tokens (chosen and rejected; prompt and padding masked) of a micro-batch.
  It reuses the per-token log-probs of TRL's own policy and reference forwards, so it costs
  no extra forward pass. It is logged as ``kl`` (train) and ``eval_kl`` (validation), the
  plain DPO loss as ``dpo_loss``; ``loss`` is the sum the optimiser and early stopping see.

Launching
---------
One process (CPU, or one GPU): call :func:`train_dpo`; the Snakemake script
``workflow/scripts/train_dpo.py`` does. Several GPUs: run the same call in every process of
``accelerate launch --num_processes N <script>`` (or ``torchrun``), with identical arguments.
The Trainer then runs DDP (or FSDP/DeepSpeed from the accelerate config); ``batch_size`` is
per device and each process accumulates ``gradient_accumulation_steps / N`` micro-batches, so
the effective batch is ``batch_size * gradient_accumulation_steps`` whatever N is (the
papers' batch on any GPU count; N must divide ``gradient_accumulation_steps``).
Every process must see the same ``checkpoint_dir`` (shared file system); process 0 alone
writes the run marker, the final model folder and the log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from transformers import EarlyStoppingCallback, TrainerCallback

from dpotox.config import model_setting
from dpotox.errors import ConfigError, DPOError
from dpotox.io import share, write_parquet
from dpotox.sources.models import load_prepared, resolve_device

_log = logging.getLogger("dpotox")

# Written into the checkpoint folder: which run the checkpoints belong to.
RUN_MARKER = "dpotox-run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys of the Trainer's log rows that describe speed, not training; left out of the log table.
_NOT_METRICS = re.compile(r"(_runtime|_per_second|total_flos|^train_loss)$")
_LOG_COLUMNS = ["step", "epoch", "split", "loss", "dpo_loss", "kl", "rewards/margins",
                "rewards/accuracies", "rewards/chosen", "rewards/rejected", "learning_rate",
                "grad_norm"]


@dataclass(frozen=True)
class DPOSettings:
    """The ``dpo`` section of the config (without ``dpo.pairs``), for one model.

    Defaults follow Yang et al. 2025, App. C; the schema holds the same defaults and bounds.
    Construction checks the bounds and the relations the schema cannot express.
    """

    beta: float = 0.1
    #: Weight of the per-token KL(policy || reference) penalty added to the DPO loss; 0 = plain DPO.
    kl_weight: float = 0.05
    #: Peak learning rate, reached linearly after ``warmup_steps`` and then held constant.
    learning_rate: float = 1.0e-6
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    #: Optimizer steps of linear warmup from 0 to ``learning_rate``.
    warmup_steps: int = 150
    #: Pairs per device per micro-batch.
    batch_size: int = 4
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
    precompute_ref_log_probs: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("invalid DPO settings:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        out: list[str] = []

        def bad(name: str, rule: str) -> None:
            out.append(f"config key 'dpo.{name}': got {getattr(self, name)!r}, expected {rule}")

        for name in ("beta", "learning_rate", "max_grad_norm"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a number > 0")
        if not _is_number(self.kl_weight) or self.kl_weight < 0:
            bad("kl_weight", "a number >= 0")
        if not _is_number(self.validation_fraction) or not 0 < self.validation_fraction < 1:
            bad("validation_fraction", "a number in (0, 1)")
        if self.optimizer not in ("rmsprop", "adamw"):
            bad("optimizer", "one of 'rmsprop', 'adamw'")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size",
                     "max_prompt_length", "max_completion_length", "epochs", "eval_steps",
                     "early_stopping_patience", "save_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name, low in (("warmup_steps", 0), ("seed", 0), ("max_length", 2)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                bad(name, f"an integer >= {low}")
        if not _is_int(self.max_steps) or not (self.max_steps == -1 or self.max_steps >= 1):
            bad("max_steps", "-1 (run all epochs) or an integer >= 1")
        if not isinstance(self.precompute_ref_log_probs, bool):
            bad("precompute_ref_log_probs", "true or false")
        if out:  # the relations below need valid numbers
            return out
        if self.max_prompt_length + self.max_completion_length > self.max_length:
            out.append(
                f"config keys 'dpo.max_prompt_length' ({self.max_prompt_length}) + "
                f"'dpo.max_completion_length' ({self.max_completion_length}) exceed "
                f"'dpo.max_length' ({self.max_length}); raise dpo.max_length or shorten the others")
        if self.save_steps % self.eval_steps:
            out.append(
                f"config key 'dpo.save_steps' ({self.save_steps}) must be a multiple of "
                f"'dpo.eval_steps' ({self.eval_steps}): the best model is restored from a "
                "checkpoint taken at a validation step")
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model: str) -> DPOSettings:
        """Settings for ``model``: ``dpo.*`` with ``models.<model>.dpo.kl_weight/learning_rate``
        overriding, and the top-level ``seed``. Keys missing from ``dpo`` take the defaults.

        Raises:
            ConfigError: an unknown key, or a value out of range (the message names the key).
        """
        if model not in config.get("models", {}):
            raise ConfigError(f"no model {model!r} under 'models'; known: "
                              f"{', '.join(config.get('models', {})) or 'none'}")
        defaults = {f.name: f.default for f in fields(cls)}
        section = {k: v for k, v in (config.get("dpo") or {}).items() if k != "pairs"}
        unknown = sorted(set(section) - set(defaults) - {"seed"})
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))} under 'dpo'; "
                              f"allowed: {', '.join(sorted(set(defaults) - {'seed'}))}, pairs")
        section = {**{k: v for k, v in defaults.items() if k != "seed"}, **section}
        per_model = config["models"][model].get("dpo") or {}
        merged = {"models": config["models"], "dpo": section}
        for key, rule, ok in (("kl_weight", "a number >= 0", lambda v: v >= 0),
                              ("learning_rate", "a number > 0", lambda v: v > 0)):
            if key in per_model and not (_is_number(per_model[key]) and ok(per_model[key])):
                raise ConfigError(f"config key 'models.{model}.dpo.{key}': got "
                                  f"{per_model[key]!r}, expected {rule}")
            section[key] = model_setting(merged, model, "dpo", key)
        return cls(**section, seed=config.get("seed", 0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def split_pairs(pairs: pd.DataFrame, validation_fraction: float,
                seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, validation)``: a seeded random split, each keeping the input order.

    The validation split has ``round(n * validation_fraction)`` pairs, at least one, and
    leaves at least one for training.

    Raises:
        DPOError: fewer than two pairs.
    """
    n = len(pairs)
    if n < 2:
        raise DPOError(f"DPO needs at least 2 preference pairs (one to train on, one to "
                       f"validate), got {n}; build more pairs (dpo.pairs) or give data.pairs")
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (pairs.iloc[train].reset_index(drop=True), pairs.iloc[val].reset_index(drop=True))


@contextlib.contextmanager
def _capture_log_probs(module: torch.nn.Module, store: dict[str, torch.Tensor],
                       key: str) -> Iterator[None]:
    """Keep the per-token log-probs of ``module``'s first fused-LM-head forward in ``store``."""

    def hook(_mod, _args, kwargs, output):
        if kwargs.get("fused_lm_head") and key not in store:
            store[key] = output.log_probs

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def k3_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the k3 estimate ``exp(r) - r - 1``, ``r = ref - policy``, over ``mask``.

    Each term is >= 0 and its gradient flows into ``policy_logps`` only. Computed in float32.
    """
    r = ref_logps.detach().float() - policy_logps.float()
    per_token = torch.expm1(r) - r  # expm1 keeps precision where r is tiny (policy ~ reference)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()


# Dataset columns of precomputed reference log-probs: each completion token's, chosen and rejected.
REF_TOKENS = ("ref_chosen_tokens", "ref_rejected_tokens")


@functools.cache
def _trainer_class() -> type:
    """The trainer class, built on first use: importing TRL costs seconds."""
    from trl import DPOTrainer

    class KLDPOTrainer(DPOTrainer):
        """``DPOTrainer`` plus separate prompt/completion token budgets and a k3 KL penalty
        (see the module docstring)."""

        def __init__(self, *args: Any, kl_weight: float, max_prompt_length: int,
                     max_completion_length: int, precompute_ref: bool = False,
                     **kwargs: Any) -> None:
            # Set before super().__init__, which tokenises the datasets through _prepare_dataset.
            self.kl_weight = kl_weight
            self.max_prompt_length = max_prompt_length
            self.max_completion_length = max_completion_length
            super().__init__(*args, **kwargs)
            if self.ref_model is None:
                raise ValueError("KLDPOTrainer needs an explicit ref_model")
            if precompute_ref:
                self._precompute_reference()

        # -- precomputed reference log-probs ------------------------------------------------
        # TRL's own precompute keeps only each sequence's sum, and the KL term needs every
        # token's: so every completion token's reference log-prob is stored with its pair
        # (REF_TOKENS columns), and the collator hands them on flat, chosen rows then rejected
        # rows, in the order of the batch's completion mask.

        def _precompute_reference(self) -> None:
            t0 = time.time()
            self.train_dataset = self._with_reference(self.train_dataset)
            self.eval_dataset = self._with_reference(self.eval_dataset)
            base_collate = self.data_collator

            def collate(examples):
                out = base_collate(examples)
                out["ref_token_logps"] = torch.tensor(
                    [v for key in REF_TOKENS for ex in examples for v in ex[key]])
                return out

            self.data_collator = collate
            self.precompute_ref_logps = True  # TRL's loss then reads the sums from the batch
            self.ref_model = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            _log.info("reference log-probs of %d train and %d validation pairs computed in %.1f s; "
                      "reference model freed", len(self.train_dataset), len(self.eval_dataset),
                      time.time() - t0)

        def _with_reference(self, dataset):
            from torch.utils.data import DataLoader

            # Every process runs every batch: under FSDP each forward needs all processes.
            loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                collate_fn=self.data_collator, shuffle=False)
            rows: dict[str, list] = {k: [] for k in (*REF_TOKENS, "ref_chosen_logps",
                                                     "ref_rejected_logps")}
            with torch.no_grad(), self.accelerator.autocast():
                for batch in loader:
                    batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                    mask = batch["completion_mask"][:, 1:]
                    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                    logps = self.ref_model(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"], use_cache=False,
                                           labels=labels, fused_lm_head=True).log_probs
                    logps = logps[:, -mask.size(1):]
                    n = len(logps) // 2
                    for i, (lp, m) in enumerate(zip(logps, mask.bool())):
                        side = 0 if i < n else 1
                        rows[REF_TOKENS[side]].append(lp[m].float().cpu().tolist())
                        rows[("ref_chosen_logps", "ref_rejected_logps")[side]].append(
                            float(lp.sum()))
            for name, values in rows.items():
                dataset = dataset.add_column(name, values)
            return dataset

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self.precompute_ref_logps:
                self._signature_columns = [*self._signature_columns, *REF_TOKENS]

        def _send_telemetry(self) -> None:
            # TRL pings the Hugging Face hub when a trainer starts; a pipeline run must not.
            pass

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            eos = self._tokenizer.eos_token
            eos_id = self._tokenizer.eos_token_id
            bos_id = self._tokenizer.bos_token_id
            # Whether the raw texts already end with EOS, before TRL appends one to every completion.
            dataset = dataset.map(lambda ex: {"_had_eos": [ex["chosen"].endswith(eos),
                                                           ex["rejected"].endswith(eos)]})
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            max_p, max_c = self.max_prompt_length, self.max_completion_length

            def budget(ex):
                prompt = ex["prompt_ids"]
                if len(prompt) > max_p:
                    keep_bos = int(bos_id is not None and prompt[0] == bos_id)
                    prompt = prompt[:keep_bos] + prompt[len(prompt) - (max_p - keep_bos):]
                out = {"prompt_ids": prompt}
                for key, had_eos in zip(("chosen_ids", "rejected_ids"), ex["_had_eos"], strict=True):
                    ids = ex[key]
                    if not had_eos and ids and ids[-1] == eos_id:
                        ids = ids[:-1]
                    out[key] = ids[:max_c]
                return out

            n_long = sum(len(p) > max_p for p in dataset["prompt_ids"])
            dataset = dataset.map(budget, remove_columns=["_had_eos"])
            if n_long:
                _log.info("%s: %d of %d prompts cut to their last %d tokens", dataset_name, n_long,
                         len(dataset), max_p)
            return dataset

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            captured: dict[str, torch.Tensor] = {}
            ref_tokens = inputs.get("ref_token_logps")
            inputs = {k: v for k, v in inputs.items() if k != "ref_token_logps"}
            ref_hook = (contextlib.nullcontext() if self.precompute_ref_logps
                        else _capture_log_probs(self.ref_model, captured, "ref"))
            with _capture_log_probs(model, captured, "policy"), ref_hook:
                result = super()._compute_loss(model, inputs, return_outputs)
            loss, outputs = result if return_outputs else (result, None)
            if set(captured) != ({"policy"} if self.precompute_ref_logps else {"policy", "ref"}):
                raise RuntimeError("TRL's DPO loss no longer runs fused policy and reference forwards; "
                                   "the KL term of dpotox.dpo needs updating for this TRL version")
            mask = inputs["completion_mask"][:, 1:]  # log-probs are of tokens 1..L-1
            n = mask.size(1)
            policy = captured["policy"][:, -n:]
            if self.precompute_ref_logps:
                if ref_tokens is None or ref_tokens.numel() != int(mask.sum()):
                    raise RuntimeError("precomputed reference log-probs do not match the batch's "
                                       "completion tokens")
                ref = torch.zeros_like(policy, dtype=torch.float32)
                ref[mask.bool()] = ref_tokens.to(ref.device, torch.float32)
            else:
                ref = captured["ref"][:, -n:]
            kl_sum, n_tokens = k3_kl(policy, ref, mask)
            kl = kl_sum / n_tokens.clamp(min=1)
            # Per-process scalars: gather all of them (gather_for_metrics would trim them as samples).
            gather = self.accelerator.gather
            total = gather(n_tokens.detach()).sum()
            self._metrics[mode]["kl"].append(
                (gather(kl_sum.detach()).sum() / total.clamp(min=1)).item())
            self._metrics[mode]["dpo_loss"].append(gather(loss.detach()).mean().item())
            if self.kl_weight:
                loss = loss + self.kl_weight * kl
            return (loss, outputs) if return_outputs else loss

    return KLDPOTrainer


class _SaveOnImprovement(TrainerCallback):
    """Checkpoint at every validation that lowers the loss, so the best model is on disk
    whatever ``save_steps`` is (transformers only restores a best model it saved)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_loss")
        # Runs before the Trainer records the new best, so best_metric is the previous one.
        if value is not None and (state.best_metric is None or value < state.best_metric):
            control.should_save = True


class _LogProgress(TrainerCallback):
    """Every validation, and every ``every``-th training step, as one line on ``logger``."""

    def __init__(self, logger: logging.Logger, every: int) -> None:
        self.logger, self.every = logger, every

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not state.is_world_process_zero:
            return
        if "eval_loss" in logs:
            self.logger.info("step %d validation: loss %.4f, reward accuracy %.3f, margin %.4f, "
                             "kl %.3g", state.global_step, logs["eval_loss"],
                             logs.get("eval_rewards/accuracies", float("nan")),
                             logs.get("eval_rewards/margins", float("nan")),
                             logs.get("eval_kl", float("nan")))
        elif "loss" in logs and (state.global_step % self.every == 0 or state.global_step == 1):
            self.logger.info("step %d/%d train: loss %.4f, reward accuracy %.3f, margin %.4f, "
                             "kl %.3g, lr %.3g, grad norm %.3g", state.global_step, state.max_steps,
                             logs["loss"], logs.get("rewards/accuracies", float("nan")),
                             logs.get("rewards/margins", float("nan")), logs.get("kl", float("nan")),
                             logs.get("learning_rate", float("nan")),
                             logs.get("grad_norm", float("nan")))


def accumulation_per_process(settings: DPOSettings, n_processes: int) -> int:
    """The gradient accumulation steps of each of ``n_processes`` processes that keep the
    effective batch at ``batch_size * gradient_accumulation_steps``.

    Raises:
        DPOError: ``n_processes`` does not divide ``dpo.gradient_accumulation_steps``.
    """
    steps = settings.gradient_accumulation_steps
    if steps % n_processes:
        raise DPOError(f"config key 'dpo.gradient_accumulation_steps' is {steps}, which {n_processes} "
                       f"GPUs cannot share: the effective batch (batch_size x "
                       f"gradient_accumulation_steps) is split over the GPUs; make it a multiple "
                       f"of {n_processes}, or set models.<model>.resources.gpu")
    return steps // n_processes


def _dpo_config(settings: DPOSettings, checkpoint_dir: Path, device: str):
    from accelerate import PartialState
    from trl import DPOConfig

    cuda = device.startswith("cuda")
    return DPOConfig(
        output_dir=str(checkpoint_dir),
        beta=settings.beta,
        loss_type=["sigmoid"],
        learning_rate=settings.learning_rate,
        # The DPO reference implementation warms up linearly, then holds the rate; a decay tied
        # to the epoch count would make early stopping change the schedule.
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps,
        optim="rmsprop" if settings.optimizer == "rmsprop" else "adamw_torch",
        weight_decay=0.0,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=accumulation_per_process(settings, PartialState().num_processes),
        max_grad_norm=settings.max_grad_norm,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        # Prompt and completion budgets are applied per part in _prepare_dataset; TRL's own
        # max_length would drop pairs whose untruncated prompt is long.
        max_length=None,
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,  # the latest checkpoint (resuming) and the best one are always kept
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives a resume
        logging_strategy="steps",
        logging_steps=1,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=device == "cpu",
        # DPOConfig defaults bf16 to True, which on a CPU means bf16 autocast: say it explicitly.
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        # Recomputation trades time for memory: worth it for large models on a GPU only. (The
        # new name; TRL's default for the deprecated gradient_checkpointing would warn.)
        activation_checkpointing=cuda,
        dataloader_num_workers=0,
    )


def make_trainer(model_dir: str | Path, train: pd.DataFrame, validation: pd.DataFrame,
                 settings: DPOSettings, *, checkpoint_dir: str | Path, device: str = "auto",
                 callbacks: Sequence[TrainerCallback] = (), logger: logging.Logger | None = None):
    """A ready trainer: policy (float32 master weights, training mode) and a frozen reference,
    both loaded from the prepared folder ``model_dir``, on the ``prompt``/``chosen``/``rejected``
    columns of ``train`` and ``validation``. Texts are joined as ``prompt + completion``,
    so a completion carries its own leading space."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    device = resolve_device(device)
    # The optimizer updates float32 weights even when the prepared model is half precision;
    # on a GPU bf16 autocast supplies the speed.
    with _quiet_progress_bars():
        policy, tok = load_prepared(model_dir, dtype="float32")
        reference, _ = load_prepared(model_dir)
    policy.train()
    reference.requires_grad_(False)
    cols = ["prompt", "chosen", "rejected"]
    train_ds = datasets.Dataset.from_pandas(train[cols].reset_index(drop=True), preserve_index=False)
    val_ds = datasets.Dataset.from_pandas(validation[cols].reset_index(drop=True), preserve_index=False)
    with _quiet_progress_bars():
        trainer = _trainer_class()(
            model=policy, ref_model=reference, args=_dpo_config(settings, Path(checkpoint_dir), device),
            train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience),
                       _SaveOnImprovement(),
                       _LogProgress(logger or _log, max(1, min(settings.eval_steps, 10))),
                       *callbacks],
            kl_weight=settings.kl_weight, max_prompt_length=settings.max_prompt_length,
            max_completion_length=settings.max_completion_length,
            precompute_ref=settings.precompute_ref_log_probs)
    # With tqdm off, the Trainer prints every log dict to stdout; _LogProgress reports instead.
    trainer.remove_callback(PrinterCallback)
    return trainer


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No progress bars from datasets (tokenising) and transformers (loading, saving weights)."""
    import datasets
    from transformers.utils import logging as tf_logging

    ds_on, tf_on = datasets.is_progress_bar_enabled(), tf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if tf_on:
            tf_logging.enable_progress_bar()


def checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-<step>`` folders (their trainer state is written last), by step."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _finished(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was taken when training had reached its end or stopped early."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return state["global_step"] >= state["max_steps"] or bool(control.get("should_training_stop"))


def _run_fingerprint(model_dir: Path, pairs: pd.DataFrame, settings: DPOSettings) -> dict[str, Any]:
    """What a checkpoint must have been trained from to be resumed."""
    h = hashlib.sha256()
    for col in ("prompt", "chosen", "rejected"):
        for text in pairs[col]:
            h.update(str(text).encode())
            h.update(b"\0")
    weights = model_dir / "model.safetensors"
    return {"settings": settings.to_dict(),
            "pairs_sha256": h.hexdigest(),
            "base_source_sha256": hashlib.sha256((model_dir / "source.json").read_bytes()).hexdigest(),
            "base_weights_bytes": weights.stat().st_size if weights.is_file() else None}


def _clear_checkpoints(checkpoint_dir: Path) -> None:
    for _, path in checkpoints(checkpoint_dir):
        shutil.rmtree(path)
    for p in checkpoint_dir.glob("checkpoint-*"):  # incomplete ones
        if p.is_dir():
            shutil.rmtree(p)
    for name in (RUN_MARKER, "README.md"):  # README.md: TRL's model card
        (checkpoint_dir / name).unlink(missing_ok=True)


def _claim_checkpoints(checkpoint_dir: Path, fingerprint: dict[str, Any], logger: logging.Logger) -> None:
    """Keep the checkpoints only if they come from this very run (same pairs, base, settings)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker = checkpoint_dir / RUN_MARKER
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as it reads back from the file
    previous = json.loads(marker.read_text()) if marker.is_file() else None
    if previous != fingerprint and (checkpoints(checkpoint_dir) or any(checkpoint_dir.glob("checkpoint-*"))):
        logger.warning("%s holds checkpoints of another run (different pairs, base model or "
                       "settings); removing them and starting from step 0", checkpoint_dir)
        _clear_checkpoints(checkpoint_dir)
    marker.write_text(json.dumps(fingerprint, indent=2) + "\n")


def log_table(log_history: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per logged training step and per validation, from ``trainer.state.log_history``.

    Columns: step, epoch, split (train/eval), loss, dpo_loss, kl, rewards/*, learning_rate,
    grad_norm, then TRL's other metrics (log-probs, logits, entropy...); NaN where absent.
    """
    rows = []
    for entry in log_history:
        if "eval_loss" in entry:
            split = "eval"
            metrics = {k.removeprefix("eval_"): v for k, v in entry.items()
                       if k.startswith("eval_") and not _NOT_METRICS.search(k)}
        elif "loss" in entry:
            split = "train"
            metrics = {k: v for k, v in entry.items()
                       if k not in ("step", "epoch") and not _NOT_METRICS.search(k)}
        else:  # the end-of-training summary
            continue
        row = {"step": int(entry["step"]), "epoch": float(entry.get("epoch", float("nan"))),
               "split": split}
        row.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else _LOG_COLUMNS[:3])
    for col in _LOG_COLUMNS:
        if col not in table:
            table[col] = np.nan
    rest = sorted(c for c in table.columns if c not in _LOG_COLUMNS)
    table = table[_LOG_COLUMNS + rest]
    return table.astype({"step": "int64", "split": "string"})


def _eval_at(table: pd.DataFrame, step: int | None) -> dict[str, float]:
    rows = table[(table["split"] == "eval") & (table["step"] == step)]
    if rows.empty:
        return {}
    row = rows.iloc[-1]
    return {"eval_loss": float(row["loss"]), "eval_reward_accuracy": float(row["rewards/accuracies"]),
            "eval_reward_margin": float(row["rewards/margins"]), "eval_kl": float(row["kl"])}


def train_dpo(model_dir: str | Path, pairs: pd.DataFrame, out_dir: str | Path,
              settings: DPOSettings, *, checkpoint_dir: str | Path, log_path: str | Path,
              device: str = "auto", log: logging.Logger | None = None,
              callbacks: Sequence[TrainerCallback] = (), keep_checkpoints: bool = False) -> dict[str, Any]:
    """Fine-tune the prepared model in ``model_dir`` with DPO on ``pairs``; write the best model.

    ``pairs`` needs text columns ``prompt``, ``chosen``, ``rejected`` (others are ignored); a
    seeded split holds out ``settings.validation_fraction`` of them for validation. Training
    checkpoints into ``checkpoint_dir`` every ``settings.save_steps`` steps and at each new best
    validation loss; if that folder already holds checkpoints of the same run (same pairs, base
    model and settings; an interrupted job), training resumes from the latest one, otherwise
    they are removed. At the end the checkpoint with the lowest validation loss is restored.

    Writes (process 0 only): ``out_dir``, a folder ``load_prepared`` reads (safetensors,
    tokenizer, ``source.json`` = the base's provenance plus a ``dpo`` record), complete or not
    at all; and ``log_path``, the Parquet table of :func:`log_table`. The checkpoints are
    removed afterwards unless ``keep_checkpoints``. ``callbacks`` are extra Trainer callbacks.
    ``device``: ``auto``, ``cpu`` or ``cuda``; on a GPU with bf16 support training runs under
    bf16 autocast (float32 master weights), on a CPU in float32.

    Returns:
        A summary: steps, best_step, best_eval_loss, stopped_early, resumed_from_step,
        seconds, n_train, n_val, the validation reward accuracy / margin / KL of the best step,
        and the last training step's reward accuracy and KL.

    Raises:
        DPOError: fewer than two pairs, or ``pairs`` without the text columns.
    """
    import trl
    from accelerate import PartialState

    logger = log if log is not None else _log
    t0 = time.time()
    model_dir, out_dir, checkpoint_dir = Path(model_dir), Path(out_dir), Path(checkpoint_dir)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in pairs]
    if missing:
        raise DPOError(f"preference pairs lack column(s) {', '.join(missing)}")
    train, val = split_pairs(pairs, settings.validation_fraction, settings.seed)
    # On CPUs the processes of `accelerate launch` form a group only when the state says CPU.
    state = PartialState(cpu=resolve_device(device) == "cpu")
    if state.is_main_process:
        _claim_checkpoints(checkpoint_dir, _run_fingerprint(model_dir, pairs, settings), logger)
    state.wait_for_everyone()
    found = checkpoints(checkpoint_dir)
    resume_step, resume_path = found[-1] if found else (0, None)

    trainer = make_trainer(model_dir, train, val, settings, checkpoint_dir=checkpoint_dir,
                           device=device, callbacks=callbacks, logger=logger)
    args = trainer.args
    logger.info("DPO on %s: %d train / %d validation pairs, device %s%s, %s lr %.3g, beta %.3g, "
                "kl_weight %.3g, effective batch %d (%d pairs x %d accumulated x %d processes)",
                model_dir, len(train), len(val), args.device,
                " (bf16)" if args.bf16 else "", settings.optimizer, settings.learning_rate,
                settings.beta, settings.kl_weight,
                args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
                args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size)
    if resume_path is not None and _finished(resume_path):
        # The Trainer would take one more step before noticing it is done; restore the best
        # model as its end of training does, and go on to write the outputs.
        from transformers.trainer_callback import TrainerState

        logger.info("%s ends a finished run (step %d); writing its best model", resume_path, resume_step)
        trainer.state = TrainerState.load_from_json(str(resume_path / "trainer_state.json"))
        if trainer.state.best_model_checkpoint and Path(trainer.state.best_model_checkpoint).is_dir():
            with _quiet_progress_bars():
                trainer._load_best_model()
    else:
        if resume_path is not None:
            logger.info("resuming from %s (step %d)", resume_path, resume_step)
        with _quiet_progress_bars():
            trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)

    st = trainer.state
    table = log_table(st.log_history)
    best_step = None
    if st.best_model_checkpoint:
        m = _CHECKPOINT.match(Path(st.best_model_checkpoint).name)
        best_step = int(m.group(1)) if m else None
    best = _eval_at(table, best_step)
    last_train = table[table["split"] == "train"].tail(1)
    summary: dict[str, Any] = {
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "stopped_early": st.global_step < st.max_steps,
        "best_step": best_step,
        "best_eval_loss": best.get("eval_loss"),
        "resumed_from_step": resume_step,
        "n_train": len(train),
        "n_val": len(val),
        **{k: v for k, v in best.items() if k != "eval_loss"},
        "train_reward_accuracy": (float(last_train["rewards/accuracies"].iloc[0])
                                  if len(last_train) else None),
        "train_kl": float(last_train["kl"].iloc[0]) if len(last_train) else None,
    }

    staging = out_dir.parent / f".{out_dir.name}.dpo-staging"
    if state.is_main_process:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    try:
        with _quiet_progress_bars():
            trainer.save_model(str(staging))  # every process: sharded weights are gathered
        if state.is_main_process:
            (staging / "training_args.bin").unlink(missing_ok=True)
            summary["seconds"] = round(time.time() - t0, 1)
            meta = json.loads((model_dir / "source.json").read_text())
            meta["dtype"] = str(next(trainer.accelerator.unwrap_model(trainer.model).parameters()).dtype
                                ).removeprefix("torch.")
            meta["dpo"] = {"base_model": str(model_dir), "settings": settings.to_dict(),
                           **summary, "trl": trl.__version__}
            (staging / "source.json").write_text(json.dumps(meta, indent=2) + "\n")
            for f in [staging, *staging.iterdir()]:
                share(f)
            write_parquet(table, log_path, metadata={
                "dpo_settings": json.dumps(settings.to_dict()),
                "resumed_from_step": str(resume_step), "base_model": str(model_dir)})
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
    finally:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    if state.is_main_process and not keep_checkpoints:
        _clear_checkpoints(checkpoint_dir)
        with contextlib.suppress(OSError):
            checkpoint_dir.rmdir()  # only if nothing else is in it
    summary.setdefault("seconds", round(time.time() - t0, 1))
    logger.info("DPO done: %d steps%s, best validation loss %s at step %s, %.1f s",
                summary["steps"], " (stopped early)" if summary["stopped_early"] else "",
                round(best["eval_loss"], 4) if best else None, best_step,
                summary["seconds"])
    return summary
