# Stage: the linear toxicity probe on the final residual stream (docs/design.md, "The probe").


rule train_probe:
    """Label and balance the probe texts, pool the final residual, fit logistic regression."""
    input:
        model="resources/models/{model}/base",
        texts="resources/data/probe_texts.parquet",
    output:
        probe="results/{model}/probe/probe.safetensors",
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
