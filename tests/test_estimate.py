"""GPU-hours from measured benchmarks and a dry run's job counts (dpotox.plan.estimate)."""

from pathlib import Path

import pytest

from dpotox.plan.conditions import chunks, sweep_conditions
from dpotox.plan.config import load_config
from dpotox.plan.estimate import (
    EstimateError,
    efficiencies,
    estimate,
    markdown,
    measured_jobs,
    planned_jobs,
)
from dpotox.plan.resources import GPU_RULES, gpu_plan, job_flops, rule_work

REPO = Path(__file__).resolve().parents[1]
N_PARAMS = 134_515_008  # the embedded model


@pytest.fixture(scope="module")
def measured_cfg():
    return load_config(REPO / "config" / "config.yaml", check_paths=False)


@pytest.fixture(scope="module")
def paper_cfg():
    return load_config(REPO / "config" / "paper.yaml", check_paths=False)


def _bench(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100.0\n")


@pytest.fixture
def bench_dir(tmp_path, measured_cfg):
    """A benchmarks/ folder as a run of config/config.yaml leaves it: every job 10 s."""
    root = tmp_path / "benchmarks"
    m = "smollm2-135m"
    for rule in ("train_probe", "make_pairs", "train_dpo", "probe_checks"):
        _bench(root / rule / f"{m}.tsv", 10)
    for cond in ("base", "dpo"):
        _bench(root / "evaluate" / m / f"{cond}.tsv", 10)
        _bench(root / "cache_activations" / m / f"{cond}.tsv", 10)
    n_parts = len(
        chunks(sweep_conditions(measured_cfg, m), measured_cfg["sweeps"]["conditions_per_job"])
    )
    for i in range(n_parts):
        _bench(root / "sweep" / m / f"part-{i:02d}.tsv", 10)
    _bench(root / "neuron_table" / f"{m}.tsv", 10)  # a CPU rule: not measured
    return root


def test_measured_jobs_count_each_sweep_chunk_alone(bench_dir, measured_cfg):
    jobs = measured_jobs(bench_dir, measured_cfg, "smollm2-135m", N_PARAMS)
    assert {j.rule for j in jobs} == set(GPU_RULES)
    sweeps = [j for j in jobs if j.rule == "sweep"]
    parts = chunks(
        sweep_conditions(measured_cfg, "smollm2-135m"), measured_cfg["sweeps"]["conditions_per_job"]
    )
    assert len(sweeps) == len(parts) and len({len(p) for p in parts}) > 1
    # FLOPs follow the chunk's own size (the DPO-model conditions are a short chunk)
    per_cond = {j.flops / len(p) for j, p in zip(sweeps, parts)}
    assert max(per_cond) == pytest.approx(min(per_cond), rel=1e-9)
    (dpo,) = [j for j in jobs if j.rule == "train_dpo"]
    assert dpo.flops == job_flops(N_PARAMS, rule_work("train_dpo", measured_cfg))


def test_efficiency_and_hours(bench_dir, measured_cfg, paper_cfg):
    jobs = measured_jobs(bench_dir, measured_cfg, "smollm2-135m", N_PARAMS)
    eff = efficiencies(jobs, gemm_flops=1e11)
    (probe,) = [j for j in jobs if j.rule == "train_probe"]
    assert eff["train_probe"] == pytest.approx(probe.flops / 10 / 1e11)
    planned = {
        ("evaluate", "llama-3.1-8b"): 2,
        ("train_dpo", "llama-3.1-8b"): 1,
        ("sweep", "llama-3.1-8b"): 33,
        ("neuron_table", "llama-3.1-8b"): 1,
    }
    table = estimate(paper_cfg, planned, eff).set_index("rule")
    assert list(table.index) == ["train_dpo", "evaluate", "sweep"]  # GPU rules, stage order
    plan = gpu_plan("evaluate", "llama-3.1-8b", paper_cfg)
    load_h = plan.weights_gb / 0.5 / 3600
    assert table.at["evaluate", "gpu_hours"] == pytest.approx(
        2 * (plan.flops / (eff["evaluate"] * 300e12) / 3600 + load_h)
    )
    assert table.at["train_dpo", "gpus"] == 2
    # twice as efficient on the measured machine: the compute half of the estimate halves
    fast = estimate(paper_cfg, planned, {r: 2 * e for r, e in eff.items()}).set_index("rule")
    assert fast.at["evaluate", "gpu_hours"] == pytest.approx(
        (table.at["evaluate", "gpu_hours"] - 2 * load_h) / 2 + 2 * load_h
    )
    text = markdown(estimate(paper_cfg, planned, eff))
    assert text.splitlines()[0] == "| stage | llama-3.1-8b | all |" and "**total**" in text


def test_missing_measurements_are_named(tmp_path, bench_dir, measured_cfg, paper_cfg):
    with pytest.raises(EstimateError, match="holds no benchmark of smollm2-135m"):
        measured_jobs(tmp_path, measured_cfg, "smollm2-135m", N_PARAMS)
    _bench(bench_dir / "sweep" / "smollm2-135m" / "part-09.tsv", 10)
    with pytest.raises(EstimateError, match="part-09.tsv: no sweep job of that number"):
        measured_jobs(bench_dir, measured_cfg, "smollm2-135m", N_PARAMS)
    with pytest.raises(EstimateError, match="no measured job of rule sweep"):
        estimate(paper_cfg, {("sweep", "gpt2-medium"): 33}, {"evaluate": 0.5})


def test_planned_jobs_of_a_dry_run():
    text = """
rule evaluate:
    input: resources/models/m1/base
    output: results/m1/eval/base.parquet
    wildcards: model=m1, condition=base
    resources: tmpdir=/tmp

rule sweep_m_1_00:
    input: results/m-1/sweep/specs/a.json
    output: results/m-1/eval/a.parquet, results/m-1/eval/b.parquet

localrule all:
    input: results/m1/MANIFEST.tsv

"""
    assert planned_jobs(text) == {("evaluate", "m1"): 1, ("sweep", "m-1"): 1, ("all", ""): 1}
    with pytest.raises(EstimateError, match="no job found"):
        planned_jobs("Nothing to be done.")
