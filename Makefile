# The two commands of the course: `make run-all` and `make test`. Each sets itself up first.
# `make help` lists every target.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
KERNEL  := tinyvit
# PROFILE picks a row of tinyvit_lib/profiles.py; DATASET=cifar100 or DATASET=imagenet is a shorthand
# for the GPU profiles (cifar100, imagenet-subset), DATASET=fashion-mnist for the default one.
DATASET ?=
PROFILE_OF_fashion-mnist := default
PROFILE_OF_cifar100 := cifar100
PROFILE_OF_imagenet := imagenet-subset
ifneq ($(DATASET),)
ifeq ($(PROFILE_OF_$(DATASET)),)
$(error DATASET=$(DATASET) is not one of fashion-mnist, cifar100, imagenet)
endif
endif
PROFILE ?= $(if $(DATASET),$(PROFILE_OF_$(DATASET)),default)
OUTDIR  := build/executed
FASHION_MNIST_DEB_DIR := /usr/share/datasets/fashion-mnist
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
LINTED  := tinyvit_lib benchmarks tests notebooks scripts conftest.py
# Quiet, deterministic headless runs: no progress bars (but in `make lab`), no stray threads beyond the cores we have.
export TQDM_DISABLE := 1
export DATA_ROOT
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# `make test` shares its tests among this many pytest-xdist workers of one thread each (at most 4:
# each holds its own PyTorch); conftest.py keeps the notebooks on one worker, in order.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))

.DEFAULT_GOAL := help
.PHONY: help setup run-all test lab format bench gpu-check data clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(VENV)/.ready: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (tinyvit)" >/dev/null
	@touch $@

setup: $(VENV)/.ready  ## create .venv with the package (editable) and the Jupyter kernel

data:  ## make sure Fashion-MNIST is on this machine (Debian package, installs in seconds)
	@if [ -f $(FASHION_MNIST_DEB_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found in $(FASHION_MNIST_DEB_DIR)"; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }; \
	else \
	  echo "Fashion-MNIST: no apt-get here; the notebooks will download it through torchvision."; \
	fi

run-all: $(VENV)/.ready data  ## execute every notebook in order (PROFILE=default|fast|long|cifar100|imagenet-subset, or DATASET=...)
	@$(BIN)/python scripts/run_notebooks.py --profile $(PROFILE) --kernel $(KERNEL) --out $(OUTDIR) --publish executed $(NOTEBOOKS)

test: $(VENV)/.ready  ## lint and format check, then the unit tests and every notebook under nbval (fast profile), on every core
	$(BIN)/ruff check $(LINTED) && $(BIN)/ruff format --check $(LINTED)
	TINYVIT_FAST=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(NOTEBOOKS) tests --nbval-lax --nbval-current-env \
	  -p no:cacheprovider -n $(TEST_WORKERS)

$(VENV)/.lab-ready: $(VENV)/.ready
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,lab]'
	@touch $@

lab: $(VENV)/.lab-ready  ## open JupyterLab on the project kernel (installs JupyterLab the first time)
	TQDM_DISABLE=0 $(BIN)/jupyter lab notebooks  # bars on: a learner watches runs train

format: $(VENV)/.ready  ## apply ruff's formatting and safe lint fixes (what `make test` checks)
	$(BIN)/ruff format $(LINTED) && $(BIN)/ruff check --fix $(LINTED)

bench: $(VENV)/.ready  ## images/s of our TinyViT-5M vs timm's on this machine (BENCH_ARGS="--isa avx2": as an AVX2-only CPU)
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

gpu-check: $(VENV)/.ready  ## a few minutes on a CUDA machine: teacher, store, student, torchrun x2 (refuses on a CPU)
	$(BIN)/python scripts/gpu_check.py

clean:  ## remove build/ (executed copies, fast-profile and exercise runs, notebook 06's files; keeps .venv, data, runs/, logits/)
	rm -rf build .pytest_cache
