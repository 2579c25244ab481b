"""Snakemake script of rule train_probe: see dpotox.stages.probe.train_probe."""

from pathlib import Path

from dpotox.logs import rule_log
from dpotox.stages.probe import train_probe

with rule_log(snakemake) as log:
    smk = snakemake
    metrics = train_probe(
        model_dir=smk.input.model,
        texts_path=smk.input.texts,
        prompts_path=smk.input.prompts,
        samples_path=smk.input.get("samples"),
        cfg=smk.params.cfg,
        out_dir=Path(smk.output.probe).parent,
        device=smk.params.device,
    )
    log.info(
        "probe: %d texts, test accuracy %.3f (AUC %.3f), train %.3f; top tokens %s",
        metrics["n"],
        metrics["test_accuracy"],
        metrics["test_auc"],
        metrics["train_accuracy"],
        metrics["top_tokens"],
    )
