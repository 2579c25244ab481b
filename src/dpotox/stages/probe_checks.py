"""Rule ``probe_checks``: is the probe direction one worth grouping neurons by?

Every neuron group, projection and editing condition is defined by the probe's direction
``w``. ``train_probe`` measures how well ``w`` classifies held-out texts and how much it moves
between refits on resamples of its training texts; this stage, which runs once the DPO model,
the evaluation and the neuron table exist, measures what those numbers mean for the findings:

**Stability of the groups.** For each bootstrap direction ``w_k`` (``bootstrap.safetensors``)
the neurons are grouped again exactly as the neuron table groups them (alignment: the sign of
``cos(v_i, w_k)``; the DPO-informed group: the edit group where ``delta_i(w_k) > 0``, else
``increased``, with the table's mean activations). Reported: the share of neurons whose
alignment or group differs from the one under ``w`` (mean and largest over the refits), and
the overlap of the top-256 toxic neurons (largest ``cos``; Lee et al. 2024) with ``w``'s.

**Validity.**

- ``cos_probe_free``: the cosine between ``w`` and the probe-free direction (the toxic minus
  the neutral words' mean input embedding, ``sweeps.toxic_words`` / ``neutral_words``); Yang et
  al. 2025 report 0.24 for GPT-2 medium.
- ``continuations``: the probe applied to what the base model wrote in its evaluation (the
  continuations alone), against the evaluation scorer's labels (toxic at
  ``probe.label_threshold``, clean below ``probe.clean_threshold``): does the probe detect
  toxicity in the model's own text, not only in the texts it was fit on?
- ``cos_dpo_shift``: the cosine between ``w`` and the mean shift DPO makes to the pooled final
  residual stream over the same texts (prompt and base continuation, teacher-forced through
  both models). A negative value says DPO moves the residual stream away from the probe's
  toxic side.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from dpotox.engine.arch import Adapter
from dpotox.io import write_json
from dpotox.plan.conditions import INCREASED
from dpotox.stages.neurons import (
    EXACT,
    sign_groups,
    table_decomposition,
    top_cosine_neurons,
    unit,
    value_geometry,
)
from dpotox.stages.probe import (
    ProbeConfig,
    ProbeError,
    _balanced_accuracy,
    _json_safe,
    auc,
    load_probe,
    pooled_features,
)

log = logging.getLogger("dpotox")
TOP_TOXIC = 256  # Lee et al. 2024's toxic neurons: the value vectors most aligned with w


def _groups(base: Adapter, dpo: Adapter, w: torch.Tensor, wbar_base, wbar_dpo, decomposition: str):
    """``(cos [L, d_mlp], group labels [L, d_mlp])`` under direction ``w``, as neuron_frame
    groups them (the written means and vectors of the table's decomposition)."""
    gb = value_geometry(base, w, decomposition)
    gd = value_geometry(dpo, w, decomposition)
    delta = wbar_base * gb.along - wbar_dpo * gd.along
    groups = np.where(delta > 0, sign_groups(gb.cos, wbar_base), INCREASED)
    return gb.cos, groups


def group_stability(
    base: Adapter,
    dpo: Adapter,
    w: torch.Tensor,
    directions: torch.Tensor,
    neurons: pd.DataFrame,
    decomposition: str = EXACT,
) -> dict[str, Any]:
    """How much alignment, groups and the top toxic neurons move under the refit directions
    (``decomposition``: the neuron table's, :func:`dpotox.stages.neurons.table_decomposition`)."""
    shape = (base.n_layers, base.d_mlp)
    if len(neurons) != shape[0] * shape[1]:
        raise ProbeError(
            f"the neuron table has {len(neurons)} rows but the model {shape[0]} x {shape[1]} "
            "neurons: it was built for another model; rerun rule neuron_table"
        )
    wbar_base = neurons["wbar_base"].to_numpy().reshape(shape)
    wbar_dpo = neurons["wbar_dpo"].to_numpy().reshape(shape)
    cos, groups = _groups(base, dpo, w, wbar_base, wbar_dpo, decomposition)
    if not np.array_equal(groups.ravel(), neurons["group"].to_numpy()):
        raise ProbeError(
            "the groups recomputed from the neuron table's mean activations differ from its "
            "group column: the table was built with another probe; rerun rule neuron_table"
        )
    n_top = min(TOP_TOXIC, cos.size // 4)
    top = set(top_cosine_neurons(cos, n_top))
    align, flips, overlap = [], [], []
    for wk in directions:
        cos_k, groups_k = _groups(base, dpo, wk, wbar_base, wbar_dpo, decomposition)
        align.append(float(((cos_k > 0) != (cos > 0)).mean()))
        flips.append(float((groups_k != groups).mean()))
        overlap.append(len(top & set(top_cosine_neurons(cos_k, n_top))) / n_top)
    if not flips:
        return {"n": 0}
    return {
        "n": len(flips),
        "alignment_flip_share_mean": float(np.mean(align)),
        "alignment_flip_share_max": float(np.max(align)),
        "group_flip_share_mean": float(np.mean(flips)),
        "group_flip_share_max": float(np.max(flips)),
        "top_toxic": n_top,
        "top_toxic_overlap_mean": float(np.mean(overlap)),
        "top_toxic_overlap_min": float(np.min(overlap)),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def continuation_check(
    adapter: Adapter, tok: Any, w: torch.Tensor, b: float, evals: pd.DataFrame, pc: ProbeConfig
) -> dict[str, Any]:
    """The probe on the base model's evaluation continuations against the scorer's labels."""
    texts = evals["continuation"].fillna("").tolist()
    keep = [i for i, t in enumerate(texts) if t.strip()]
    x = pooled_features(
        adapter,
        tok,
        [texts[i] for i in keep],
        max_tokens=pc.max_tokens,
        batch_size=pc.batch_size,
    )
    logits = (x.double() @ w.double() + b).numpy()
    score = evals["score"].to_numpy()[keep]
    label = np.where(score >= pc.label_threshold, 1, np.where(score < pc.clean_threshold, 0, -1))
    sure = label >= 0
    return {
        "n": len(keep),
        "n_toxic": int((label == 1).sum()),
        "n_clean": int((label == 0).sum()),
        "balanced_accuracy": _balanced_accuracy(logits[sure], label[sure]),
        "auc": auc(logits[sure], label[sure]),
        "spearman_with_score": _spearman(logits, score),
    }


def dpo_shift_cosine(
    base: Adapter, dpo: Adapter, tok: Any, w: torch.Tensor, evals: pd.DataFrame, pc: ProbeConfig
) -> float:
    """cos(w, mean over texts of the DPO model's pooled final residual minus the base's)."""
    texts = (evals["prompt"].fillna("") + evals["continuation"].fillna("")).tolist()
    kw = dict(max_tokens=pc.max_tokens, batch_size=pc.batch_size)
    shift = pooled_features(dpo, tok, texts, **kw).double().mean(0) - pooled_features(
        base, tok, texts, **kw
    ).double().mean(0)
    if float(shift.norm()) == 0.0:  # the same model twice: a shift with no direction
        return float("nan")
    return float(unit(shift) @ unit(w))


def probe_checks(
    *,
    base_model: str | Path,
    dpo_model: str | Path,
    probe_path: str | Path,
    bootstrap_path: str | Path,
    neurons_path: str | Path,
    base_eval: str | Path,
    cfg: Mapping[str, Any],
    out: str | Path,
    device: str = "cpu",
    metrics_path: str | Path | None = None,
    tables_root: str | Path | None = None,
    model_name: str = "",
) -> dict[str, Any]:
    """Rule ``probe_checks``: write ``checks.json`` (module doc) and, given the probe's
    ``metrics_path`` and ``tables_root``, the probe's tables
    (:func:`dpotox.outputs.probe_report.write_probe_tables`); return the checks."""
    from dpotox.engine.generate import inference_device
    from dpotox.sources.models import load_prepared
    from dpotox.stages.sweeps import word_contrast

    t0 = time.perf_counter()
    pc = ProbeConfig.from_config(cfg)
    sweeps = cfg.get("sweeps", {})
    device = inference_device(device)
    base_m, tok = load_prepared(base_model, device=device)
    dpo_m, _ = load_prepared(dpo_model, device=device)
    base, dpo = Adapter(base_m), Adapter(dpo_m)
    w, b = load_probe(probe_path, base.d_model)
    directions = load_file(str(bootstrap_path))["directions"]
    neurons = pd.read_parquet(neurons_path, columns=["wbar_base", "wbar_dpo", "group"])
    decomposition = table_decomposition(neurons_path)
    evals = pd.read_parquet(base_eval)
    contrast = word_contrast(
        base, tok, sweeps.get("toxic_words", []), sweeps.get("neutral_words", [])
    )
    result = {
        "stability": group_stability(base, dpo, w, directions, neurons, decomposition),
        "cos_probe_free": float(unit(contrast) @ unit(w)),
        "continuations": continuation_check(base, tok, w, b, evals, pc),
        "cos_dpo_shift": dpo_shift_cosine(base, dpo, tok, w, evals, pc),
        "seconds": time.perf_counter() - t0,
    }
    write_json(_json_safe(result), out, indent=2, allow_nan=False)
    if metrics_path is not None and tables_root is not None:
        from dpotox.outputs.probe_report import write_probe_tables

        metrics = json.loads(Path(metrics_path).read_text())
        write_probe_tables(metrics, _json_safe(result), tables_root, model_name)
    return result
