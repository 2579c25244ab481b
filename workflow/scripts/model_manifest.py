"""Snakemake script of rule model_manifest: see dpotox.io.write_manifest."""

from dpotox.io import write_manifest
from dpotox.logs import rule_log

with rule_log(snakemake) as log:
    n = write_manifest(snakemake.input, snakemake.output[0])
    log.info("wrote %s: %d files", snakemake.output[0], n)
