# Stage 1: models and data, from their sources into resources/ (docs/design.md, "The DAG").


rule prepare_model:
    """Read the model source (hub, local, GGUF in a PyPI package) and save safetensors."""
    output:
        directory("resources/models/{model}/base"),
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        "benchmarks/prepare_model/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    resources:
        **model_resources("prepare_model"),
    params:
        spec=lambda wildcards: rule_params(config, "prepare_model", wildcards.model)["models"][
            wildcards.model
        ],
    script:
        "../scripts/prepare_model.py"


rule prepare_data:
    """Concatenate a dataset's sources into one Parquet table with fixed columns."""
    output:
        "resources/data/{dataset}.parquet",
    log:
        "logs/prepare_data/{dataset}.log",
    benchmark:
        "benchmarks/prepare_data/{dataset}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    params:
        sources=lambda wildcards: config["data"][wildcards.dataset],
        min_rows=lambda wildcards: rows_needed(config, wildcards.dataset),
    script:
        "../scripts/prepare_data.py"
