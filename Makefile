# Set-up and everyday commands. Every target creates what it needs first, so
# `make demo` and `make test` work on a fresh machine.
#
#   make demo    the main job: the synthetic CISS demo comparing the methods
#   make example the drop-in losses inside a small training loop
#   make test    build, then the test suite (what CI runs)
#   make lint    ruff (lint + format check) and clang-format check (CI runs it first)
#   make bench   CPU benchmarks (pytest-benchmark), JSON in benches/results/
#   make benchmark  the demo's protocol with 3 seeds, both BatchNorm settings (~1 hour on 2 CPU cores)
#   make build   (re)build lskd._C into the venv
#   make clean   remove build outputs (keeps .venv)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
# Build the CUDA kernels when a CUDA toolkit is present (they must compile in CI
# even without a GPU); set LSKD_NO_CUDA=1 to skip them.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
ifneq ($(CUDA_HOME),)
ifeq ($(LSKD_NO_CUDA),)
BUILD_ENV := CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}"
endif
endif
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
STAMP_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

# Pinned: another version of a formatter formats differently.
LINT_TOOLS ?= ruff==0.17.6 clang-format==23.1.5
# The host C++ only: the CUDA sources are also read as text by the CPU emulation of the
# kernels (tests/cuda_emu/build.py rewrites their launches), whose patterns a reflow breaks.
CXX_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: venv build test lint demo benchmark example bench clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy ninja pytest pytest-benchmark hypothesis expecttest tqdm matplotlib pillow
	touch $@

venv: $(VENV)/.deps

$(VENV)/.built: $(VENV)/.deps $(STAMP_SOURCES)
	$(BUILD_ENV) MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import lskd, lskd._C; print('lskd backends (cpu):', lskd.available_backends('cpu'))"
	touch $@

build: $(VENV)/.built

$(VENV)/.lint: $(VENV)/.deps
	$(PY) -m pip install -q $(LINT_TOOLS)
	touch $@

lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

test: $(VENV)/.built
	$(PY) -m pytest tests -q -ra

demo: $(VENV)/.built
	$(VENV)/bin/lskd demo

benchmark: $(VENV)/.built
	$(VENV)/bin/lskd demo --full --bn train --out runs/benchmark/bn-train
	$(VENV)/bin/lskd demo --full --bn frozen --out runs/benchmark/bn-frozen

example: $(VENV)/.built
	$(PY) examples/drop_in_losses.py
	$(PY) examples/rge_in_your_loop.py

bench: $(VENV)/.built
	mkdir -p benches/results
	$(PY) -m pytest benches -q --benchmark-only --benchmark-json=benches/results/cpu-latest.json

clean:
	rm -rf build *.egg-info lskd/_C*.so lskd/_build_info.py $(VENV)/.built
