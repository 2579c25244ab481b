"""Snakemake script of rule tables: see dpotox.outputs.tables.build_tables."""

from pathlib import Path

import pandas as pd

from dpotox.logs import rule_log
from dpotox.outputs.tables import build_tables

with rule_log(snakemake) as log:
    smk = snakemake
    eval_dir = Path(smk.input.summaries[0]).parent
    neurons = pd.read_parquet(smk.input.neurons, columns=["delta", "shift", "cos"])
    tables = build_tables(
        eval_dir,
        list(smk.params.conditions),
        smk.wildcards.model,
        Path(smk.output[0]).parent,
        n_neurons_total=len(neurons),
        neurons=neurons,
        cfg=smk.params.cfg,
    )
    log.info(
        "wrote %d tables for %d conditions to %s",
        len(tables),
        len(smk.params.conditions),
        Path(smk.output[0]).parent,
    )
