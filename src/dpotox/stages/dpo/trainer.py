"""TRL's ``DPOTrainer`` with separate prompt and completion budgets and a k3 KL penalty.

What the subclass adds, and why, is in the docstring of :mod:`dpotox.stages.dpo`. This module
imports TRL (seconds), so :mod:`dpotox.stages.dpo.run` imports it only when training starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from trl import DPOTrainer

from dpotox.plan.training import DPOSettings, accumulation_per_process
from dpotox.sources.models import load_prepared, resolve_device

_log = logging.getLogger("dpotox")


@contextlib.contextmanager
def _capture_log_probs(
    module: torch.nn.Module, store: dict[str, torch.Tensor], key: str
) -> Iterator[None]:
    """Keep the per-token log-probs of ``module``'s first fused-LM-head forward in ``store``."""

    def hook(_mod, _args, kwargs, output):
        if kwargs.get("fused_lm_head") and key not in store:
            store[key] = output.log_probs

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def k3_kl(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the k3 estimate ``exp(r) - r - 1``, ``r = ref - policy``, over ``mask``.

    Each term is >= 0 and its gradient flows into ``policy_logps`` only. Computed in float32.
    """
    r = ref_logps.detach().float() - policy_logps.float()
    per_token = torch.expm1(r) - r  # expm1 keeps precision where r is tiny (policy ~ reference)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(), mask.sum()


@contextlib.contextmanager
def _capture_hidden(
    model: torch.nn.Module, store: dict[str, torch.Tensor], key: str
) -> Iterator[None]:
    """Keep the last hidden state (the final norm's output) of ``model``'s first forward."""

    def hook(_mod, _args, output):
        if key not in store:
            store[key] = output.last_hidden_state

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _head_log_probs(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` of ``model``'s next-token logits for the rows of ``hidden`` ``[T, d]``,
    in float32, with the logit scaling and soft-capping TRL's fused head applies (Gemma-2)."""
    weight, bias = _head_weights(model)
    if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors
        from torch.distributed.tensor import Partial

        # Each process's gradient of the gathered weight is a partial sum: it must be
        # reduce-scattered back onto the shards, not sliced.
        partial = [Partial()] * weight.device_mesh.ndim
        weight = weight.full_tensor(grad_placements=partial)
        bias = bias.full_tensor(grad_placements=partial) if bias is not None else None
    return _project(hidden, weight, bias, model.config.get_text_config())


def _head_weights(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, head.bias


def _project(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, text: Any
) -> torch.Tensor:
    """The float32 log-softmax of ``hidden @ weight.T + bias`` under the text config's logit
    scale and soft cap."""
    logits = torch.nn.functional.linear(
        hidden.float(), weight.float(), None if bias is None else bias.float()
    )
    scale = getattr(text, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return torch.log_softmax(logits, dim=-1)


def full_kl(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Per sequence, the mean over its completion positions of the exact
    ``KL(reference || policy) = sum_v p_ref(v) (log p_ref(v) - log p_policy(v))``.

    ``policy_logps`` and ``ref_logps`` are ``[T, vocab]`` log-softmaxes of the T completion
    positions of a micro-batch, ``rows`` ``[T]`` the sequence each belongs to (of ``n_rows``).
    The gradient flows into ``policy_logps`` only. Returns ``[n_rows]``.
    """
    per_token = torch.nn.functional.kl_div(
        policy_logps, ref_logps.detach(), log_target=True, reduction="none"
    ).sum(-1)
    total = torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device)
    count = torch.zeros_like(total)
    total = total.index_add(0, rows, per_token)
    count = count.index_add(0, rows, torch.ones_like(per_token))
    return total / count.clamp(min=1)


# Dataset columns of precomputed reference log-probs: each completion token's, chosen and rejected.
REF_TOKENS = ("ref_chosen_tokens", "ref_rejected_tokens")
# ... and, for the full KL, the reference's final hidden state at each of those positions.
REF_HIDDEN = ("ref_chosen_hidden", "ref_rejected_hidden")


class KLDPOTrainer(DPOTrainer):
    """``DPOTrainer`` plus separate prompt/completion token budgets and a k3 KL penalty
    (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        kl_weight: float,
        max_prompt_length: int,
        max_completion_length: int,
        precompute_ref: bool = False,
        kl: str = "k3",
        **kwargs: Any,
    ) -> None:
        if kl not in ("full", "k3"):
            raise ValueError(f"kl must be 'full' or 'k3', got {kl!r}")
        # Set before super().__init__, which tokenises the datasets through _prepare_dataset.
        self.kl = kl
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
    # rows, in the order of the batch's completion mask. The full KL needs the reference's
    # whole next-token distribution there: its final hidden states (REF_HIDDEN, d floats a
    # token rather than a vocabulary's) and a frozen copy of its output embedding give it
    # exactly, for one [tokens, d] x [d, vocab] product a step instead of a reference forward.

    def _precompute_reference(self) -> None:
        t0 = time.time()
        if self.kl == "full":
            reference = self.accelerator.unwrap_model(self.ref_model)
            weight, bias = _head_weights(reference)
            if hasattr(weight, "full_tensor"):  # FSDP2: every process keeps the whole head
                weight = weight.full_tensor()
                bias = bias.full_tensor() if bias is not None else None
            # float32 once, not at every step (_project computes in float32).
            self._ref_head = (
                weight.detach().float().clone(),
                None if bias is None else bias.detach().float().clone(),
                reference.config.get_text_config(),
            )
        self.train_dataset = self._with_reference(self.train_dataset)
        self.eval_dataset = self._with_reference(self.eval_dataset)
        base_collate = self.data_collator
        full = self.kl == "full"
        width = self._ref_head[0].shape[1] if full else 0

        def collate(examples):
            out = base_collate(examples)
            out["ref_token_logps"] = torch.tensor(
                [v for key in REF_TOKENS for ex in examples for v in ex[key]]
            )
            if full:
                out["ref_hidden"] = torch.cat(
                    [
                        # reshape: an empty completion gives shape (0,), not (0, d)
                        torch.tensor(ex[key], dtype=torch.float32).reshape(-1, width)
                        for key in REF_HIDDEN
                        for ex in examples
                    ]
                )
            return out

        self.data_collator = collate
        self.precompute_ref_logps = True  # TRL's loss then reads the sums from the batch
        self.ref_model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _log.info(
            "reference log-probs of %d train and %d validation pairs computed in %.1f s; "
            "reference model freed",
            len(self.train_dataset),
            len(self.eval_dataset),
            time.time() - t0,
        )

    def _with_reference(self, dataset):
        import datasets
        from torch.utils.data import DataLoader

        # Every process runs every batch: under FSDP each forward needs all processes.
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        full = self.kl == "full"
        names = (*REF_TOKENS, "ref_chosen_logps", "ref_rejected_logps", *(REF_HIDDEN * full))
        rows: dict[str, list] = {k: [] for k in names}
        unwrapped = self.accelerator.unwrap_model(self.ref_model)
        with torch.no_grad(), self.accelerator.autocast():
            for batch in loader:
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                mask = batch["completion_mask"][:, 1:]
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                hidden: dict[str, torch.Tensor] = {}
                keep = (
                    _capture_hidden(unwrapped, hidden, "ref") if full else contextlib.nullcontext()
                )
                with keep:
                    logps = self.ref_model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        use_cache=False,
                        labels=labels,
                        fused_lm_head=True,
                    ).log_probs
                logps = logps[:, -mask.size(1) :]
                states = hidden["ref"][:, :-1][:, -mask.size(1) :] if full else logps
                n = len(logps) // 2
                for i, (lp, h, m) in enumerate(zip(logps, states, mask.bool())):
                    side = 0 if i < n else 1
                    rows[REF_TOKENS[side]].append(lp[m].float().cpu().tolist())
                    rows[("ref_chosen_logps", "ref_rejected_logps")[side]].append(float(lp.sum()))
                    if full:
                        rows[REF_HIDDEN[side]].append(h[m].float().cpu().tolist())
        for name, values in rows.items():
            # datasets would otherwise fingerprint the column by pickling every value (about a
            # minute for the hidden states of 200 pairs); the values follow from the dataset
            # and the reference, which the run's own fingerprint covers.
            fingerprint = hashlib.sha256(f"{dataset._fingerprint}/{name}".encode()).hexdigest()
            # float32 in Arrow (4 bytes a value), not the float64 Python floats become.
            feature = (
                datasets.List(datasets.List(datasets.Value("float32")))
                if name in REF_HIDDEN
                else None
            )
            dataset = dataset.add_column(
                name, values, new_fingerprint=fingerprint[:16], feature=feature
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.precompute_ref_logps:
            hidden = REF_HIDDEN if self.kl == "full" else ()
            self._signature_columns = [*self._signature_columns, *REF_TOKENS, *hidden]

    def _send_telemetry(self) -> None:
        # TRL pings the Hugging Face hub when a trainer starts; a pipeline run must not.
        pass

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        eos = self._tokenizer.eos_token
        eos_id = self._tokenizer.eos_token_id
        bos_id = self._tokenizer.bos_token_id
        # Whether the raw texts already end with EOS, before TRL appends one to every completion.
        dataset = dataset.map(
            lambda ex: {"_had_eos": [ex["chosen"].endswith(eos), ex["rejected"].endswith(eos)]}
        )
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        max_p, max_c = self.max_prompt_length, self.max_completion_length

        def budget(ex):
            prompt = ex["prompt_ids"]
            if len(prompt) > max_p:
                keep_bos = int(bos_id is not None and prompt[0] == bos_id)
                prompt = prompt[:keep_bos] + prompt[len(prompt) - (max_p - keep_bos) :]
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
            _log.info(
                "%s: %d of %d prompts cut to their last %d tokens",
                dataset_name,
                n_long,
                len(dataset),
                max_p,
            )
        return dataset

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        captured: dict[str, torch.Tensor] = {}
        ref_tokens = inputs.get("ref_token_logps")
        ref_hidden = inputs.get("ref_hidden")
        inputs = {k: v for k, v in inputs.items() if k not in ("ref_token_logps", "ref_hidden")}
        ref_hook = (
            contextlib.nullcontext()
            if self.precompute_ref_logps
            else _capture_log_probs(self.ref_model, captured, "ref")
        )
        hidden: dict[str, torch.Tensor] = {}
        policy_model = self.accelerator.unwrap_model(model)
        ref_model = (
            None if self.precompute_ref_logps else self.accelerator.unwrap_model(self.ref_model)
        )
        hidden_hooks = (
            (
                _capture_hidden(policy_model, hidden, "policy"),
                contextlib.nullcontext()
                if ref_model is None
                else _capture_hidden(ref_model, hidden, "ref"),
            )
            if self.kl == "full"
            else (contextlib.nullcontext(), contextlib.nullcontext())
        )
        with (
            _capture_log_probs(model, captured, "policy"),
            ref_hook,
            hidden_hooks[0],
            hidden_hooks[1],
        ):
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = result if return_outputs else (result, None)
        if set(captured) != ({"policy"} if self.precompute_ref_logps else {"policy", "ref"}):
            raise RuntimeError(
                "TRL's DPO loss no longer runs fused policy and reference forwards; "
                "the KL term of dpotox.stages.dpo needs updating for this TRL version"
            )
        mask = inputs["completion_mask"][:, 1:]  # log-probs are of tokens 1..L-1
        n = mask.size(1)
        policy = captured["policy"][:, -n:]
        if self.precompute_ref_logps:
            if ref_tokens is None or ref_tokens.numel() != int(mask.sum()):
                raise RuntimeError(
                    "precomputed reference log-probs do not match the batch's completion tokens"
                )
            ref = torch.zeros_like(policy, dtype=torch.float32)
            ref[mask.bool()] = ref_tokens.to(ref.device, torch.float32)
        else:
            ref = captured["ref"][:, -n:]
        gather = self.accelerator.gather
        if self.kl == "full":
            # Yang et al.'s trainer: per pair, KL(reference || policy) over the vocabulary,
            # averaged over positions, chosen plus rejected; then the mean over pairs.
            select = mask.bool()
            rows = torch.arange(mask.size(0), device=mask.device)[:, None].expand_as(mask)[select]
            n_pairs = mask.size(0) // 2
            if ref_model is None:
                if ref_hidden is None or len(ref_hidden) != len(rows):
                    raise RuntimeError(
                        "precomputed reference hidden states do not match the batch's "
                        "completion tokens"
                    )
                weight, bias, text = self._ref_head
                ref_full = _project(ref_hidden.to(weight.device), weight, bias, text)
            else:
                ref_full = _head_log_probs(ref_model, hidden["ref"][:, :-1][:, -n:][select])
            per_seq = full_kl(
                _head_log_probs(policy_model, hidden["policy"][:, :-1][:, -n:][select]),
                ref_full,
                rows,
                mask.size(0),
            )
            kl_sum, n_units = (
                per_seq.sum(),
                torch.tensor(float(max(n_pairs, 1)), device=mask.device),
            )
        else:
            kl_sum, n_units = k3_kl(policy, ref, mask)
        kl = kl_sum / n_units.clamp(min=1)
        # Per-process scalars: gather all of them (gather_for_metrics would trim them as samples).
        total = gather(n_units.detach()).sum()
        self._metrics[mode]["kl"].append(
            (gather(kl_sum.detach()).sum() / total.clamp(min=1)).item()
        )
        self._metrics[mode]["dpo_loss"].append(gather(loss.detach()).mean().item())
        if self.kl_weight:
            loss = loss + self.kl_weight * kl
        return (loss, outputs) if return_outputs else loss


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
            self.logger.info(
                "step %d validation: loss %.4f, reward accuracy %.3f, margin %.4f, kl %.3g",
                state.global_step,
                logs["eval_loss"],
                logs.get("eval_rewards/accuracies", float("nan")),
                logs.get("eval_rewards/margins", float("nan")),
                logs.get("eval_kl", float("nan")),
            )
        elif "loss" in logs and (state.global_step % self.every == 0 or state.global_step == 1):
            self.logger.info(
                "step %d/%d train: loss %.4f, reward accuracy %.3f, margin %.4f, "
                "kl %.3g, lr %.3g, grad norm %.3g",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("rewards/accuracies", float("nan")),
                logs.get("rewards/margins", float("nan")),
                logs.get("kl", float("nan")),
                logs.get("learning_rate", float("nan")),
                logs.get("grad_norm", float("nan")),
            )


def training_args(settings: DPOSettings, checkpoint_dir: Path, device: str) -> dict[str, Any]:
    """The Trainer arguments every method shares: optimiser and schedule, batches, validation
    and early stopping, checkpoints, logging, seeds and device."""
    from accelerate import PartialState

    cuda = device.startswith("cuda")
    return dict(
        output_dir=str(checkpoint_dir),
        learning_rate=settings.learning_rate,
        # The DPO reference implementation warms up linearly, then holds the rate; a decay tied
        # to the epoch count would make early stopping change the schedule.
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps,
        optim="rmsprop" if settings.optimizer == "rmsprop" else "adamw_torch",
        weight_decay=0.0,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=accumulation_per_process(
            settings, PartialState().num_processes
        ),
        max_grad_norm=settings.max_grad_norm,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
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
        # TRL's configs default bf16 to True, which on a CPU means bf16 autocast: say it.
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        # Recomputation trades time for memory: worth it for large models on a GPU only. (The
        # new name; TRL's default for the deprecated gradient_checkpointing would warn.)
        activation_checkpointing=cuda,
        dataloader_num_workers=0,
    )


def dpo_config(settings: DPOSettings, checkpoint_dir: Path, device: str):
    from trl import DPOConfig

    return DPOConfig(
        **training_args(settings, checkpoint_dir, device),
        beta=settings.beta,
        loss_type=[settings.loss_type],
        # Prompt and completion budgets are applied per part in _prepare_dataset; TRL's own
        # max_length would drop pairs whose untruncated prompt is long.
        max_length=None,
    )


def callbacks_for(
    settings: DPOSettings, logger: logging.Logger | None, extra: Sequence[TrainerCallback]
) -> list[TrainerCallback]:
    """Early stopping, a checkpoint at every better validation, progress lines, then ``extra``."""
    return [
        EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience),
        _SaveOnImprovement(),
        _LogProgress(logger or _log, max(1, min(settings.eval_steps, 10))),
        *extra,
    ]


def make_trainer(
    model_dir: str | Path,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    settings: DPOSettings,
    *,
    checkpoint_dir: str | Path,
    device: str = "auto",
    callbacks: Sequence[TrainerCallback] = (),
    logger: logging.Logger | None = None,
):
    """A ready trainer of ``settings.trainer``: for DPO, a policy (float32 master weights,
    training mode) and a frozen reference, both loaded from the prepared folder ``model_dir``,
    on the ``prompt``/``chosen``/``rejected`` columns of ``train`` and ``validation``; the other
    trainers come from :mod:`.methods`. Texts are joined as ``prompt + completion``, so a
    completion carries its own leading space."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    device = resolve_device(device)
    if settings.trainer != "dpo":
        from dpotox.stages.dpo.methods import make_method_trainer

        trainer = make_method_trainer(
            model_dir,
            train,
            validation,
            settings,
            args=training_args(settings, Path(checkpoint_dir), device),
            callbacks=callbacks_for(settings, logger, callbacks),
        )
        trainer.remove_callback(PrinterCallback)
        return trainer
    # The optimizer updates float32 weights even when the prepared model is half precision;
    # on a GPU bf16 autocast supplies the speed.
    with quiet_progress_bars():
        policy, tok = load_prepared(model_dir, dtype="float32")
        reference, _ = load_prepared(model_dir)
    policy.train()
    reference.requires_grad_(False)
    cols = ["prompt", "chosen", "rejected"]
    train_ds = datasets.Dataset.from_pandas(
        train[cols].reset_index(drop=True), preserve_index=False
    )
    val_ds = datasets.Dataset.from_pandas(
        validation[cols].reset_index(drop=True), preserve_index=False
    )
    with quiet_progress_bars():
        trainer = KLDPOTrainer(
            model=policy,
            ref_model=reference,
            args=dpo_config(settings, Path(checkpoint_dir), device),
            train_dataset=train_ds,
            eval_dataset=val_ds,
            processing_class=tok,
            callbacks=callbacks_for(settings, logger, callbacks),
            kl_weight=settings.kl_weight,
            kl=settings.kl,
            max_prompt_length=settings.max_prompt_length,
            max_completion_length=settings.max_completion_length,
            precompute_ref=settings.precompute_ref_log_probs,
        )
    # With tqdm off, the Trainer prints every log dict to stdout; _LogProgress reports instead.
    trainer.remove_callback(PrinterCallback)
    return trainer


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
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
