"""Snakemake script of rule evaluate: see dpotox.stages.evaluate.evaluate."""

from dpotox.logs import rule_log
from dpotox.stages.evaluate import evaluate

with rule_log(snakemake) as log:
    smk = snakemake
    # The spec input is a list: empty for base and dpo, one file for any other condition.
    spec = next(iter(smk.input.spec), None)
    summary = evaluate(
        model_dir=smk.input.model,
        prompts_path=smk.input.prompts,
        wiki_path=smk.input.wiki,
        cfg=smk.params.cfg,
        condition=smk.wildcards.condition,
        out_parquet=smk.output.table,
        out_json=smk.output.summary,
        spec_path=spec,
        device=smk.params.device,
    )
    log.info(
        "wrote %s and %s: toxicity %.4f [%.4f, %.4f], log-PPL %s, F1 %s",
        smk.output.table,
        smk.output.summary,
        summary["toxicity"],
        summary["toxicity_ci_low"],
        summary["toxicity_ci_high"],
        summary["log_ppl"],
        summary["f1"],
    )
