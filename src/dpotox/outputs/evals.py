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
from dpotox.plan.conditions import Patching, prompt_halves, try_parse

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


def cross_fit_parts(condition: str) -> tuple[str, str] | None:
    """``(fit-a, fit-b)`` condition names of a cross-fitted patch ``patch-SET-cross-fit``;
    None for any other condition."""
    p = try_parse(condition)
    if isinstance(p, Patching) and p.fit == "cross":
        return p.fitted("a").name, p.fitted("b").name
    return None


def load_summary(eval_dir: str | Path, condition: str) -> dict[str, Any]:
    """The summary JSON of one condition, checked for every key the tables read; for a
    cross-fitted patch, the summary :func:`cross_fit_summary` combines."""
    if cross_fit_parts(condition):
        return cross_fit_summary(Path(eval_dir), condition)
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
    """Per-prompt toxicity scores of one condition, indexed by prompt id (a cross-fitted
    patch's: each prompt scored under the fit of the other half)."""
    if cross_fit_parts(condition):
        table = cross_fit_table(Path(eval_dir), condition)
        return pd.Series(table["score"].to_numpy(float), index=table["id"], name=condition)
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
    return stack_scores([condition_scores(eval_dir, c) for c in conditions], eval_dir, ids)


def stack_scores(
    series: list[pd.Series], where: str | Path, ids: list[str] | None = None
) -> np.ndarray:
    """Per-prompt score series (:func:`condition_scores`) as columns, rows aligned by prompt
    id (only the prompts ``ids``, in that order, if given); ``where`` names them in errors.

    Raises:
        TablesError: the series hold different prompts, or lack one of ``ids``.
    """
    for s in series[1:]:
        if set(s.index) != set(series[0].index):
            raise TablesError(
                f"{where}: {series[0].name}.parquet and {s.name}.parquet hold "
                f"different prompts ({len(series[0])} vs {len(s)}); evaluate both "
                "on the same prompts"
            )
    index = series[0].index if ids is None else pd.Index(ids)
    if ids is not None and (missing := set(ids) - set(series[0].index)):
        raise TablesError(f"{where}: no score for prompt(s) {sorted(missing)[:3]}")
    return np.column_stack([s.reindex(index).to_numpy() for s in series])


def cross_fit_table(eval_dir: Path, condition: str) -> pd.DataFrame:
    """The per-prompt rows of a cross-fitted patch: the prompts of the held-out half from
    ``-fit-a`` (fitted on the tuning half) and those of the tuning half from ``-fit-b``, in
    the order of ``-fit-a``'s file. The halves are :func:`prompt_halves` with the
    evaluation's seed, as sweep_specs fitted them."""
    fit_a, fit_b = cross_fit_parts(condition)
    seed = int(load_summary(eval_dir, fit_a)["settings"]["seed"])
    tables = {}
    for c in (fit_a, fit_b):
        path = eval_dir / f"{c}.parquet"
        if not path.is_file():
            raise TablesError(
                f"{path} does not exist: the cross-fitted {condition} needs both fits' "
                f"per-prompt scores; re-run rule evaluate for {c!r}"
            )
        tables[c] = pd.read_parquet(path).assign(id=lambda d: d["id"].astype(str))
    ids = tables[fit_a]["id"].tolist()
    if set(ids) != set(tables[fit_b]["id"]):
        raise TablesError(
            f"{eval_dir}: {fit_a}.parquet and {fit_b}.parquet hold different prompts; "
            "evaluate both on the same prompts"
        )
    tune, held = prompt_halves(ids, seed)
    parts = pd.concat(
        [
            tables[fit_a][tables[fit_a]["id"].isin(held)],
            tables[fit_b][tables[fit_b]["id"].isin(tune)],
        ]
    )
    return parts.set_index("id").loc[ids].reset_index()


def cross_fit_summary(eval_dir: Path, condition: str) -> dict[str, Any]:
    """The summary of a cross-fitted patch, in the keys of rule evaluate's: toxicity (both
    scorers) with its bootstrap CI and the continuations' quality from the combined
    per-prompt rows; log-perplexities, F1 and the neuron count are the mean of the two fits'
    (their Wikipedia texts are no evaluation prompt, so neither fit was chosen on them)."""
    from dpotox.engine.metrics import text_quality  # torch: only where a table needs it

    parts = [load_summary(eval_dir, c) for c in cross_fit_parts(condition)]
    table = cross_fit_table(eval_dir, condition)
    first = parts[0]
    boot = {
        "samples": int(first["bootstrap_samples"]),
        "level": float(first["ci_level"]),
        "seed": int(first["settings"]["seed"]),
    }

    def ci(column: str) -> tuple[float, float, float]:
        scores = table[column].to_numpy(float)[:, None]
        return paired_bootstrap(scores, lambda m: m[..., 0], **boot)

    def mean(key: str) -> float | None:
        values = [p.get(key) for p in parts]
        return None if any(v is None for v in values) else float(np.mean(values))

    tox = ci("score")
    pairs = ci("pairs_score") if "pairs_score" in table and first.get("pairs_scorer") else None
    return {
        **{k: v for k, v in first.items() if k in ("scorer", "pairs_scorer", "settings")},
        "condition": condition,
        "spec": None,
        "description": f"{parts[0]['condition']} on the held-out half's prompts, "
        f"{parts[1]['condition']} on the tuning half's",
        "spec_meta": {},
        "n_prompts": len(table),
        "n_edited_neurons": int(round(np.mean([p["n_edited_neurons"] for p in parts]))),
        "toxicity": tox[0],
        "toxicity_ci_low": tox[1],
        "toxicity_ci_high": tox[2],
        "ci_level": boot["level"],
        "bootstrap_samples": boot["samples"],
        "pairs_toxicity": pairs[0] if pairs else None,
        "pairs_toxicity_ci_low": pairs[1] if pairs else None,
        "pairs_toxicity_ci_high": pairs[2] if pairs else None,
        "frac_toxic": float((table["score"] >= 0.5).mean()),
        **text_quality(table["continuation"].tolist()),
        **{k: mean(k) for k in ("log_ppl", "log_ppl_generation", "log_ppl_first", "f1")},
        **{k: next((p[k] for p in parts if p.get(k)), None) for k in ("ppl_note", "f1_note")},
        "cross_fit": [p["condition"] for p in parts],
    }
