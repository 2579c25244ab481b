"""Snakemake script of rule toxic_ablation_spec: see dpotox.stages.neurons.write_toxic_ablation."""

from dpotox.logs import rule_log
from dpotox.stages.neurons import write_toxic_ablation

with rule_log(snakemake) as log:
    smk = snakemake
    spec = write_toxic_ablation(
        model_dir=smk.input.model,
        probe_path=smk.input.probe,
        n=int(smk.wildcards.n),
        out=smk.output.spec,
        cfg=smk.params.cfg,
    )
    log.info(
        "wrote %s: %d neurons in %d layers",
        smk.output.spec,
        sum(e.neurons.numel() for e in spec.edits),
        len(spec.edits),
    )
