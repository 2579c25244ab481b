"""Snakemake script of rule methods_tables: see dpotox.outputs.methods.write_methods_tables."""

from pathlib import Path

from dpotox.logs import rule_log
from dpotox.outputs.evals import load_summary
from dpotox.outputs.methods import write_methods_tables
from dpotox.plan.alignment import alignment_runs, run_patches

with rule_log(snakemake) as log:
    smk = snakemake
    runs = alignment_runs(smk.params.cfg)
    names = [r.name for r in runs]
    eval_dir = Path(smk.input.summaries[0]).parent
    # The bootstrap of the paired differences is the evaluations' own (as rule tables does).
    base = load_summary(eval_dir, "base")
    tables = write_methods_tables(
        runs,
        eval_dir,
        dict(zip(names, smk.input.neurons, strict=True)),
        dict(zip(names, smk.input.models, strict=True)),
        Path(smk.output[0]).parent,
        model=smk.wildcards.model,
        patches=run_patches(smk.params.cfg),
        patch_dirs=dict(zip(names, smk.params.patch_dirs, strict=True)),
        bootstrap_samples=int(base["bootstrap_samples"]),
        ci_level=float(base["ci_level"]),
        seed=int(base["settings"]["seed"]),
    )
    table = tables["table_methods"].set_index("run")
    log.info(
        "wrote the methods tables of %d runs: %s",
        len(runs),
        "; ".join(
            f"{r} toxicity {table.at[r, 'toxicity']:.3f}, "
            f"reducing {table.at[r, 'pct_reducing']:.1f}%"
            for r in names
        ),
    )
