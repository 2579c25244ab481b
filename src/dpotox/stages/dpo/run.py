"""The DPO stage: claim or resume the checkpoints, train, publish the model and the log.

:func:`train_dpo` is what rule ``train_dpo`` runs (through ``python -m dpotox train-dpo``, so
that ``accelerate launch`` can start it once per GPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpotox.errors import DPOError
from dpotox.io import PARTIAL, atomic_dir, write_json, write_parquet
from dpotox.plan.training import DPOSettings
from dpotox.sources.models import resolve_device

_log = logging.getLogger("dpotox")

# Written into the checkpoint folder: which run the checkpoints belong to.
RUN_MARKER = "dpotox-run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys of the Trainer's log rows that describe speed, not training; left out of the log table.
_NOT_METRICS = re.compile(r"(_runtime|_per_second|total_flos|^train_loss)$")
_LOG_COLUMNS = [
    "step",
    "epoch",
    "split",
    "loss",
    "dpo_loss",
    "kl",
    "rewards/margins",
    "rewards/accuracies",
    "rewards/chosen",
    "rewards/rejected",
    "learning_rate",
    "grad_norm",
]


def split_pairs(
    pairs: pd.DataFrame, validation_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, validation)``: a seeded random split, each keeping the input order.

    The validation split has ``round(n * validation_fraction)`` pairs, at least one, and
    leaves at least one for training.

    Raises:
        DPOError: fewer than two pairs.
    """
    n = len(pairs)
    if n < 2:
        raise DPOError(
            f"DPO needs at least 2 preference pairs (one to train on, one to "
            f"validate), got {n}; build more pairs (dpo.pairs) or give data.pairs"
        )
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (pairs.iloc[train].reset_index(drop=True), pairs.iloc[val].reset_index(drop=True))


def checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-<step>`` folders (their trainer state is written last), by step."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            if _trainer_state(p) is None:
                _log.warning(
                    "%s: its trainer_state.json cannot be read (a save was cut short); "
                    "not resuming from it",
                    p,
                )
                continue
            found.append((int(m.group(1)), p))
    return sorted(found)


def _trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer state, or None if the file is empty, cut short or not JSON."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def _finished(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was taken when training had reached its end or stopped early."""
    state = _trainer_state(checkpoint) or {}
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return state.get("global_step", 0) >= state.get("max_steps", 1) or bool(
        control.get("should_training_stop")
    )


def _run_fingerprint(model_dir: Path, pairs: pd.DataFrame, settings: DPOSettings) -> dict[str, Any]:
    """What a checkpoint must have been trained from to be resumed."""
    h = hashlib.sha256()
    for col in ("prompt", "chosen", "rejected"):
        for text in pairs[col]:
            h.update(str(text).encode())
            h.update(b"\0")
    weights = model_dir / "model.safetensors"
    return {
        "settings": settings.to_dict(),
        "pairs_sha256": h.hexdigest(),
        "base_source_sha256": hashlib.sha256((model_dir / "source.json").read_bytes()).hexdigest(),
        "base_weights_bytes": weights.stat().st_size if weights.is_file() else None,
    }


def _clear_checkpoints(checkpoint_dir: Path) -> None:
    for _, path in checkpoints(checkpoint_dir):
        shutil.rmtree(path)
    for p in checkpoint_dir.glob("checkpoint-*"):  # incomplete ones
        if p.is_dir():
            shutil.rmtree(p)
    for name in (RUN_MARKER, "README.md"):  # README.md: TRL's model card
        (checkpoint_dir / name).unlink(missing_ok=True)


def _claim_checkpoints(
    checkpoint_dir: Path, fingerprint: dict[str, Any], logger: logging.Logger
) -> None:
    """Keep the checkpoints only if they come from this very run (same pairs, base, settings)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker = checkpoint_dir / RUN_MARKER
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as it reads back from the file
    previous = json.loads(marker.read_text()) if marker.is_file() else None
    if previous != fingerprint and (
        checkpoints(checkpoint_dir) or any(checkpoint_dir.glob("checkpoint-*"))
    ):
        logger.warning(
            "%s holds checkpoints of another run (different pairs, base model or "
            "settings); removing them and starting from step 0",
            checkpoint_dir,
        )
        _clear_checkpoints(checkpoint_dir)
    write_json(fingerprint, marker, indent=2)


def log_table(log_history: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per logged training step and per validation, from ``trainer.state.log_history``.

    Columns: step, epoch, split (train/eval), loss, dpo_loss, kl, rewards/*, learning_rate,
    grad_norm, then TRL's other metrics (log-probs, logits, entropy...); NaN where absent.
    """
    rows = []
    for entry in log_history:
        if "eval_loss" in entry:
            split = "eval"
            metrics = {
                k.removeprefix("eval_"): v
                for k, v in entry.items()
                if k.startswith("eval_") and not _NOT_METRICS.search(k)
            }
        elif "loss" in entry:
            split = "train"
            metrics = {
                k: v
                for k, v in entry.items()
                if k not in ("step", "epoch") and not _NOT_METRICS.search(k)
            }
        else:  # the end-of-training summary
            continue
        row = {
            "step": int(entry["step"]),
            "epoch": float(entry.get("epoch", float("nan"))),
            "split": split,
        }
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
    return {
        "eval_loss": float(row["loss"]),
        "eval_reward_accuracy": float(row["rewards/accuracies"]),
        "eval_reward_margin": float(row["rewards/margins"]),
        "eval_kl": float(row["kl"]),
    }


