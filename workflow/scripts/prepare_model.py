"""Snakemake script of rule prepare_model: see dpotox.sources.models.prepare_model."""

from dpotox.logs import rule_log
from dpotox.sources import prepare_model

with rule_log(snakemake) as log:  # noqa: F821 (snakemake is injected)
    model = snakemake.wildcards.model  # noqa: F821
    log.info("preparing model %r from %s", model, snakemake.params.spec["source"])  # noqa: F821
    out = prepare_model(model, snakemake.params.spec, snakemake.output[0])  # noqa: F821
    log.info("wrote %s", out)
