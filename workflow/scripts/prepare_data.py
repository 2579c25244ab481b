"""Snakemake script of rule prepare_data: see dpotox.sources.tables.prepare_table."""

from dpotox.logs import rule_log
from dpotox.sources import prepare_table

with rule_log(snakemake) as log:
    dataset = snakemake.wildcards.dataset
    sources = snakemake.params.sources
    log.info("reading %d source(s) for %s: %s", len(sources), dataset, sources)
    df = prepare_table(dataset, sources, snakemake.output[0], min_rows=snakemake.params.min_rows)
    log.info(
        "wrote %s: %d rows; per source: %s",
        snakemake.output[0],
        len(df),
        df["source"].value_counts().to_dict(),
    )