def train_dpo(
    model_dir: str | Path,
    pairs: pd.DataFrame,
    out_dir: str | Path,
    settings: DPOSettings,
    *,
    checkpoint_dir: str | Path,
    log_path: str | Path,
    device: str = "auto",
    log: logging.Logger | None = None,
    callbacks: Sequence[Any] = (),
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Fine-tune the prepared model in ``model_dir`` on ``pairs`` with DPO or the alignment
    method ``settings.trainer`` names (:mod:`.methods`); write the best model.

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
    from accelerate import PartialState

    from dpotox.stages.dpo.trainer import make_trainer

    logger = log if log is not None else _log
    t0 = time.time()
    model_dir, out_dir, checkpoint_dir = Path(model_dir), Path(out_dir), Path(checkpoint_dir)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in pairs]
    if missing:
        raise DPOError(f"preference pairs lack column(s) {', '.join(missing)}")
    train, val = split_pairs(pairs, settings.validation_fraction, settings.seed)
    # On CPUs the processes of `accelerate launch` form a group only when the state says CPU.
    state = PartialState(cpu=resolve_device(device) == "cpu")
    resume_step, resume_path = _claim(checkpoint_dir, model_dir, pairs, settings, state, logger)
    trainer = make_trainer(
        model_dir,
        train,
        val,
        settings,
        checkpoint_dir=checkpoint_dir,
        device=device,
        callbacks=callbacks,
        logger=logger,
    )
    _log_start(trainer.args, model_dir, len(train), len(val), settings, logger)
    _train_or_restore(trainer, resume_step, resume_path, logger)
    table = log_table(trainer.state.log_history)
    summary = _summary(trainer.state, table, resume_step, len(train), len(val))
    _publish(trainer, out_dir, log_path, model_dir, settings, table, summary, state, t0)
    state.wait_for_everyone()
    if state.is_main_process and not keep_checkpoints:
        _clear_checkpoints(checkpoint_dir)
        with contextlib.suppress(OSError):
            checkpoint_dir.rmdir()  # only if nothing else is in it
    summary.setdefault("seconds", round(time.time() - t0, 1))
    logger.info(
        "%s done: %d steps%s, best validation loss %s at step %s, %.1f s",
        _label(settings),
        summary["steps"],
        " (stopped early)" if summary["stopped_early"] else "",
        round(summary["best_eval_loss"], 4) if summary["best_eval_loss"] is not None else None,
        summary["best_step"],
        summary["seconds"],
    )
    return summary


def _label(settings: DPOSettings) -> str:
    """How the log names the method: ``DPO (sigmoid)``, ``KTO (kto)``, ``CPO (simpo)``."""
    return f"{settings.trainer.upper()} ({settings.loss_type})"


def _claim(
    checkpoint_dir: Path,
    model_dir: Path,
    pairs: pd.DataFrame,
    settings: DPOSettings,
    state: Any,
    logger: logging.Logger,
) -> tuple[int, Path | None]:
    """Keep only this run's checkpoints (process 0 decides); the latest one to resume from."""
    if state.is_main_process:
        _claim_checkpoints(checkpoint_dir, _run_fingerprint(model_dir, pairs, settings), logger)
    state.wait_for_everyone()
    found = checkpoints(checkpoint_dir)
    return found[-1] if found else (0, None)


def _log_start(
    args: Any,
    model_dir: Path,
    n_train: int,
    n_val: int,
    settings: DPOSettings,
    logger: logging.Logger,
) -> None:
    logger.info(
        "%s on %s: %d train / %d validation pairs, device %s%s, %s lr %.3g, beta %.3g, "
        "kl_weight %.3g, effective batch %d (%d %s x %d accumulated x %d processes)",
        _label(settings),
        model_dir,
        n_train,
        n_val,
        args.device,
        " (bf16)" if args.bf16 else "",
        settings.optimizer,
        settings.learning_rate,
        settings.beta,
        settings.kl_weight,
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        args.per_device_train_batch_size,
        # KTO's examples are unpaired: each pair gives a desirable and an undesirable one.
        "examples" if settings.trainer == "kto" else "pairs",
        args.gradient_accumulation_steps,
        args.world_size,
    )


