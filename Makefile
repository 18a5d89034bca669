# Two commands do all set-up from a fresh clone:
#   make demo   trains FedDISC (and its zero-fill baseline) on the bundled synthetic IEMOCAP-like corpus
#   make test   runs the test suite
# Both create .venv, install the pinned CPU torch wheel first, then build imer_fast against it
# (--no-build-isolation: an isolated build would pull an unpinned, multi-GB CUDA torch).
# On a machine whose Python already has a CUDA torch: make test TORCH_SPEC= VENV_FLAGS=--system-site-packages

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
# Where the pinned torch comes from: empty = pip's configured sources (this project's machines keep the CPU
# wheel locally); elsewhere TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build instead of
# PyPI's default CUDA-bundled one.
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imer_fast-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test bench install clean

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m imer_fast train --model feddisc --data synthetic-iemocap6 --scale 0.3 --feature-dim 64 --modality-noise 0.3 \
		--preset small --missing gcnet:0.5 --extractor-epochs 10 --generator-epochs 12 --classifier-epochs 5 \
		--batch-size 4 --lr 1e-3 --condition-observed --recovery-samples 3 --generator-batch-size 32 \
		--eval-rates 0.0,0.3,0.5,0.7 --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(VENV) build *.egg-info imer_fast/_C*.so runs
