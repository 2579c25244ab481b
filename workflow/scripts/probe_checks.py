"""Snakemake script of rule probe_checks: see dpotox.stages.probe_checks.probe_checks."""

from pathlib import Path

from dpotox.logs import rule_log
from dpotox.stages.probe_checks import probe_checks

with rule_log(snakemake) as log:
    smk = snakemake
    checks = probe_checks(
        base_model=smk.input.base,
        dpo_model=smk.input.dpo,
        probe_path=smk.input.probe,
        bootstrap_path=smk.input.bootstrap,
        neurons_path=smk.input.neurons,
        base_eval=smk.input.base_eval,
        cfg=smk.params.cfg,
        out=smk.output.checks,
        device=smk.params.device,
        metrics_path=smk.input.metrics,
        tables_root=Path(smk.output[0]).parent.parent,  # results/tables/{model}/table_probe.csv
        model_name=smk.wildcards.model,
    )
    log.info(
        "wrote %s: group stability %s; cos with the probe-free direction %.3f; on the base "
        "model's continuations %s; cos with DPO's mean residual shift %.3f",
        smk.output.checks,
        checks["stability"],
        checks["cos_probe_free"],
        checks["continuations"],
        checks["cos_dpo_shift"],
    )