def _train_or_restore(
    trainer: Any, resume_step: int, resume_path: Path | None, logger: logging.Logger
) -> None:
    """Train (from ``resume_path`` if given), or restore the best model of a finished run."""
    from transformers.trainer_callback import TrainerState

    from dpotox.stages.dpo.trainer import quiet_progress_bars

    if resume_path is not None and _finished(resume_path):
        # The Trainer would take one more step before noticing it is done; restore the best
        # model as its end of training does, and go on to write the outputs.
        logger.info(
            "%s ends a finished run (step %d); writing its best model", resume_path, resume_step
        )
        trainer.state = TrainerState.load_from_json(str(resume_path / "trainer_state.json"))
        if (
            trainer.state.best_model_checkpoint
            and Path(trainer.state.best_model_checkpoint).is_dir()
        ):
            with quiet_progress_bars():
                trainer._load_best_model()
        return
    if resume_path is not None:
        logger.info("resuming from %s (step %d)", resume_path, resume_step)
        _continue_token_count(trainer, resume_path)
    with quiet_progress_bars():
        trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)


def _continue_token_count(trainer: Any, checkpoint: Path) -> None:
    """TRL counts the tokens trained on (``num_tokens`` in the log) from 0 in every process
    it starts; after a resume, go on from the count the checkpoint logged last."""
    history = (_trainer_state(checkpoint) or {}).get("log_history", [])
    seen = [e["num_tokens"] for e in history if "num_tokens" in e and "loss" in e]
    if seen and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = int(seen[-1])


def _summary(
    st: Any, table: pd.DataFrame, resume_step: int, n_train: int, n_val: int
) -> dict[str, Any]:
    """What :func:`train_dpo` returns and writes into the model's ``source.json``."""
    best_step = None
    if st.best_model_checkpoint:
        m = _CHECKPOINT.match(Path(st.best_model_checkpoint).name)
        best_step = int(m.group(1)) if m else None
    best = _eval_at(table, best_step)
    last_train = table[table["split"] == "train"].tail(1)
    return {
        "steps": st.global_step,
        "max_steps": st.max_steps,
        "stopped_early": st.global_step < st.max_steps,
        "best_step": best_step,
        "best_eval_loss": best.get("eval_loss"),
        "resumed_from_step": resume_step,
        "n_train": n_train,
        "n_val": n_val,
        **{k: v for k, v in best.items() if k != "eval_loss"},
        "train_reward_accuracy": (
            float(last_train["rewards/accuracies"].iloc[0]) if len(last_train) else None
        ),
        "train_kl": float(last_train["kl"].iloc[0]) if len(last_train) else None,
    }


def _publish(
    trainer: Any,
    out_dir: Path,
    log_path: str | Path,
    model_dir: Path,
    settings: DPOSettings,
    table: pd.DataFrame,
    summary: dict[str, Any],
    state: Any,
    t0: float,
) -> None:
    """Write the model folder (complete or absent) and the log; process 0 writes, every process
    takes part in saving (sharded weights are gathered)."""
    import trl

    from dpotox.stages.dpo.trainer import quiet_progress_bars

    staging = out_dir.parent / PARTIAL / f"{out_dir.name}.dpo"  # one name for every process
    main = state.is_main_process
    with atomic_dir(out_dir, staging=staging, publish=main) as staging:
        state.wait_for_everyone()
        with quiet_progress_bars():
            trainer.save_model(str(staging))
        if main:
            (staging / "training_args.bin").unlink(missing_ok=True)
            summary["seconds"] = round(time.time() - t0, 1)
            meta = json.loads((model_dir / "source.json").read_text())
            meta["dtype"] = str(
                next(trainer.accelerator.unwrap_model(trainer.model).parameters()).dtype
            ).removeprefix("torch.")
            meta["dpo"] = {
                "base_model": str(model_dir),
                "settings": settings.to_dict(),
                **summary,
                "trl": trl.__version__,
            }
            write_json(meta, staging / "source.json", indent=2)
            write_parquet(
                table,
                log_path,
                metadata={
                    "dpo_settings": json.dumps(settings.to_dict()),
                    "resumed_from_step": str(summary["resumed_from_step"]),
                    "base_model": str(model_dir),
                },
            )
