# Stage: evaluate a condition (the base model, or any intervention spec) on toxicity,
# log-perplexity and F1 (docs/design.md, "Metrics").


rule evaluate:
    """Generate greedy continuations under the condition's spec and score them."""
    input:
        model=condition_model,
        prompts="resources/data/prompts.parquet",
        wiki="resources/data/wiki.parquet",
        spec=condition_spec,
    output:
        table="results/{model}/eval/{condition}.parquet",
        summary="results/{model}/eval/{condition}.json",
    log:
        "logs/evaluate/{model}/{condition}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{condition}.tsv"
    wildcard_constraints:
        # The sweep conditions' files come from the sweep jobs (workflow/rules/sweeps.smk).
        condition=(
            rf"(?!(?:{'|'.join(map(re.escape, SWEEP_CONDITIONS))})\.(?:parquet|json)$)"
            r"[A-Za-z0-9][A-Za-z0-9_.+=-]*"
            if SWEEP_CONDITIONS
            else r"[A-Za-z0-9][A-Za-z0-9_.+=-]*"
        ),
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("evaluate"),
    params:
        cfg=lambda wildcards: rule_params(config, "evaluate", wildcards.model),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    script:
        "../scripts/evaluate.py"
