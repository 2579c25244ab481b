"""Snakemake script of the figure rules: see dpotox.outputs.figures.render_figure."""

from dpotox.logs import rule_log
from dpotox.outputs.figures import render_figure

with rule_log(snakemake) as log:
    smk = snakemake
    width, height = render_figure(
        smk.params.figure, smk.params.tables, smk.output.png, smk.output.pdf, smk.params.cfg
    )
    log.info(
        "drew %s for %s from %d table(s): %s (%d x %d px), %s",
        smk.params.figure,
        ", ".join(smk.params.tables),
        len(smk.input),
        smk.output.png,
        width,
        height,
        smk.output.pdf,
    )
