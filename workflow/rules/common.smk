# Shared helpers of the rules: targets, wildcard constraints, per-model resources, and the
# input and launcher functions of the stages (kept here so that rule files hold rules only).

import shlex

from snakemake_interface_executor_plugins.settings import DeploymentMethod

MODELS = list(config["models"])
# The papers' DPO run first, then every other method and seed (dpotox.plan.alignment).
ALIGNMENT_RUNS = alignment_runs(config)
OTHER_RUNS = [r for r in ALIGNMENT_RUNS if not r.is_default]
RUN_NAMES = [r.name for r in ALIGNMENT_RUNS]
# What every run other than dpo patches at its own means (alignment.patch).
RUN_PATCHES = run_patches(config)
# pair_prompts and pairs are datasets only where the config names sources for them.
DATASETS = ["prompts", "wiki", "probe_texts"] + [
    name for name in ("pair_prompts", "pairs") if config["data"][name]
]


# Every sweep condition of any model: rule evaluate leaves their files to the sweep jobs.
SWEEP_CONDITIONS = sorted({c for m in MODELS for c in sweep_conditions(config, m)})


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    # An alignment run's folder under results/{model}/align (dpotox.plan.alignment).
    run="|".join(re.escape(r.folder.removeprefix("align/")) for r in OTHER_RUNS) or "(?!)",
    dataset="|".join(DATASETS),
    condition=r"[A-Za-z0-9][A-Za-z0-9_.+=-]*",


def rule_safe(name):
    """``name`` as part of a rule name (letters, digits and underscores)."""
    return re.sub(r"\W", "_", name)


def sweep_spec_path(model, condition):
    """Where a sweep condition's spec is: ablate-toxic-N from toxic_ablation_spec, the others
    from sweep_specs."""
    if toxic_ablation(condition):
        return f"results/{model}/specs/{condition}.json"
    return f"results/{model}/sweep/specs/{condition}.json"


def table_conditions(model):
    """The conditions the papers' tables compare: base, DPO and every sweep condition."""
    return ["base", "dpo", *sweep_conditions(config, model)]


def model_targets(model):
    """Everything the stages built so far produce for one model (each stage adds its files)."""
    return [
        f"resources/models/{model}/base",
        *expand("resources/data/{dataset}.parquet", dataset=DATASETS),
        f"results/{model}/probe/metrics.json",
        f"results/{model}/dpo/pairs.json",
        f"results/{model}/dpo/model",
        f"results/{model}/eval/base.json",
        f"results/{model}/eval/dpo.json",
        *expand("results/{model}/activations/{variant}", model=model, variant=["base", "dpo"]),
        f"results/{model}/neurons.parquet",
        f"results/{model}/probe/checks.json",
        *probe_table_files("results/tables", model),
        *neuron_stats_files("results/tables", model),
        *result_table_files("results/tables", model),
        *figure_files("results/figures", model, methods=bool(OTHER_RUNS)),
        *(method_table_files("results/tables", model) if OTHER_RUNS else []),
        # The papers' statistics of every other run's neuron table (rule neuron_stats_aligned).
        *[
            f
            for r in OTHER_RUNS
            for f in neuron_stats_files("results/tables", f"{model}/{r.folder}")
        ],
    ]


# Figures with a row of panels per model exist only where there is more than one model.
FIGURE_SCOPES = MODELS + ([ALL_MODELS] if len(MODELS) > 1 else [])


def scope_models(scope):
    """The models a figure scope draws: one model, or all of them."""
    return MODELS if scope == ALL_MODELS else [scope]


def figure_table_paths(name):
    """Params function of a figure rule: model -> table name -> path, in row order."""

    def get(wildcards):
        return {m: figure_inputs(name, m) for m in scope_models(wildcards.scope)}

    return get


def figure_tables(name):
    """Input function of a figure rule: every table it reads, of every model it draws."""

    def get(wildcards):
        return [p for m in scope_models(wildcards.scope) for p in figure_inputs(name, m).values()]

    return get


def reported_tables(paths, rule):
    """``paths`` with each CSV marked for the report (category Tables, one subcategory per
    model) and captioned by workflow/report/tables/<table>.rst; markdown stays out."""
    marked = []
    for p in paths:
        if p.endswith(".csv"):
            p = report(
                p,
                caption=f"../report/tables/{Path(p).stem}.rst",
                category="Tables",
                subcategory="{model}",
                labels={"table": Path(p).stem, "rule": rule},
            )
        marked.append(p)
    return marked


