# Stage: the linear toxicity probe on the final residual stream (docs/design.md, "The probe").


rule train_probe:
    """Label and balance the probe texts, pool the final residual, fit logistic regression."""
    input:
        unpack(probe_inputs),
    output:
        probe="results/{model}/probe/probe.safetensors",
        bootstrap="results/{model}/probe/bootstrap.safetensors",
        metrics="results/{model}/probe/metrics.json",
        data="results/{model}/probe/data.parquet",
        top_tokens="results/{model}/probe/top_tokens.csv",
    log:
        "logs/train_probe/{model}.log",
    benchmark:
        "benchmarks/train_probe/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("train_probe"),
    params:
        cfg=lambda wildcards: rule_params(config, "train_probe", wildcards.model),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    script:
        "../scripts/train_probe.py"


rule probe_checks:
    """How stable the neuron groups are under refits of the probe, and whether the probe
    detects toxicity in the model's own text and in DPO's shift (after the neuron table)."""
    input:
        base="resources/models/{model}/base",
        dpo="results/{model}/dpo/model",
        probe="results/{model}/probe/probe.safetensors",
        bootstrap="results/{model}/probe/bootstrap.safetensors",
        neurons="results/{model}/neurons.parquet",
        base_eval="results/{model}/eval/base.parquet",
        metrics="results/{model}/probe/metrics.json",
    output:
        reported_tables(probe_table_files("results/tables", "{model}"), "probe_checks"),
        checks="results/{model}/probe/checks.json",
    log:
        "logs/probe_checks/{model}.log",
    benchmark:
        "benchmarks/probe_checks/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("probe_checks"),
    params:
        cfg=lambda wildcards: rule_params(config, "probe_checks", wildcards.model),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    script:
        "../scripts/probe_checks.py"
