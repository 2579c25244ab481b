# Stage: the papers' intervention sweeps (docs/design.md, "Interventions"; dpotox.stages.sweeps) and their tables.
# Conditions come from the config's grids. The evaluation jobs are made here, one per chunk of
# `sweeps.conditions_per_job` conditions of one model: a chunk loads the model once and shares
# the prompts' prefix between its conditions (dpotox.engine.generate.generate_many). With 1 condition
# per job a cluster spreads them all.


rule sweep_specs:
    """Every sweep condition's intervention spec (except ablate-toxic-N: toxic_ablation_spec),
    and the judged value vectors of the interpretable toxic neurons."""
    input:
        neurons="results/{model}/neurons.parquet",
        model="resources/models/{model}/base",
        probe="results/{model}/probe/probe.safetensors",
        dpo_acts="results/{model}/activations/dpo",
        base_acts="results/{model}/activations/base",
    output:
        specs=directory("results/{model}/sweep/specs"),
    log:
        "logs/sweep_specs/{model}.log",
    benchmark:
        "benchmarks/sweep_specs/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("sweep_specs"),
    params:
        cfg=lambda wildcards: rule_params(config, "sweep_specs", wildcards.model),
        conditions=lambda wildcards: spec_conditions(config, wildcards.model),
    script:
        "../scripts/sweep_specs.py"


# A profile's set-resources name rules, and these are made per model and chunk: they go
# where the profile sends rule evaluate (its SLURM partition, for one).
_EVALUATE_PLACEMENT = {
    k: getattr(v, "raw", v)
    for k, v in workflow.resource_settings.overwrite_resources.get("evaluate", {}).items()
    if k.startswith("slurm_")
}

for _model in MODELS:
    _res = requests("sweep", _model, config)
    for _k, _conds in enumerate(
        chunks(sweep_conditions(config, _model), config["sweeps"]["conditions_per_job"])
    ):
        _specs = [sweep_spec_path(_model, c) for c in _conds]

        rule:
            name:
                f"sweep_{rule_safe(_model)}_{_k:02d}"
            input:
                model=(
                    "results/{m}/dpo/model"
                    if parse_condition(_conds[0]).on_dpo_model
                    else "resources/models/{m}/base"
                ).format(m=_model),
                prompts="resources/data/prompts.parquet",
                wiki="resources/data/wiki.parquet",
                specs=sorted(
                    {
                        (
                            s
                            if not s.startswith(f"results/{_model}/sweep/specs/")
                            else f"results/{_model}/sweep/specs"
                        )
                        for s in _specs
                    }
                ),
            output:
                tables=[f"results/{_model}/eval/{c}.parquet" for c in _conds],
                summaries=[f"results/{_model}/eval/{c}.json" for c in _conds],
            log:
                f"logs/sweep/{_model}/part-{_k:02d}.log",
            benchmark:
                f"benchmarks/sweep/{_model}/part-{_k:02d}.tsv"
            conda:
                "../../envs/dpotox.yaml"
            threads: config["sweeps"]["threads_per_job"]
            resources:
                **_res,
                **_EVALUATE_PLACEMENT,
            params:
                conditions=_conds,
                spec_paths=_specs,
                cfg=rule_params(config, "sweep", _model),
                device=config["models"][_model]["device"],
            script:
                "../scripts/evaluate_sweep.py"


rule tables:
    """The papers' tables (Yang et al. 2024 workshop, Table 1; Yang et al. 2025, Tables 2, 3, 12, 19) for one model,
    with the papers' published numbers beside ours, as CSV and markdown."""
    input:
        neurons="results/{model}/neurons.parquet",
        summaries=lambda wildcards: expand(
            "results/{model}/eval/{c}.json",
            model=wildcards.model,
            c=table_conditions(wildcards.model),
        ),
        tables=lambda wildcards: expand(
            "results/{model}/eval/{c}.parquet",
            model=wildcards.model,
            c=table_conditions(wildcards.model),
        ),
    output:
        reported_tables(result_table_files("results/tables", "{model}"), "tables"),
    log:
        "logs/tables/{model}.log",
    benchmark:
        "benchmarks/tables/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    params:
        conditions=lambda wildcards: table_conditions(wildcards.model),
        cfg=lambda wildcards: rule_params(config, "tables", wildcards.model),
    script:
        "../scripts/tables.py"
