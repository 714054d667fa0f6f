# Dataset expansion: common tasks. `make help` lists them.
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
EXTRAS ?= dev,slurm,joblib

.PHONY: help install run test test-slow test-gpu test-all sweep-digits benchmark-cpu report clean-cache

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

install:  ## create .venv and install the framework with its dev/slurm/joblib extras
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"

run:  ## the offline default job: digits, RandAugment 5x, small CNN on CPU, original vs expanded
	$(PYTHON) run.py

test:  ## fast CPU test suite (the CI command)
	$(PYTHON) -m pytest -q

test-slow:  ## slow CPU tests (longer real-data runs)
	$(PYTHON) -m pytest -q -m slow

test-gpu:  ## tests that need a CUDA device
	$(PYTHON) -m pytest -q -m gpu

test-all:  ## every test, whatever its marker
	$(PYTHON) -m pytest -q -m "slow or gpu or not (slow or gpu)"

sweep-digits:  ## original vs the three baselines on digits, 3 seeds, into results.md
	$(PYTHON) run.py -m experiment=digits_baselines

benchmark-cpu:  ## the recorded CPU benchmark: BreastMNIST 28 px, small CNN, 4 methods x 3 seeds
	$(PYTHON) run.py -m experiment=medical_cpu

report:  ## tables, figures, expansion grids and settings of a sweep: make report DIR=multirun/<date>/<time>
	@test -n "$(DIR)" || { echo "usage: make report DIR=<sweep folder>"; exit 2; }
	$(PYTHON) -m experiments.report $(DIR)

clean-cache:  ## delete expansion stores and fitted generators (.cache/)
	rm -rf .cache
