"""Reading rule evaluate's outputs for the tables: summaries, per-prompt scores, and the
paired bootstrap that compares conditions on the same prompts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dpotox.errors import TablesError

SUMMARY_KEYS = (
    "condition",
    "toxicity",
    "toxicity_ci_low",
    "toxicity_ci_high",
    "ci_level",
    "log_ppl",
    "f1",
    "n_prompts",
    "n_edited_neurons",
    "bootstrap_samples",
    "settings",
)


def load_summary(eval_dir: str | Path, condition: str) -> dict[str, Any]:
    """The summary JSON of one condition, checked for every key the tables read."""
    path = Path(eval_dir) / f"{condition}.json"
    if not path.is_file():
        raise TablesError(
            f"{path} does not exist: condition {condition!r} is listed but was not "
            "evaluated; run rule evaluate for it, or drop it from the conditions"
        )
    try:
        s = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TablesError(f"{path} is not valid JSON ({e}); re-run rule evaluate") from None
    missing = [k for k in SUMMARY_KEYS if k not in s]
    if "seed" not in (s.get("settings") or {}):
        missing.append("settings.seed")
    if missing:
        raise TablesError(
            f"{path} lacks {', '.join(dict.fromkeys(missing))}: it was written by "
            f"an older dpotox; re-run rule evaluate for {condition!r}"
        )
    if s["condition"] != condition:
        raise TablesError(
            f"{path} holds condition {s['condition']!r}, not {condition!r}; "
            "re-run rule evaluate for it"
        )
    return s


def condition_scores(eval_dir: Path, condition: str) -> pd.Series:
    """Per-prompt toxicity scores of one condition, indexed by prompt id."""
    path = eval_dir / f"{condition}.parquet"
    if not path.is_file():
        raise TablesError(
            f"{path} does not exist: the paired bootstrap needs the per-prompt "
            f"scores; re-run rule evaluate for {condition!r}"
        )
    if missing := {"id", "score"} - set(pq.read_schema(path).names):
        raise TablesError(
            f"{path} lacks column(s) {', '.join(sorted(missing))}; re-run rule evaluate"
        )
    df = pd.read_parquet(path, columns=["id", "score"])
    if df["id"].duplicated().any():
        raise TablesError(f"{path} lists a prompt id twice; re-run rule evaluate for {condition!r}")
    return pd.Series(df["score"].to_numpy(float), index=df["id"].astype(str), name=condition)


def paired_bootstrap(
    columns: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray],
    *,
    samples: int,
    level: float,
    seed: int,
) -> tuple[float, float, float]:
    """``stat`` of the column means of an (n prompts, k) array, with a percentile interval from
    resampling whole rows (prompts), so that the k conditions stay paired. Resamples where the
    statistic is undefined (a zero denominator) are left out."""
    point = float(stat(columns.mean(axis=0)))
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, samples, 256):
        idx = rng.integers(0, len(columns), size=(min(256, samples - start), len(columns)))
        with np.errstate(divide="ignore", invalid="ignore"):
            draws.append(stat(columns[idx].mean(axis=1)))
    draws = np.concatenate(draws)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return point, math.nan, math.nan
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return point, float(low), float(high)


def paired_scores(
    eval_dir: Path, conditions: list[str], ids: list[str] | None = None
) -> np.ndarray:
    """Per-prompt scores of ``conditions`` as columns, rows aligned by prompt id (only the
    prompts ``ids``, in that order, if given)."""
    series = [condition_scores(eval_dir, c) for c in conditions]
    for s in series[1:]:
        if set(s.index) != set(series[0].index):
            raise TablesError(
                f"{eval_dir}: {series[0].name}.parquet and {s.name}.parquet hold "
                f"different prompts ({len(series[0])} vs {len(s)}); evaluate both "
                "on the same prompts"
            )
    index = series[0].index if ids is None else pd.Index(ids)
    if ids is not None and (missing := set(ids) - set(series[0].index)):
        raise TablesError(f"{eval_dir}: no score for prompt(s) {sorted(missing)[:3]}")
    return np.column_stack([s.reindex(index).to_numpy() for s in series])


def prompt_halves(ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    """``(tuning, held-out)``: the prompt ids split in two by a permutation seeded with
    ``seed`` (sorted first, so the split does not depend on the file's row order). A choice
    (the best editing point) is made on the first half and reported on the second."""
    order = [str(i) for i in np.random.default_rng(seed).permutation(sorted(map(str, ids)))]
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])
