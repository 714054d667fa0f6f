# Dataset expansion: common tasks. `make help` lists them.
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
EXTRAS ?= dev,slurm,joblib
TORCH_INDEX ?=
BENCH_OUT ?= benchmarks/results
WHEELHOUSE ?= dist/wheelhouse
PY ?= 3.12
PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64

.PHONY: help install run configs list test test-fast test-slow test-gpu test-all lint sweep-digits benchmark-cpu benchmark-training \
        benchmark-generation-cpu benchmark-gpu benchmark-gpu-quick benchmark-cost wheelhouse wheelhouse-check report \
        export clean-cache slurm-up slurm-down test-slurm worth worth-docs

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-25s %s\n", $$1, $$2}'

install:  ## create .venv and install the framework with its dev/slurm/joblib extras (TORCH_INDEX=<url>: torch from there first)
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(if $(TORCH_INDEX),$(PYTHON) -m pip install torch torchvision --index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"

run:  ## the offline default job: digits, RandAugment 5x, small CNN on CPU, original vs expanded
	$(PYTHON) run.py

configs:  ## regenerate conf/method/defaults/*.yaml from the methods' settings classes (a test checks they match)
	$(PYTHON) -m experiments.config

list:  ## every registered method, dataset, quality metric and classifier, one line each
	$(PYTHON) -m experiments.catalog

test:  ## the CPU test suite (the CI command): unit, contract and integration tests
	$(PYTHON) -m pytest -q

test-fast:  ## the inner loop: unit and contract tests, no end-to-end runs (under 5 minutes on 2 cores)
	$(PYTHON) -m pytest -q -m "not slow and not gpu and not integration"

lint:  ## ruff: lint and formatting (configured in pyproject.toml); `ruff format .` fixes the formatting
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test-slow:  ## slow CPU tests (longer real-data runs)
	$(PYTHON) -m pytest -q -m slow

test-gpu:  ## tests that need a CUDA device
	$(PYTHON) -m pytest -q -m gpu

test-all:  ## every test, whatever its marker
	$(PYTHON) -m pytest -q -m "slow or gpu or not (slow or gpu)"

sweep-digits:  ## original vs the three baselines on digits, 3 seeds, into results.md
	$(PYTHON) run.py -m experiment=digits_baselines

rehearse:  ## real-size rehearsal on the CPU: each SD method (GIF-SD and the field's) makes one image at SD v1.x sizes, random weights
	$(PYTHON) -m benchmarks.rehearse

benchmark-cpu:  ## the recorded CPU benchmark: BreastMNIST 28 px, small CNN, 4 methods x 3 seeds
	$(PYTHON) run.py -m experiment=medical_cpu

benchmark-training:  ## CPU training epoch: framework vs bare PyTorch loop (BreastMNIST 28 px), decoded-tensor cache
	$(PYTHON) benchmarks/training_throughput.py --device cpu --repeats 7 --json $(BENCH_OUT)/training_cpu.json
	$(PYTHON) benchmarks/tensor_cache_speed.py --json $(BENCH_OUT)/tensor_cache_cpu.json

benchmark-generation-cpu:  ## GIF-SD/MAE/unCLIP + closed-set images/s and GFLOP/s at real sizes, smallest CPU settings
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/gif_sd_throughput.py --device cpu --json $(BENCH_OUT)/gif_sd_cpu.json
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/gif_mae_throughput.py --device cpu --json $(BENCH_OUT)/gif_mae_cpu.json
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/gif_unclip_throughput.py --device cpu --resolution 64 --steps 2 \
	    --score-steps 1 --ratio 1 --json $(BENCH_OUT)/gif_unclip_cpu.json
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/closed_set_throughput.py --device cpu --json $(BENCH_OUT)/closed_set_cpu.json
	OMP_NUM_THREADS=1 $(PYTHON) benchmarks/closed_set_throughput.py --device cpu --unet tiny --resolution 16 \
	    --steps 20 --fit-batch 32 --fit-steps 5 --json $(BENCH_OUT)/closed_set_tiny_cpu.json

benchmark-gpu:  ## every GPU benchmark in one command (training + 4 generation methods), then docs/cost.md
	$(PYTHON) benchmarks/training_throughput.py --device cuda --json $(BENCH_OUT)/training_cuda.json
	$(PYTHON) benchmarks/gif_sd_throughput.py --device cuda --method both --json $(BENCH_OUT)/gif_sd_cuda.json
	$(PYTHON) benchmarks/gif_mae_throughput.py --device cuda --json $(BENCH_OUT)/gif_mae_cuda.json
	$(PYTHON) benchmarks/gif_unclip_throughput.py --device cuda --json $(BENCH_OUT)/gif_unclip_cuda.json
	$(PYTHON) benchmarks/closed_set_throughput.py --device cuda --json $(BENCH_OUT)/closed_set_cuda.json
	$(PYTHON) experiments/tools/cost_table.py --measurements $(BENCH_OUT) --out docs/cost.md

benchmark-gpu-quick:  ## every GPU figure in ~8 min, each part capped: make benchmark-gpu-quick OUT=<folder> [DATA=<bundle>/data] [SMOKE=1]
	@test -n "$(OUT)" || { echo "usage: make benchmark-gpu-quick OUT=<folder> [DATA=<folder with medmnist/>] [SMOKE=1]"; exit 2; }
	$(PYTHON) experiments/tools/gpu_quick.py --out $(OUT) $(if $(DATA),--data $(DATA)) $(if $(SMOKE),--device cpu --smoke)

wheelhouse:  ## the offline bundle for a GPU node without network: make wheelhouse [WHEELHOUSE=dist/wheelhouse] [PY=3.12]
	$(PYTHON) experiments/tools/wheelhouse.py build --out $(WHEELHOUSE) --python-version $(PY) --platform $(PLATFORMS)

wheelhouse-check:  ## install the bundle into an empty folder on a clean Python and run the quick command's smoke
	$(PYTHON) experiments/tools/wheelhouse.py check $(WHEELHOUSE)

slurm-up:  ## root: a one-node SLURM cluster on this machine for the slurm tests (installs Debian's slurm + munge if missing)
	bash experiments/tools/slurm_cluster.sh up

slurm-down:  ## stop the one-node SLURM cluster's daemons
	bash experiments/tools/slurm_cluster.sh down

test-slurm:  ## the tests through the real scheduler (after make slurm-up); they fail instead of skipping
	REQUIRE_SLURM=1 $(PYTHON) -m pytest -q -m slurm

benchmark-cost:  ## docs/cost.md: each paper table's sweep in device-hours from the measurements in $(BENCH_OUT)
	$(PYTHON) experiments/tools/cost_table.py --measurements $(BENCH_OUT) --out docs/cost.md

export:  ## an expanded set as a Hugging Face dataset: make export SRC=<store, run or sweep folder> OUT=<folder>
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make export SRC=<store, run or sweep folder> OUT=<folder>"; exit 2; }
	$(PYTHON) -m experiments.data.sharing export $(SRC) $(OUT)

report:  ## tables, figures, expansion grids and settings of a sweep: make report DIR=multirun/<date>/<time>
	@test -n "$(DIR)" || { echo "usage: make report DIR=<sweep folder>"; exit 2; }
	$(PYTHON) -m experiments.analysis.report $(DIR)

worth:  ## what a generated image is worth, every method, both protocols, with cost: make worth DIR=<sweep folder>
	@test -n "$(DIR)" || { echo "usage: make worth DIR=<sweep folder, e.g. multirun/worth_cpu>"; exit 2; }
	$(PYTHON) -m experiments.analysis.worth $(DIR)

worth-docs:  ## regenerate docs/worth_cpu.md and its figures from the committed per-run table docs/worth_cpu_runs.csv
	$(PYTHON) -m experiments.analysis.worth docs/worth_cpu_runs.csv --out docs --stem worth_cpu

clean-cache:  ## delete expansion stores and fitted generators (.cache/)
	rm -rf .cache
