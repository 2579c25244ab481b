"""GPU-hours of a run: the DAG's job counts times each job's FLOPs, at the rate measured on a
finished run of another config (the embedded model on this machine, or on a GPU).

For every rule that runs a model (:data:`dpotox.plan.resources.GPU_RULES`):

1. **measured efficiency.** Each measured job's model FLOPs (:func:`dpotox.plan.resources.job_flops`
   of its :func:`~dpotox.plan.resources.rule_work`) over its wall time (the rule's ``benchmark:``
   file) is the rate the job reached; over the machine's sustained GEMM rate
   (:func:`dpotox.engine.flops.gemm_rate`) it is the fraction of the hardware the rule uses. It
   folds
   in what FLOPs do not count: decoding one token at a time, the toxicity scorer, loading.
2. **FLOP scaling.** A job of the target config is assumed to reach the same fraction of the
   target GPU's sustained rate (``cluster.gpu_tflops``): its GPU-hours are its FLOPs over that,
   plus reading its weights (``cluster.load_gbs``) on each of its GPUs.

The FLOPs are nominal: :func:`~dpotox.plan.resources.rule_work` counts every text at its token
budget and one DPO pair per prompt (the requests must not fall short), so a rule whose texts
are shorter than their budgets shows a "fraction" above 1. The same counts are made for the
target config, so the factor carries over as far as its texts fill their budgets alike. A small
model on a CPU uses its hardware worse than a 7B model on a GPU does, so the estimate errs
high. :func:`estimate` gives beside it the roofline of :func:`dpotox.plan.resources.gpu_plan`
(the nominal FLOPs at the sustained rate, decoding at the memory bandwidth, no scorer).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dpotox.errors import DpotoxError
from dpotox.plan.alignment import alignment_runs, run_patches
from dpotox.plan.conditions import chunks, sweep_conditions
from dpotox.plan.resources import GPU_RULES, ClusterConfig, gpu_plan, job_flops, rule_work


class EstimateError(DpotoxError, ValueError):
    """Measured benchmarks or a dry run that an estimate cannot be made from."""


@dataclass(frozen=True)
class MeasuredJob:
    rule: str
    name: str  # the benchmark file
    seconds: float
    flops: float


def _with_chunk(cfg: Mapping[str, Any], k: int) -> dict[str, Any]:
    out = copy.deepcopy(dict(cfg))
    out["sweeps"] = {**out["sweeps"], "conditions_per_job": k}
    return out


def measured_jobs(
    bench_dir: str | Path, cfg: Mapping[str, Any], model: str, n_params: int
) -> list[MeasuredJob]:
    """The jobs of ``model`` (``n_params`` parameters) that ``bench_dir`` (a run's
    ``benchmarks/`` folder, run under config ``cfg``) timed, with their FLOPs. A sweep job's
    FLOPs count the conditions of its own chunk (``part-NN``)."""
    bench_dir = Path(bench_dir)
    parts = chunks(sweep_conditions(cfg, model), cfg["sweeps"]["conditions_per_job"])
    out = []
    for rule in GPU_RULES:
        files = sorted((bench_dir / rule).glob(f"{model}.tsv")) + sorted(
            (bench_dir / rule / model).glob("*.tsv")
        )
        for f in files:
            table = pd.read_csv(f, sep="\t")
            if table.empty or "s" not in table:
                raise EstimateError(
                    f"{f}: not a Snakemake benchmark file (no 's' column); "
                    "rerun the rule to write it again"
                )
            job_cfg = cfg
            if rule == "sweep":
                m = re.fullmatch(r"part-(\d+)", f.stem)
                if not m or int(m[1]) >= len(parts):
                    raise EstimateError(
                        f"{f}: no sweep job of that number under the measured "
                        "config; give the config the run was made with"
                    )
                job_cfg = _with_chunk(cfg, len(parts[int(m[1])]))
            out.append(
                MeasuredJob(
                    rule,
                    f.name,
                    float(table["s"].mean()),
                    job_flops(n_params, rule_work(rule, job_cfg)),
                )
            )
    if not out:
        raise EstimateError(
            f"{bench_dir} holds no benchmark of {model}'s GPU rules "
            f"({', '.join(GPU_RULES)}); run the workflow on it first"
        )
    return out


def efficiencies(jobs: list[MeasuredJob], gemm_flops: float) -> dict[str, float]:
    """Rule -> measured FLOP rate (all its jobs' FLOPs over their seconds) as a fraction of
    ``gemm_flops``, the machine's sustained GEMM rate in FLOP/s."""
    flops, seconds = Counter(), Counter()
    for j in jobs:
        flops[j.rule] += j.flops
        seconds[j.rule] += j.seconds
    return {r: flops[r] / seconds[r] / gemm_flops for r in flops if seconds[r] > 0}


_JOB = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", re.M)


def planned_jobs(dry_run: str) -> Counter:
    """``(rule, model) -> jobs`` from the text of ``snakemake -n`` (a rule's job without a
    model wildcard counts under model ``""``); the per-model sweep rules count as ``sweep``."""
    jobs: Counter = Counter()
    for m in _JOB.finditer(dry_run):
        # The sweep chunks, and the patches of the other alignment runs, are rules per model.
        rule = "sweep" if re.fullmatch(r"sweep_\w+_\d+|aligned_patches_\w+", m[1]) else m[1]
        # Another alignment method trains as DPO does (at most a reference forward less).
        rule = "train_dpo" if rule == "train_aligned" else rule
        model = re.search(r"wildcards: .*?\bmodel=([^,\n]+)", m[2])
        if rule == "sweep":  # a rule per model and chunk, without wildcards: its outputs say
            model = re.search(r"output: results/([^/]+)/", m[2])
        jobs[(rule, model[1] if model else "")] += 1
    if not jobs:
        raise EstimateError(
            "no job found in the dry run's output; was it run with -n (and without --quiet)?"
        )
    return jobs


def estimate(
    cfg: Mapping[str, Any], jobs: Mapping[tuple[str, str], int], eff: Mapping[str, float]
) -> pd.DataFrame:
    """GPU-hours of the target config ``cfg`` per rule and model: ``jobs`` (from
    :func:`planned_jobs`), ``gpus`` per job, total ``pflop``, ``gpu_hours`` at the measured
    efficiency ``eff`` of the rule (:func:`efficiencies`) times ``cluster.gpu_tflops``, and
    ``roofline_gpu_hours``. Sweep jobs are counted at their mean chunk size."""
    cc = ClusterConfig.from_config(cfg)
    rows = []
    order = {r: i for i, r in enumerate(GPU_RULES)}
    for (rule, model), n in sorted(
        jobs.items(), key=lambda kv: (order.get(kv[0][0], -1), kv[0][1])
    ):
        if rule not in GPU_RULES or not model:
            continue
        if rule not in eff:
            raise EstimateError(
                f"no measured job of rule {rule}; the measured run must "
                "include every rule that runs a model"
            )
        job_cfg = cfg
        if rule == "sweep":  # the mean chunk: the planned jobs share the conditions
            runs = len(alignment_runs(cfg)) - 1
            k = (len(sweep_conditions(cfg, model)) + runs * len(run_patches(cfg))) / n
            job_cfg = _with_chunk(cfg, max(1, round(k)))
        plan = gpu_plan(rule, model, job_cfg)
        # Reading the weights does not scale with FLOPs: every job pays it on all its GPUs.
        load_s = plan.weights_gb / cc.load_gbs
        compute_s = plan.flops / (eff[rule] * cc.gpu_tflops * 1e12)
        rows.append(
            {
                "rule": rule,
                "model": model,
                "jobs": n,
                "gpus": plan.gpus,
                "pflop": n * plan.flops / 1e15,
                "gpu_hours": n * (compute_s + load_s * plan.gpus) / 3600,
                "roofline_gpu_hours": n * plan.seconds * plan.gpus / 3600,
            }
        )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """``table`` as a Markdown table of GPU-hours, a row per rule, a column per model, with
    totals; each cell ``estimate (roofline)``."""
    models = list(dict.fromkeys(table["model"]))

    def cell(est, roof):
        return f"{est:,.2f} ({roof:,.2f})"

    lines = ["| stage | " + " | ".join(models) + " | all |", "|---|" + "---:|" * (len(models) + 1)]
    for rule, g in table.groupby("rule", sort=False):
        by = g.set_index("model")
        cells = [
            cell(by.at[m, "gpu_hours"], by.at[m, "roofline_gpu_hours"]) + f" x{by.at[m, 'jobs']}"
            if m in by.index
            else ""
            for m in models
        ]
        lines.append(
            f"| {rule} | "
            + " | ".join(cells)
            + " | "
            + cell(g["gpu_hours"].sum(), g["roofline_gpu_hours"].sum())
            + " |"
        )
    tot = table.groupby("model", sort=False)[["gpu_hours", "roofline_gpu_hours"]].sum()
    lines.append(
        "| **total** | "
        + " | ".join(cell(*tot.loc[m]) for m in models)
        + " | "
        + cell(table["gpu_hours"].sum(), table["roofline_gpu_hours"].sum())
        + " |"
    )
    return "\n".join(lines)
