"""The probe's tables (rule ``probe_checks``): how far the direction every group rests on can
be trusted, from ``metrics.json`` (``train_probe``) and ``checks.json`` (``probe_checks``).

- ``table_probe``: one row per measure (held-out quality, evaluation prompts kept out, the
  direction's and the groups' stability under refits, the validity checks), with what a
  reader should compare it with;
- ``table_probe_learning_curve``: held-out quality against the number of training texts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dpotox.io import atomic_path
from dpotox.outputs.neuron_stats import to_markdown
from dpotox.plan.outputs import PROBE_TABLES


def probe_rows(metrics: Mapping[str, Any], checks: Mapping[str, Any]) -> pd.DataFrame:
    """``table_probe``: ``measure``, ``value``, ``compare with``."""
    stab, groups = metrics.get("stability", {}), checks.get("stability", {})
    held, cont = metrics.get("evaluation_prompts", {}), checks.get("continuations", {})
    rows = [
        ("test accuracy", metrics.get("test_accuracy"), "the papers' probes: 0.91 to 0.96"),
        ("test balanced accuracy", metrics.get("test_balanced_accuracy"), "0.5 is chance"),
        ("test AUC", metrics.get("test_auc"), ""),
        ("texts (train / test)", f"{metrics.get('n_train')} / {metrics.get('n_test')}", ""),
        ("evaluation prompts removed", held.get("removed"), "overlap left must be 0"),
        ("evaluation prompts overlap left", held.get("overlap"), "0"),
        ("refits: cos with w, mean", stab.get("cos_with_probe_mean"), "1 is a fixed direction"),
        ("refits: cos with w, 5th percentile", stab.get("cos_with_probe_p5"), ""),
        ("refits: share of neurons changing group, mean", groups.get("group_flip_share_mean"), ""),
        ("refits: share of neurons changing group, max", groups.get("group_flip_share_max"), ""),
        ("refits: share changing alignment, mean", groups.get("alignment_flip_share_mean"), ""),
        (
            f"refits: overlap of the top-{groups.get('top_toxic')} toxic neurons, mean",
            groups.get("top_toxic_overlap_mean"),
            "1 is the same set",
        ),
        (
            f"refits: overlap of the top-{groups.get('top_toxic')} toxic neurons, min",
            groups.get("top_toxic_overlap_min"),
            "",
        ),
        ("cos(w, probe-free direction)", checks.get("cos_probe_free"), "GPT-2 medium: 0.24"),
        (
            f"base continuations ({cont.get('n_toxic')} toxic, {cont.get('n_clean')} clean): "
            "balanced accuracy",
            cont.get("balanced_accuracy"),
            "labels: the evaluation scorer",
        ),
        ("base continuations: AUC", cont.get("auc"), ""),
        (
            "base continuations: rank correlation with the score",
            cont.get("spearman_with_score"),
            "",
        ),
        (
            "cos(w, DPO's mean residual shift)",
            checks.get("cos_dpo_shift"),
            "negative: away from toxic",
        ),
    ]
    return pd.DataFrame(rows, columns=["measure", "value", "compare with"], dtype=object)


def curve_rows(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """``table_probe_learning_curve``: one row per share of the training split."""
    return pd.DataFrame(metrics.get("learning_curve", []))


def _write(df: pd.DataFrame, root: Path, name: str, model: str) -> None:
    with atomic_path(root / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(root / f"{name}.md") as tmp:
        tmp.write_text(f"# {PROBE_TABLES[name]}: {model}\n\n{to_markdown(df)}")


def write_probe_tables(
    metrics: Mapping[str, Any], checks: Mapping[str, Any], root: str | Path, model: str
) -> list[Path]:
    """Write every table of :data:`~dpotox.plan.outputs.PROBE_TABLES` (CSV and markdown) for
    ``model`` under ``root`` (``results/tables``)."""
    out = Path(root) / model
    out.mkdir(parents=True, exist_ok=True)
    _write(probe_rows(metrics, checks), out, "table_probe", model)
    _write(curve_rows(metrics), out, "table_probe_learning_curve", model)
    return [out / f"{n}.{e}" for n in PROBE_TABLES for e in ("csv", "md")]
