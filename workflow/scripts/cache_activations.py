"""Snakemake script of rule cache_activations: see dpotox.stages.activations.cache_activations."""

from dpotox.logs import rule_log
from dpotox.stages.activations import cache_activations

with rule_log(snakemake) as log:
    smk = snakemake
    # The spec input is a list: empty for base and dpo, one file for any other condition.
    spec = next(iter(smk.input.spec), None)
    info = cache_activations(
        model_dir=smk.input.model,
        prompts_path=smk.input.prompts,
        cfg=smk.params.cfg,
        out_dir=smk.output.cache,
        positions_dir=smk.output.get("positions"),
        spec_path=spec,
        variant=smk.wildcards.condition,
        device=smk.params.device,
    )
    log.info(
        "wrote %s: %d prompts, %d positions, %d layers x %d neurons",
        smk.output.cache,
        info["n_prompts"],
        info["n_positions"],
        info["n_layers"],
        info["d_mlp"],
    )
