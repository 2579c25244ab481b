"""The alignment methods and seeds side by side (rule ``methods_tables``).

Every run of :mod:`dpotox.plan.alignment` (DPO, its other seeds, IPO, KTO, ORPO, SimPO...) is
evaluated and has a neuron table of its own against the same base model, probe and prompts. This
module puts them next to each other:

- :func:`methods_table`: a row per run (and the base model): toxicity under both scorers with
  its CI, the paired difference to DPO, the perplexities, F1 and text diversity; the share of
  neurons that reduce their projection on the probe (claim C3) and each group's share of the
  reduction (Table 5's TP/TN/AP/AN); and what patching the four groups and the toxic neurons to
  the run's own means recovers of the run's reduction (claims C4 and C2, Table 3);
- :func:`seed_spread`: per method with several seeds, the mean, SD, min and max of those numbers
  across seeds, and how stable the groups are: the Jaccard overlap of each group's neurons and
  the correlation of the per-neuron reduction, over every pair of seeds;
- :func:`layer_reduction`: Fig. 3's per-layer reduction by group for every run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dpotox.errors import TablesError
from dpotox.outputs.evals import (
    condition_scores,
    load_summary,
    paired_bootstrap,
    paired_scores,
    stack_scores,
)
from dpotox.outputs.neuron_stats import group_shares, layer_group_reduction
from dpotox.plan.alignment import DEFAULT_RUN, AlignmentRun
from dpotox.plan.conditions import GROUPS

# Evaluation numbers of each run, as the evaluation JSON names them.
_EVAL = (
    "toxicity",
    "toxicity_ci_low",
    "toxicity_ci_high",
    "pairs_toxicity",
    "log_ppl",
    "log_ppl_generation",
    "f1",
    "distinct_2",
    "repetition",
    "empty_share",
)
# The numbers whose spread across seeds the seed table gives.
SPREAD = (
    "toxicity",
    "pairs_toxicity",
    "log_ppl",
    "log_ppl_generation",
    "f1",
    "pct_reducing",
    *(f"share_{g}" for g in GROUPS),
)


def neuron_summary(neurons: pd.DataFrame) -> dict[str, float]:
    """Claim C3's share of neurons that reduce their projection, the net reduction, and each
    group's share of the total reduction (Table 5), in percent."""
    shares = group_shares(neurons).set_index("group")
    out = {
        "pct_reducing": 100 * float((neurons["delta"] > 0).mean()),
        "net_reduction": float(neurons["delta"].sum()),
    }
    out.update({f"share_{g}": float(shares.at[g, "pct_of_reduction"]) for g in GROUPS})
    return out


