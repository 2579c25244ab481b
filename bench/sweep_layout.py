"""Sweep job layout on this machine's cores: one two-thread job against two one-thread jobs.

    python bench/sweep_layout.py [--run .] [--model smollm2-135m] [--conditions 3]
                                 [--threads 2] [--configfile config/config.yaml]

Takes the first ``--conditions`` base-model conditions of a finished run's sweep (their specs
in ``results/{model}/sweep/specs``) and evaluates them as a sweep job does
(``dpotox.stages.evaluate.evaluate_conditions``, in a fresh process, outputs to a temporary
folder): first one job with ``--threads`` threads alone, then one job with one thread alone,
then ``--threads`` one-thread jobs side by side, each on the same conditions. The throughput
of the side-by-side layout over the one multi-thread job is ``threads x t(multi) /
t(side by side)``: above 1, jobs of one thread, as many as cores (`sweeps.threads_per_job: 1`),
get more done on these conditions. Starting Python and loading run on one thread either way,
so short jobs favour that layout; a whole run can differ (docs/benchmarks.md, "Sweep job
layout"). The jobs run in a fixed order after one untimed warm-up job. The last line is
``RESULT multi_s=<a> one_thread_s=<b> side_by_side_s=<c> throughput_ratio=<r>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker(run: Path, model: str, configfile: list[str], out: Path, conds: list[str]) -> None:
    from dpotox.plan.config import load_config
    from dpotox.plan.params import rule_params
    from dpotox.stages.evaluate import Condition, evaluate_conditions

    cfg = load_config(*configfile, check_paths=False)
    specs = run / "results" / model / "sweep" / "specs"
    evaluate_conditions(
        model_dir=run / "resources" / "models" / model / "base",
        prompts_path=run / "resources" / "data" / "prompts.parquet",
        wiki_path=run / "resources" / "data" / "wiki.parquet",
        cfg=rule_params(cfg, "sweep", model),
        conditions=[
            Condition(
                c, str(specs / f"{c}.json"), *(str(out / f"{c}.{x}") for x in ("parquet", "json"))
            )
            for c in conds
        ],
        device="cpu",
    )


def _jobs(args: argparse.Namespace, conds: list[str], threads: int, n: int, tmp: Path) -> float:
    """Seconds until ``n`` jobs of ``threads`` threads, started together, have all finished."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    procs = []
    for k in range(n):
        out = tmp / f"t{threads}-{n}-{k}"
        out.mkdir()
        cmd = [sys.executable, __file__, "--worker", str(out), "--run", str(args.run)]
        cmd += ["--model", args.model, "--configfile", *args.configfile, "--names", *conds]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    if any(p.wait() for p in procs):
        sys.exit("a sweep job failed; run it alone to see why")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=".", help="the folder of a finished run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conditions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="the cores to fill")
    ap.add_argument("--configfile", nargs="+", default=[str(REPO / "config" / "config.yaml")])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--names", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.run = Path(args.run).resolve()
    if args.worker:
        _worker(args.run, args.model, args.configfile, Path(args.worker), args.names)
        return
    from dpotox.plan.conditions import parse, sweep_conditions, toxic_ablation
    from dpotox.plan.config import load_config

    cfg = load_config(*args.configfile, check_paths=False)
    # ablate-toxic-N has its spec elsewhere (rule toxic_ablation_spec); the DPO model's
    # conditions load another model.
    conds = [
        c
        for c in sweep_conditions(cfg, args.model)
        if not parse(c).on_dpo_model and not toxic_ablation(c)
    ][: args.conditions]
    print(f"conditions: {', '.join(conds)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dpotox-layout.") as tmp:
        # Warm the page cache and bytecode first, so that no layout pays for a cold start.
        warm = Path(tmp) / "warm-up"
        warm.mkdir()
        _jobs(args, conds[:1], args.threads, 1, warm)
        multi = _jobs(args, conds, args.threads, 1, Path(tmp))
        print(f"one job, {args.threads} threads: {multi:.1f} s", flush=True)
        single = _jobs(args, conds, 1, 1, Path(tmp))
        print(f"one job, 1 thread: {single:.1f} s", flush=True)
        side = _jobs(args, conds, 1, args.threads, Path(tmp))
        print(f"{args.threads} jobs of 1 thread side by side: {side:.1f} s", flush=True)
    ratio = args.threads * multi / side
    print(
        f"RESULT multi_s={multi:.1f} one_thread_s={single:.1f} side_by_side_s={side:.1f} "
        f"throughput_ratio={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
