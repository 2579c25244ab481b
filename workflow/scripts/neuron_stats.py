"""Snakemake script of rule neuron_stats: see dpotox.outputs.neuron_stats.write_stats."""

from pathlib import Path

from dpotox.logs import rule_log
from dpotox.outputs.neuron_stats import write_stats

with rule_log(snakemake) as log:
    smk = snakemake
    out_dir = Path(smk.output[0]).parent
    tables = write_stats(
        neurons_path=smk.input.neurons,
        layers_path=smk.input.layers,
        tokens_path=smk.input.tokens,
        ablated_acts=smk.input.ablated,
        cfg=smk.params.cfg,
        out_dir=out_dir,
        # An alignment run other than DPO says whose table it is (rule neuron_stats_aligned).
        model=smk.wildcards.model
        + (f", run align-{run}" if (run := getattr(smk.wildcards, "run", None)) else ""),
        decomposition_path=smk.input.decomposition,
    )
    shares = tables["table5_group_shares"].set_index("group")
    log.info(
        "wrote %d tables to %s; share of the reduction: %s",
        len(tables),
        out_dir,
        ", ".join(
            f"{g} {shares.loc[g, 'pct_of_reduction']:.1f}%" for g in ("TP", "TN", "AP", "AN")
        ),
    )