def model_resources(rule):
    """A rule's cluster requests for the job's model (gpu, gpu_mem_mb, mem_mb, runtime, and
    any other key of models.<model>.resources): computed from the model's size
    (dpotox.plan.resources), each key of models.<model>.resources replacing its computed value."""

    # A key that one model overrides and another does not is unset (None) for the other.
    def request(name):
        return lambda wildcards: requests(rule, wildcards.model, config).get(name)

    names = {k for m in MODELS for k in requests(rule, m, config)}
    return {name: request(name) for name in sorted(names)}


def run_neuron_table(model, run):
    """The neuron table of alignment run ``run``: DPO's is results/{model}/neurons.parquet, the
    others' are in their folders (rule neuron_table_aligned)."""
    return f"{run.root(model)}/neurons.parquet"


def run_eval_dir(model, run):
    """Where the patches of alignment run ``run`` are evaluated: DPO's sweeps write to
    results/{model}/eval, the other runs' patch jobs to their folders."""
    return f"{run.root(model)}/eval"


def training_run(wildcards):
    """The alignment run a training job trains: `dpo` (rule train_dpo) or the run of
    results/{model}/align/{run} (rule train_aligned)."""
    run = getattr(wildcards, "run", None)
    return alignment_run(config, f"{RUN_PREFIX}{run}" if run else DEFAULT_RUN)


def aligned_model(model, run):
    """The model folder alignment run ``run`` (a name: dpo, align-kto...) writes."""
    return f"results/{model}/{alignment_run(config, run).folder}/model"


def train_params(wildcards):
    """What one training run reads (dpotox.plan.alignment.training_config)."""
    return training_config(config, wildcards.model, training_run(wildcards).name)


def condition_model(wildcards):
    """The model a condition runs: a trained model for a run's name (dpo, align-kto...), the
    DPO model for a spec on it (dpotox.plan.conditions), else the base model (also for a
    hand-written spec)."""
    c = try_parse_condition(wildcards.condition)
    if isinstance(c, ModelRun) and c.aligned:
        return aligned_model(wildcards.model, c.name)
    if runs_dpo_model(wildcards.condition):
        return aligned_model(wildcards.model, DEFAULT_RUN)
    return f"resources/models/{wildcards.model}/base"


def condition_spec(wildcards):
    """A model of its own (base, dpo, align-...) has no spec; any other condition reads its
    spec file."""
    if isinstance(try_parse_condition(wildcards.condition), ModelRun):
        return []
    return [f"results/{wildcards.model}/specs/{wildcards.condition}.json"]


def probe_inputs(wildcards):
    """The probe reads the pairs' samples too when probe.continuations is on."""
    inputs = {
        "model": f"resources/models/{wildcards.model}/base",
        "texts": "resources/data/probe_texts.parquet",
        "prompts": "resources/data/prompts.parquet",
    }
    if config["probe"]["continuations"]:
        inputs["samples"] = f"results/{wildcards.model}/dpo/samples.parquet"
    return inputs


def pairs_inputs(wildcards):
    """What make_pairs reads depends on dpo.pairs.method (see dpotox.stages.pairs)."""
    method = config["dpo"]["pairs"]["method"]
    inputs = {"prompts": "resources/data/prompts.parquet"}
    if method in ("best-of-n", "steered"):
        inputs["model"] = f"resources/models/{wildcards.model}/base"
    if method == "best-of-n" and config["data"]["pair_prompts"]:
        inputs["pair_prompts"] = "resources/data/pair_prompts.parquet"
    if method == "steered":
        inputs["wiki"] = "resources/data/wiki.parquet"
        inputs["probe"] = f"results/{wildcards.model}/probe/probe.safetensors"
    if method == "jsonl":
        inputs["pairs"] = "resources/data/pairs.parquet"
    return inputs


def dpo_launcher(wildcards):
    """One process per GPU under accelerate when a model asks for several; else one python."""
    # Inside a conda env (--sdm conda) the env's python is first on PATH; otherwise the
    # interpreter running Snakemake (a virtualenv need not be activated) has the packages.
    in_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    python = "python" if in_conda else shlex.quote(sys.executable)
    gpus = requests("train_dpo", wildcards.model, config)["gpu"]
    if gpus > 1:
        # FSDP shards the weights, gradients and optimizer state over the GPUs (the requests
        # count on it: dpotox.plan.resources).
        fsdp = Path(workflow.basedir) / "config" / "accelerate" / "fsdp.yaml"
        return (
            f"{python} -m accelerate.commands.launch --config_file {shlex.quote(str(fsdp))}"
            f" --num_processes {gpus} -m dpotox"
        )
    return f"{python} -m dpotox"
