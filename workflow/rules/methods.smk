# Stage: the alignment methods and seeds side by side (dpotox.outputs.methods). Planned only
# where alignment.methods or alignment.seeds ask for more than the papers' DPO: each other run
# is trained (rule train_aligned), evaluated and cached as a condition named after it
# (align-kto...), and gets a neuron table of its own (rule neuron_table_aligned) and the
# patches of alignment.patch at its own means (below).


use rule sweep_specs as aligned_patch_specs with:
    input:
        neurons="results/{model}/align/{run}/neurons.parquet",
        model="resources/models/{model}/base",
        probe="results/{model}/probe/probe.safetensors",
        dpo_acts=f"results/{{model}}/activations/{RUN_PREFIX}{{run}}",
        base_acts="results/{model}/activations/base",
    output:
        specs=directory("results/{model}/align/{run}/specs"),
    log:
        "logs/aligned_patch_specs/{model}/{run}.log",
    benchmark:
        "benchmarks/aligned_patch_specs/{model}/{run}.tsv"
    params:
        cfg=lambda wildcards: rule_params(config, "sweep_specs", wildcards.model),
        conditions=RUN_PATCHES,


# One job per model and run evaluates its patches together (they share the prompts' prefix),
# as a sweep chunk does, on the base model.
for _model in MODELS:
    for _run in OTHER_RUNS:
        _dir = f"results/{_model}/{_run.folder}"

        rule:
            name:
                f"aligned_patches_{rule_safe(_model)}_{rule_safe(_run.name)}"
            input:
                model=f"resources/models/{_model}/base",
                prompts="resources/data/prompts.parquet",
                wiki="resources/data/wiki.parquet",
                specs=f"{_dir}/specs",
            output:
                tables=[f"{_dir}/eval/{c}.parquet" for c in RUN_PATCHES],
                summaries=[f"{_dir}/eval/{c}.json" for c in RUN_PATCHES],
            log:
                f"logs/aligned_patches/{_model}/{_run.name}.log",
            benchmark:
                f"benchmarks/aligned_patches/{_model}/{_run.name}.tsv"
            conda:
                "../../envs/dpotox.yaml"
            threads: 2
            resources:
                **requests("sweep", _model, config),
                **_EVALUATE_PLACEMENT,
            params:
                conditions=RUN_PATCHES,
                spec_paths=[f"{_dir}/specs/{c}.json" for c in RUN_PATCHES],
                cfg=rule_params(config, "sweep", _model),
                device=config["models"][_model]["device"],
            script:
                "../scripts/evaluate_sweep.py"


rule methods_tables:
    """A row per alignment run (toxicity, fluency, the share of neurons reducing their
    projection, the four groups' shares), the spread across seeds and the groups' stability,
    and the per-layer reduction by group of every run."""
    input:
        summaries=lambda wildcards: expand(
            "results/{model}/eval/{c}.json", model=wildcards.model, c=["base", *RUN_NAMES]
        ),
        tables=lambda wildcards: expand(
            "results/{model}/eval/{c}.parquet", model=wildcards.model, c=["base", *RUN_NAMES]
        ),
        neurons=lambda wildcards: [run_neuron_table(wildcards.model, r) for r in ALIGNMENT_RUNS],
        models=lambda wildcards: [aligned_model(wildcards.model, r) for r in RUN_NAMES],
        patches=lambda wildcards: [
            f"{run_eval_dir(wildcards.model, r)}/{c}.json"
            for r in ALIGNMENT_RUNS
            for c in RUN_PATCHES
        ],
    output:
        reported_tables(method_table_files("results/tables", "{model}"), "methods_tables"),
    log:
        "logs/methods_tables/{model}.log",
    benchmark:
        "benchmarks/methods_tables/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    params:
        cfg=lambda wildcards: rule_params(config, "methods_tables", wildcards.model),
        patch_dirs=lambda wildcards: [run_eval_dir(wildcards.model, r) for r in ALIGNMENT_RUNS],
    script:
        "../scripts/methods_tables.py"
