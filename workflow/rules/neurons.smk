# Stage: activation caches, the neuron table and the papers' statistics (docs/design.md,
# "Alignment, mean activation, projection", "The four groups"; docs/neurons.md).


rule toxic_ablation_spec:
    """The intervention that zeroes the n value vectors most aligned with the probe."""
    input:
        model="resources/models/{model}/base",
        probe="results/{model}/probe/probe.safetensors",
    output:
        spec="results/{model}/specs/ablate-toxic-{n}.json",
    log:
        "logs/toxic_ablation_spec/{model}/{n}.log",
    wildcard_constraints:
        n=r"[1-9][0-9]*",
    conda:
        "../../envs/dpotox.yaml"
    resources:
        # Loads the base model on the CPU to rank its value vectors (no GPU).
        **model_resources("toxic_ablation_spec"),
    params:
        cfg=lambda wildcards: rule_params(config, "toxic_ablation_spec", wildcards.model),
    script:
        "../scripts/toxic_ablation_spec.py"


rule cache_activations:
    """Every neuron's activation over each model's own greedy continuations, as Parquet."""
    input:
        model=condition_model,
        prompts="resources/data/prompts.parquet",
        spec=condition_spec,
    output:
        **(
            {"positions": directory("results/{model}/activations_positions/{condition}")}
            if config["activations"]["per_position"]
            else {}
        ),
        cache=directory("results/{model}/activations/{condition}"),
    log:
        "logs/cache_activations/{model}/{condition}.log",
    benchmark:
        "benchmarks/cache_activations/{model}/{condition}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("cache_activations"),
    params:
        cfg=lambda wildcards: rule_params(config, "cache_activations", wildcards.model),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    script:
        "../scripts/cache_activations.py"


rule neuron_table:
    """Per neuron: cosine with the probe, mean activations and projections base and DPO,
    delta, groups, ranks; per layer: the MLP output along the probe; logit-lens tokens."""
    input:
        base="resources/models/{model}/base",
        dpo="results/{model}/dpo/model",
        probe="results/{model}/probe/probe.safetensors",
        base_acts="results/{model}/activations/base",
        dpo_acts="results/{model}/activations/dpo",
    output:
        neurons="results/{model}/neurons.parquet",
        layers="results/{model}/layers.parquet",
        tokens="results/{model}/value_vector_tokens.parquet",
        decomposition="results/{model}/decomposition.parquet",
    log:
        "logs/neuron_table/{model}.log",
    benchmark:
        "benchmarks/neuron_table/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("neuron_table"),
    params:
        cfg=lambda wildcards: rule_params(config, "neuron_table", wildcards.model),
    script:
        "../scripts/neuron_table.py"


use rule neuron_table as neuron_table_aligned with:
    input:
        base="resources/models/{model}/base",
        dpo="results/{model}/align/{run}/model",
        probe="results/{model}/probe/probe.safetensors",
        base_acts="results/{model}/activations/base",
        dpo_acts=f"results/{{model}}/activations/{RUN_PREFIX}{{run}}",
    output:
        neurons="results/{model}/align/{run}/neurons.parquet",
        layers="results/{model}/align/{run}/layers.parquet",
        tokens="results/{model}/align/{run}/value_vector_tokens.parquet",
        decomposition="results/{model}/align/{run}/decomposition.parquet",
    log:
        "logs/neuron_table_aligned/{model}/{run}.log",
    benchmark:
        "benchmarks/neuron_table_aligned/{model}/{run}.tsv"


rule neuron_stats:
    """The papers' statistics of the neuron table (Tables 5, 13, 14/15, 17, 18; data of
    Figs. 1a, 1b, 2b, 3) as CSV and markdown."""
    input:
        neurons="results/{model}/neurons.parquet",
        layers="results/{model}/layers.parquet",
        tokens="results/{model}/value_vector_tokens.parquet",
        decomposition="results/{model}/decomposition.parquet",
        ablated=f"results/{{model}}/activations/{Ablation(config['neurons']['ablate_top_n'])}",
    output:
        reported_tables(neuron_stats_files("results/tables", "{model}"), "neuron_stats"),
    log:
        "logs/neuron_stats/{model}.log",
    benchmark:
        "benchmarks/neuron_stats/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    params:
        cfg=lambda wildcards: rule_params(config, "neuron_stats", wildcards.model),
    script:
        "../scripts/neuron_stats.py"


use rule neuron_stats as neuron_stats_aligned with:
    input:
        neurons="results/{model}/align/{run}/neurons.parquet",
        layers="results/{model}/align/{run}/layers.parquet",
        tokens="results/{model}/align/{run}/value_vector_tokens.parquet",
        decomposition="results/{model}/align/{run}/decomposition.parquet",
        ablated=f"results/{{model}}/activations/{Ablation(config['neurons']['ablate_top_n'])}",
    output:
        reported_tables(neuron_stats_files("results/tables", "{model}/align/{run}"), "neuron_stats"),
    log:
        "logs/neuron_stats_aligned/{model}/{run}.log",
    benchmark:
        "benchmarks/neuron_stats_aligned/{model}/{run}.tsv"
