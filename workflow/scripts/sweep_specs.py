"""Snakemake script of rule sweep_specs: see dpotox.stages.sweeps.build_specs."""

from pathlib import Path

from dpotox.logs import rule_log
from dpotox.stages.sweeps import build_specs

with rule_log(snakemake) as log:
    smk = snakemake
    out = Path(smk.output.specs)
    counts = build_specs(
        neurons_path=smk.input.neurons,
        model_dir=smk.input.model,
        probe_path=smk.input.probe,
        dpo_acts=smk.input.dpo_acts,
        base_acts=smk.input.base_acts,
        cfg=smk.params.cfg,
        conditions=smk.params.conditions,
        out_dir=out,
        judged_path=out / "interpretable_toxic.parquet",
    )
    for name, n in counts.items():
        log.info("%s: %d neurons", name, n)
