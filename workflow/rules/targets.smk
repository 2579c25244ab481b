# Per-model targets: `snakemake results/<model>/MANIFEST.tsv` runs one model's whole DAG.


rule model_manifest:
    """List every output of one model, with sizes, once all of them exist."""
    input:
        lambda wildcards: model_targets(wildcards.model),
    output:
        "results/{model}/MANIFEST.tsv",
    log:
        "logs/model_manifest/{model}.log",
    conda:
        "../../envs/dpotox.yaml"
    script:
        "../scripts/model_manifest.py"
