"""Snakemake script of rule prepare_model: see dpotox.sources.models.prepare_model."""

from dpotox.logs import rule_log
from dpotox.sources import prepare_model

with rule_log(snakemake) as log:
    model = snakemake.wildcards.model
    log.info("preparing model %r from %s", model, snakemake.params.spec["source"])
    out = prepare_model(model, snakemake.params.spec, snakemake.output[0])
    log.info("wrote %s", out)
