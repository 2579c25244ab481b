"""Snakemake script of rule make_pairs: see dpotox.stages.pairs.make_pairs."""

from dpotox.logs import rule_log
from dpotox.stages.pairs import make_pairs

with rule_log(snakemake) as log:
    smk = snakemake
    report = make_pairs(
        model_dir=smk.input.get("model"),
        cfg=smk.params.cfg,
        out_parquet=smk.output.pairs,
        out_json=smk.output.report,
        prompts_path=smk.input.prompts,
        wiki_path=smk.input.get("wiki"),
        pair_prompts_path=smk.input.get("pair_prompts"),
        pairs_path=smk.input.get("pairs"),
        probe_path=smk.input.get("probe"),
        samples_path=smk.output.samples,
        device=smk.params.device,
    )
    log.info(
        "%s: %d of %d candidates kept, mean toxicity gap %.3f, evaluation overlap %d",
        report["method"],
        report["n_pairs"],
        report["n_candidates"],
        report["mean_gap"],
        report["prompts"]["eval_overlap"],
    )
