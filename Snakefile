# dpotox: how DPO reduces toxicity, neuron by neuron.
#   snakemake --profile local --configfile config/config.yaml      (this machine)
#   snakemake --profile slurm --configfile config/paper.yaml       (a SLURM cluster)
# The names are profiles/local and profiles/slurm, which `make setup` links into
# ~/.config/snakemake (`dpotox profiles link`); the paths work without it.
# Rules are thin: each calls one function of the dpotox package (src/dpotox) through a
# script in workflow/scripts/. See README.md for rerunning one rule or one model.

import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import min_version

min_version("9.0")

# The package lives beside the workflow; make it importable here and in every job (jobs
# inherit the environment, also inside conda envs and SLURM jobs), installed or not.
_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, _SRC)
# (update(): an assignment by key reads to snakemake --lint as a variable the workflow needs.)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p))

from dpotox.plan.checks import rows_needed
from dpotox.plan.config import missing_paths, read_yaml, validate_config
from dpotox.errors import ConfigError
from dpotox.plan.resources import requests
from dpotox.plan.alignment import (
    DEFAULT_RUN,
    RUN_PREFIX,
    alignment_run,
    alignment_runs,
    run_patches,
    training_config,
)
from dpotox.plan.conditions import (
    Ablation,
    ModelRun,
    chunks,
    parse as parse_condition,
    spec_conditions,
    sweep_conditions,
    toxic_ablation,
    runs_dpo_model,
    try_parse as try_parse_condition,
)
from dpotox.plan.params import rule_params
from dpotox.plan.outputs import (
    ALL_MODELS,
    FIGURES,
    figure_files,
    figure_inputs,
    method_table_files,
    neuron_stats_files,
    probe_table_files,
    result_table_files,
)

# The embedded default applies only when no --configfile is given: Snakemake merges config
# files, and the paper's models must not be run next to the default's.
if not config:

    configfile: "config/config.yaml"


# Snakemake has read the files already, but its YAML keeps the last of a key given twice
# without a word: read them again to refuse that, naming both lines.
for _file in workflow.overwrite_configfiles or []:
    try:
        read_yaml(_file)
    except ConfigError as e:
        raise WorkflowError(str(e)) from None

try:
    validate_config(config, check_paths=False)
except ConfigError as e:
    raise WorkflowError(f"{e}\n(the schema is workflow/schemas/config.schema.yaml)") from None

# A local file that is not there yet (the Jigsaw CSV of config/paper.yaml on a laptop) does
# not stop a dry run, which reads no data; a real run stops in onstart, before any job.
for _problem in missing_paths(config):
    logger.warning(f"config: {_problem}")


onstart:
    _missing = missing_paths(config)
    if _missing:
        raise WorkflowError("invalid config:\n  - " + "\n  - ".join(_missing))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/dpo.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/neurons.smk"
include: "workflow/rules/sweeps.smk"
include: "workflow/rules/methods.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/targets.smk"


# Aggregate targets only list files; on a cluster they must not become jobs.
localrules:
    all,
    model_manifest,


rule all:
    default_target: True
    input:
        expand("results/{model}/MANIFEST.tsv", model=MODELS),
        [
            f
            for s in FIGURE_SCOPES
            if s == ALL_MODELS
            for f in figure_files("results/figures", s, methods=bool(OTHER_RUNS))
        ],
