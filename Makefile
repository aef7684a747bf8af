# Two commands do all the set-up on a fresh machine:
#   make repro   create .venv if missing, then run the DVC pipeline
#   make test    create .venv if missing, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
PRESET ?= cpu
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONHASHSEED := 0

# schnetpack 2.2 declares Python >= 3.12 but runs on 3.11 (2.1.1 pins old sympy and torch);
# on 3.11 install its dependencies explicitly and schnetpack itself with --no-deps.
SPK_DEPS := "numpy>=2,<2.5" "sympy>=1.13" ase h5py pyyaml "hydra-core>=1.1" "pytorch_lightning>=2" \
	torchmetrics hydra-colorlog rich fasteners dirsync torch-ema "matscipy>=1.1" tqdm progressbar petname vesin

.PHONY: install repro repro-paper test lint preset bench clean-venv results check-readme check-results

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	if $(BIN)/python -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then \
	  $(BIN)/python -m pip install -q $(SPK_DEPS) && \
	  $(BIN)/python -m pip install -q --no-deps --ignore-requires-python "schnetpack==2.2.0"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

repro: $(STAMP)
	dvc repro

# The tests run beside other jobs: idle OpenMP threads sleep instead of spinning (spinning on a busy machine
# made torch steps 10-50x slower). `make repro`, alone on the machine, keeps the runtime's default: its stages
# run 1.2-1.9x faster there (benchmarks/README.md, "OpenMP wait policy").
test: export OMP_WAIT_POLICY := PASSIVE
test: $(STAMP)
	python -m pytest -q

lint: $(STAMP)
	ruff check .

# Merge presets/$(PRESET).yaml into params.yaml (PRESET=cpu restores the defaults).
preset: $(STAMP)
	python -m crmse.presets $(PRESET)

# The paper-scale run, for a GPU machine: the paper preset, then the whole pipeline.
repro-paper: $(STAMP)
	python -m crmse.presets paper
	dvc repro

# README's result tables, generated from the committed metrics (between <!-- results:start/end --> markers).
# check-readme fails, printing a diff, when README's block differs from what `make results` would write.
results: $(STAMP)
	python -m crmse.results write

check-readme: $(STAMP)
	python -m crmse.results check

# Freshness: fails when the committed dvc.lock does not match the code or params at HEAD for a stage behind
# the tables (data, models and samples absent from a clone are not a failure). Runs `dvc status`; not in CI.
check-results: $(STAMP)
	python -m crmse.results fresh

bench: $(STAMP)
	python benchmarks/train_throughput.py
	python benchmarks/md_throughput.py

clean-venv:
	rm -rf $(VENV)
