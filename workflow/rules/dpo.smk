# Stage: preference pairs and DPO fine-tuning with TRL (docs/design.md, "DPO with a KL term").


rule make_pairs:
    """Build preference pairs (best-of-n, steered) or read Lee et al.'s (jsonl); score both sides."""
    input:
        unpack(pairs_inputs),
    output:
        pairs="results/{model}/dpo/pairs.parquet",
        report="results/{model}/dpo/pairs.json",
        samples="results/{model}/dpo/samples.parquet",
    log:
        "logs/make_pairs/{model}.log",
    benchmark:
        "benchmarks/make_pairs/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("make_pairs"),
    params:
        cfg=lambda wildcards: rule_params(config, "make_pairs", wildcards.model),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
    script:
        "../scripts/make_pairs.py"


rule train_dpo:
    """Fine-tune the base model on the pairs with TRL's DPOTrainer (the papers' DPO, the run
    `dpo`); resumes from a checkpoint. Rule train_aligned below trains the other methods and
    seeds of alignment.methods the same way.

    A shell rule, not a script, so that when the job gets more than one GPU the same command
    runs under `accelerate launch` with FSDP, one process per GPU (see docs/dpo.md).
    """
    input:
        model="resources/models/{model}/base",
        pairs="results/{model}/dpo/pairs.parquet",
    output:
        model=directory("results/{model}/dpo/model"),
        log="results/{model}/dpo/train_log.parquet",
    log:
        "logs/train_dpo/{model}.log",
    benchmark:
        "benchmarks/train_dpo/{model}.tsv"
    conda:
        "../../envs/dpotox.yaml"
    threads: 2
    resources:
        **model_resources("train_dpo"),
    params:
        # The run's settings; the method is the one under alignment.methods, if any (else dpo).
        cfg=lambda wildcards: json.dumps(train_params(wildcards)),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
        launcher=dpo_launcher,
        # Kept outside the output folder, which Snakemake deletes before a job: an
        # interrupted run leaves its checkpoints here and the rerun resumes from them.
        checkpoint_dir="results/{model}/dpo/checkpoints",
    shell:
        "{params.launcher} train-dpo --model-name {wildcards.model:q} --config-json {params.cfg:q}"
        " --base {input.model:q} --pairs {input.pairs:q} --out {output.model:q}"
        " --train-log {output.log:q} --checkpoints {params.checkpoint_dir:q}"
        " --device {params.device} > {log:q} 2>&1"


use rule train_dpo as train_aligned with:
    output:
        model=directory("results/{model}/align/{run}/model"),
        log="results/{model}/align/{run}/train_log.parquet",
    log:
        "logs/train_aligned/{model}/{run}.log",
    benchmark:
        "benchmarks/train_aligned/{model}/{run}.tsv"
    params:
        cfg=lambda wildcards: json.dumps(train_params(wildcards)),
        device=lambda wildcards: config["models"][wildcards.model]["device"],
        launcher=dpo_launcher,
        checkpoint_dir="results/{model}/align/{run}/checkpoints",
