"""GPU-hours of a config's whole DAG, from a finished run's measured throughput.

    python bench/gpu_hours.py [--config config/paper.yaml] [--benchmarks benchmarks]
                              [--measured-config config/config.yaml] [--model smollm2-135m]
                              [--gemm-tflops X] [--device cpu]

Reads the ``benchmarks/`` of a finished run of ``--measured-config`` (``make run`` writes it for
the embedded model), measures this machine's sustained GEMM rate (or takes ``--gemm-tflops``),
plans ``--config`` with ``snakemake -n`` for its job counts, and prints each GPU rule's
measured efficiency and a Markdown table of GPU-hours per stage and model (see
``dpotox.plan.estimate``). On a GPU machine, run the measured config there with ``device: cuda``
and pass ``--device cuda`` so the GEMM rate is the GPU's. The last line is
``RESULT gpu_hours=<total> roofline_gpu_hours=<roofline>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dpotox.engine.flops import gemm_rate
from dpotox.plan.config import load_config
from dpotox.plan.estimate import efficiencies, estimate, markdown, measured_jobs, planned_jobs
from dpotox.plan.resources import ClusterConfig

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "config/paper.yaml"))
    ap.add_argument("--benchmarks", default=str(REPO / "benchmarks"))
    ap.add_argument("--measured-config", default=str(REPO / "config/config.yaml"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--model-dir",
        help="the measured model's prepared folder "
        "(default: resources/models/<model>/base beside --benchmarks)",
    )
    ap.add_argument(
        "--gemm-tflops",
        type=float,
        help="sustained GEMM rate of the machine the "
        "benchmarks ran on (default: measured now, float32 on a CPU, bf16 on a GPU)",
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    bench = Path(args.benchmarks)
    model_dir = Path(args.model_dir or bench.parent / "resources/models" / args.model / "base")
    source = model_dir / "source.json"
    if not source.is_file():
        sys.exit(f"{source} is missing: give --model-dir, the measured model's prepared folder")
    n_params = json.loads(source.read_text())["n_parameters"]
    measured_cfg = load_config(args.measured_config, check_paths=False)
    jobs = measured_jobs(bench, measured_cfg, args.model, n_params)
    if args.gemm_tflops:
        gemm = args.gemm_tflops * 1e12
    else:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        gemm = gemm_rate(dtype, device=args.device).sustained
    eff = efficiencies(jobs, gemm)
    print(
        f"measured: {args.model} ({n_params / 1e6:.0f}M parameters), {len(jobs)} jobs in {bench}; "
        f"sustained GEMM {gemm / 1e12:.3f} TFLOP/s ({args.device})"
    )
    for rule, e in eff.items():
        secs = sum(j.seconds for j in jobs if j.rule == rule)
        flops = sum(j.flops for j in jobs if j.rule == rule)
        print(
            f"  {rule:18s} {secs:8.1f} s  {flops / secs / 1e9:8.2f} nominal GFLOP/s"
            f"  = {e:6.3f} x GEMM"
        )

    with tempfile.TemporaryDirectory() as tmp:
        # the run is planned in an empty folder: every job of the DAG is counted
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-n",
                "--snakefile",
                str(REPO / "Snakefile"),
                "--directory",
                tmp,
                "--configfile",
                args.config,
            ],
            capture_output=True,
            text=True,
        )
    if proc.returncode:
        sys.exit(f"planning {args.config} failed:\n{proc.stderr[-3000:]}")
    target = load_config(args.config, check_paths=False)
    table = estimate(target, planned_jobs(proc.stdout + proc.stderr), eff)
    print(
        f"\nGPU-hours of {args.config} at {ClusterConfig.from_config(target).gpu_tflops:g} "
        "TFLOP/s sustained: estimate (roofline) x jobs\n"
    )
    print(markdown(table))
    print(
        f"\nRESULT gpu_hours={table['gpu_hours'].sum():.1f} "
        f"roofline_gpu_hours={table['roofline_gpu_hours'].sum():.1f}"
    )


if __name__ == "__main__":
    main()
