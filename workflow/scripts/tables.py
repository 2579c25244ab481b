"""Snakemake script of rule tables: see dpotox.outputs.tables.build_tables."""

from pathlib import Path

import pyarrow.parquet as pq

from dpotox.logs import rule_log
from dpotox.outputs.tables import build_tables

with rule_log(snakemake) as log:
    smk = snakemake
    eval_dir = Path(smk.input.summaries[0]).parent
    tables = build_tables(
        eval_dir,
        list(smk.params.conditions),
        smk.wildcards.model,
        Path(smk.output[0]).parent,
        n_neurons_total=pq.read_metadata(smk.input.neurons).num_rows,
    )
    log.info(
        "wrote %d tables for %d conditions to %s",
        len(tables),
        len(smk.params.conditions),
        Path(smk.output[0]).parent,
    )
