"""Snakemake script of rule neuron_table: see dpotox.stages.neurons.build_neuron_table."""

from dpotox.logs import rule_log
from dpotox.stages.neurons import build_neuron_table

with rule_log(snakemake) as log:
    smk = snakemake
    summary = build_neuron_table(
        base_model=smk.input.base,
        dpo_model=smk.input.dpo,
        probe_path=smk.input.probe,
        base_acts=smk.input.base_acts,
        dpo_acts=smk.input.dpo_acts,
        cfg=smk.params.cfg,
        out_neurons=smk.output.neurons,
        out_layers=smk.output.layers,
        out_tokens=smk.output.tokens,
        out_decomposition=smk.output.decomposition,
    )
    log.info(
        "wrote %s, %s and %s: %d neurons, %d reduced their projection, net reduction %.4f",
        smk.output.neurons,
        smk.output.layers,
        smk.output.tokens,
        summary["n_neurons"],
        summary["n_reducing"],
        summary["net_reduction"],
    )
