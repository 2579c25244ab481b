"""Each stage of a finished run: its model FLOP rate as a fraction of this machine's GEMM rate.

    python bench/stage_efficiency.py [--run .] [--gemm-tflops X] [--device cpu]

Reads a finished run's ``benchmarks/`` (Snakemake's wall time of every job) and, beside each
benchmark file, the job's log under ``logs/`` (same path, ``.log``): a job that ran a model ends
its log with the model FLOPs it ran (``model work: ...``, counted by
``dpotox.engine.flops.WorkMeter`` on every forward pass). Measures the sustained float32 GEMM
rate here and now (``dpotox.engine.flops.gemm_rate``; run it on the machine, and as quiet, as
the run was) unless ``--gemm-tflops`` gives it, and prints a row per job and a row per stage:
seconds, GFLOP, GFLOP/s and the fraction of the GEMM rate at the job's own thread count (the
job's log says it; jobs side by side on one core each are held to the one-thread rate). A
job's seconds are all of it
(starting Python, loading the model, scoring, writing), so the fraction is what the stage
makes of the hardware, not the speed of its inner loop (``bench/eval_throughput.py`` measures
that). Jobs that ran no model (data, tables, figures) are left out. The last line is
``RESULT gemm_gflops=<rate> <stage>=<fraction> ...``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

_WORK = re.compile(
    r"model work: (\d+) tokens through a model, (\d+) of them trained; ([\d.]+) GFLOP"
    r"(?: on (\d+) threads)?"
)


def job_work(run: Path) -> pd.DataFrame:
    """A row per benchmarked job of ``run`` whose log has a ``model work`` line."""
    rows = []
    for bench in sorted((run / "benchmarks").rglob("*.tsv")):
        rel = bench.relative_to(run / "benchmarks").with_suffix(".log")
        log = run / "logs" / rel
        found = _WORK.findall(log.read_text()) if log.is_file() else []
        if not found:
            continue
        # Under `accelerate launch` every process logs its own share: add them up.
        tokens = sum(int(f[0]) for f in found)
        trained = sum(int(f[1]) for f in found)
        gflop = sum(float(f[2]) for f in found)
        threads = found[-1][3]
        seconds = float(pd.read_csv(bench, sep="\t")["s"].mean())
        rows.append(
            {
                "stage": rel.parts[0],
                "job": str(rel.with_suffix("")),
                "seconds": seconds,
                "tokens": int(tokens),
                "trained_tokens": int(trained),
                "gflop": float(gflop),
                "threads": int(threads) if threads else None,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=".", help="the folder of a finished run")
    ap.add_argument("--gemm-tflops", type=float, help="the GEMM rate (default: measured now)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    run = Path(args.run)
    jobs = job_work(run)
    if jobs.empty:
        sys.exit(
            f"no job under {run / 'benchmarks'} has a 'model work' line in its log: run the "
            "workflow (with this version of dpotox) first"
        )
    import torch

    threads = torch.get_num_threads()
    jobs["threads"] = jobs["threads"].fillna(threads).clip(upper=threads).astype(int)
    # The GEMM rate at each thread count the jobs ran on (jobs side by side on a core each
    # are held to the one-thread rate); --gemm-tflops is the all-threads rate, shared linearly.
    rates = {}
    for n in sorted(set(jobs["threads"])):
        if args.gemm_tflops:
            rates[n] = args.gemm_tflops * 1e12 * n / threads
            continue
        from dpotox.engine.flops import gemm_rate

        torch.set_num_threads(n)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        rates[n] = gemm_rate(dtype, device=args.device).sustained
    torch.set_num_threads(threads)
    jobs["gemm_flops"] = jobs["threads"].map(rates)
    jobs["gflops_per_s"] = jobs["gflop"] / jobs["seconds"]
    jobs["fraction"] = jobs["gflops_per_s"] * 1e9 / jobs["gemm_flops"]
    jobs["gemm_flop"] = jobs["seconds"] * jobs["gemm_flops"]  # what the hardware could do
    stages = jobs.groupby("stage", sort=False)[
        ["seconds", "tokens", "trained_tokens", "gflop", "gemm_flop"]
    ].sum()
    stages["gflops_per_s"] = stages["gflop"] / stages["seconds"]
    stages["fraction"] = stages["gflop"] * 1e9 / stages["gemm_flop"]
    pd.set_option("display.width", 160)
    print(
        "sustained GEMM rate: "
        + ", ".join(f"{r / 1e9:.1f} GFLOP/s on {n} thread(s)" for n, r in rates.items())
        + f" ({args.device}; float32 on a CPU)"
    )
    print(jobs.drop(columns=["stage", "gemm_flops", "gemm_flop"]).round(3).to_string(index=False))
    print()
    print(
        stages.drop(columns="gemm_flop")
        .sort_values("seconds", ascending=False)
        .round(3)
        .to_string()
    )
    fractions = " ".join(f"{s}={f:.2f}" for s, f in stages["fraction"].items())
    print(f"RESULT gemm_gflops={rates[max(rates)] / 1e9:.1f} {fractions}")


if __name__ == "__main__":
    main()
