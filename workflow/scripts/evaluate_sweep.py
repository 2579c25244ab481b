"""Snakemake script of the sweep jobs: see dpotox.stages.evaluate.evaluate_conditions."""

from dpotox.logs import rule_log
from dpotox.stages.evaluate import Condition, evaluate_conditions

with rule_log(snakemake) as log:
    smk = snakemake
    conditions = [
        Condition(c, spec, table, summary)
        for c, spec, table, summary in zip(
            smk.params.conditions,
            smk.params.spec_paths,
            smk.output.tables,
            smk.output.summaries,
            strict=True,
        )
    ]
    summaries = evaluate_conditions(
        model_dir=smk.input.model,
        prompts_path=smk.input.prompts,
        wiki_path=smk.input.wiki,
        cfg=smk.params.cfg,
        conditions=conditions,
        device=smk.params.device,
    )
    for s in summaries:
        log.info(
            "%s: toxicity %.4f [%.4f, %.4f], log-PPL %s, F1 %s (%d neurons edited)",
            s["condition"],
            s["toxicity"],
            s["toxicity_ci_low"],
            s["toxicity_ci_high"],
            s["log_ppl"],
            s["f1"],
            s["n_edited_neurons"],
        )
