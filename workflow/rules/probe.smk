# Stage: the linear toxicity probe on the final residual stream (DESIGN section 1, "Probe").


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
    params:
        cfg=lambda wildcards: rule_params(config, "train_probe", wildcards.model),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    log:
        "logs/train_probe/{model}.log",
    benchmark:
        "benchmarks/train_probe/{model}.tsv"
    threads: 2
    resources:
        **model_resources("train_probe"),
    conda:
        "../../envs/dpotox.yaml"
    script:
        "../scripts/train_probe.py"