def methods_table(
    runs: Sequence[AlignmentRun],
    eval_dir: str | Path,
    neuron_tables: Mapping[str, str | Path],
    models: Mapping[str, str | Path],
    *,
    patches: Sequence[str] = (),
    patch_dirs: Mapping[str, str | Path] | None = None,
    bootstrap_samples: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """A row for the base model, then one per run in ``runs`` order.

    ``neuron_tables`` and ``models``: run name -> its ``neurons.parquet`` and model folder (the
    training record in ``source.json`` gives the steps). ``minus_dpo`` is the run's toxicity
    minus DPO's on the same prompts, with a paired bootstrap CI over prompts. ``patches``:
    patch conditions evaluated for every run, each in the run's folder of ``patch_dirs`` (run
    -> eval folder): the base model with the patched neurons set to that run's means. Their
    ``recovered`` share is Table 3's, of the run's own reduction:
    100 (base - patched) / (base - run), paired over prompts.

    Raises:
        TablesError: an evaluation, neuron table or model record is missing or unreadable.
    """
    eval_dir = Path(eval_dir)
    boot = dict(samples=bootstrap_samples, level=ci_level, seed=seed)
    rows = [{"run": "base", "method": "base", **_eval_numbers(eval_dir, "base")}]
    for run in runs:
        row: dict[str, Any] = {
            "run": run.name,
            "method": run.method,
            "trainer": run.trainer,
            "seed": run.seed,
        }
        row.update(_training_record(Path(models[run.name])))
        row.update(_eval_numbers(eval_dir, run.name))
        diff = paired_bootstrap(
            paired_scores(eval_dir, [run.name, DEFAULT_RUN]),
            lambda m: m[..., 0] - m[..., 1],
            **boot,
        )
        row.update(dict(zip(("minus_dpo", "minus_dpo_low", "minus_dpo_high"), diff, strict=True)))
        row.update(neuron_summary(_read_neurons(neuron_tables[run.name])))
        for patch in patches:
            row.update(
                _recovered(patch, eval_dir, Path((patch_dirs or {})[run.name]), run.name, boot=boot)
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _recovered(
    patch: str, eval_dir: Path, patch_dir: Path, run: str, *, boot: Mapping[str, Any]
) -> dict[str, float]:
    """A patch's toxicity and the share of ``run``'s reduction it recovers, paired over
    prompts (base and the run from ``eval_dir``, the patch from ``patch_dir``)."""
    columns = stack_scores(
        [
            condition_scores(eval_dir, "base"),
            condition_scores(patch_dir, patch),
            condition_scores(eval_dir, run),
        ],
        f"{eval_dir} and {patch_dir}",
    )
    share = paired_bootstrap(
        columns, lambda m: 100 * (m[..., 0] - m[..., 1]) / (m[..., 0] - m[..., 2]), **boot
    )
    summary = load_summary(patch_dir, patch)
    keys = ("recovered", "recovered_low", "recovered_high")
    return {f"{patch}_toxicity": summary["toxicity"]} | {
        f"{patch}_{k}": v for k, v in zip(keys, share, strict=True)
    }


def seed_spread(
    table: pd.DataFrame, runs: Sequence[AlignmentRun], neuron_tables: Mapping[str, str | Path]
) -> pd.DataFrame:
    """Per method trained at two or more seeds: for each number of :data:`SPREAD` and each
    patch's toxicity and recovered share, its mean, SD (ddof 1), min and max across the seeds;
    then the groups' stability over every pair of seeds: ``jaccard_<group>`` (the overlap of
    the neurons in that group, |A & B| / |A | B|) and ``delta_r`` (Pearson's r of the
    per-neuron reduction), as mean, min and max over the pairs. Empty when no method has
    several seeds."""
    stats = [c for c in SPREAD if c in table.columns] + [
        c
        for c in table.columns
        if c.startswith("patch-") and c.endswith(("_toxicity", "_recovered"))
    ]
    by_method: dict[str, list[AlignmentRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    rows = []
    indexed = table.set_index("run")
    for method, group in by_method.items():
        if len(group) < 2:
            continue
        names = [r.name for r in group]
        for stat in stats:
            values = indexed.loc[names, stat].astype(float)
            rows.append(_spread_row(method, names, stat, values.to_numpy()))
        neurons = {n: _read_neurons(neuron_tables[n]) for n in names}
        pairs = list(itertools.combinations(names, 2))
        for g in GROUPS:
            rows.append(
                _spread_row(
                    method,
                    names,
                    f"jaccard_{g}",
                    np.array([_jaccard(neurons[a], neurons[b], g) for a, b in pairs]),
                    over="seed pairs",
                )
            )
        rows.append(
            _spread_row(
                method,
                names,
                "delta_r",
                np.array([_delta_r(neurons[a], neurons[b]) for a, b in pairs]),
                over="seed pairs",
            )
        )
    columns = ["method", "runs", "statistic", "over", "n", "mean", "sd", "min", "max"]
    return pd.DataFrame(rows, columns=columns)


def layer_reduction(neuron_tables: Mapping[str, str | Path]) -> pd.DataFrame:
    """Fig. 3's table (each layer's reduction by group, the increase, the net) for every run,
    stacked with a ``run`` column."""
    parts = [
        layer_group_reduction(_read_neurons(path)).assign(run=name)
        for name, path in neuron_tables.items()
    ]
    out = pd.concat(parts, ignore_index=True)
    return out[["run", *[c for c in out.columns if c != "run"]]]


def write_methods_tables(
    runs: Sequence[AlignmentRun],
    eval_dir: str | Path,
    neuron_tables: Mapping[str, str | Path],
    models: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    model: str = "",
    patches: Sequence[str] = (),
    patch_dirs: Mapping[str, str | Path] | None = None,
    bootstrap_samples: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Rule ``methods_tables``: every table of :data:`dpotox.plan.outputs.METHOD_TABLES`, as
    CSV (and markdown where it says so) in ``out_dir``."""
    from dpotox.io import atomic_path
    from dpotox.outputs.neuron_stats import to_markdown
    from dpotox.plan.outputs import METHOD_TABLES

    table = methods_table(
        runs,
        eval_dir,
        neuron_tables,
        models,
        patches=patches,
        patch_dirs=patch_dirs,
        bootstrap_samples=bootstrap_samples,
        ci_level=ci_level,
        seed=seed,
    )
    tables = {
        "table_methods": table,
        "table_method_seeds": seed_spread(table, runs, neuron_tables),
        "table_methods_layers": layer_reduction(neuron_tables),
    }
    out_dir = Path(out_dir)
    for name, df in tables.items():
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        title = METHOD_TABLES[name]
        if title:
            head = f"# {name}" + (f" ({model})" if model else "") + f": {title}"
            with atomic_path(out_dir / f"{name}.md") as tmp:
                tmp.write_text(f"{head}\n\n{to_markdown(df)}")
    return tables


def _spread_row(
    method: str, names: Sequence[str], stat: str, values: np.ndarray, over: str = "seeds"
) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    return {
        "method": method,
        "runs": ", ".join(names),
        "statistic": stat,
        "over": over,
        "n": len(values),
        "mean": float(values.mean()) if len(values) else np.nan,
        "sd": float(values.std(ddof=1)) if len(values) > 1 else np.nan,
        "min": float(values.min()) if len(values) else np.nan,
        "max": float(values.max()) if len(values) else np.nan,
    }


def _keyed(neurons: pd.DataFrame) -> pd.DataFrame:
    return neurons.set_index(["layer", "neuron"]).sort_index()


def _jaccard(a: pd.DataFrame, b: pd.DataFrame, group: str) -> float:
    sa, sb = (set(zip(*(t.loc[t["group"] == group, ["layer", "neuron"]].T.values))) for t in (a, b))
    union = sa | sb
    return len(sa & sb) / len(union) if union else np.nan


def _delta_r(a: pd.DataFrame, b: pd.DataFrame) -> float:
    da, db = _keyed(a)["delta"], _keyed(b)["delta"]
    if not da.index.equals(db.index):
        raise TablesError("the neuron tables of two seeds list different neurons")
    return float(np.corrcoef(da.to_numpy(float), db.to_numpy(float))[0, 1])


def _read_neurons(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TablesError(f"{path} does not exist; run its neuron table (snakemake {path})")
    return pd.read_parquet(path, columns=["layer", "neuron", "cos", "delta", "group"])


def _eval_numbers(eval_dir: Path, condition: str) -> dict[str, Any]:
    summary = load_summary(eval_dir, condition)
    return {k: summary.get(k, np.nan) for k in _EVAL}


def _training_record(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "source.json"
    try:
        record = json.loads(path.read_text())["dpo"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise TablesError(
            f"{path}: no training record ({e}); rerun the run's training rule"
        ) from None
    settings = record.get("settings", {})
    return {
        "loss_type": settings.get("loss_type", "sigmoid"),
        "beta": settings.get("beta"),
        "steps": record.get("steps"),
        "best_step": record.get("best_step"),
        "stopped_early": record.get("stopped_early"),
    }
