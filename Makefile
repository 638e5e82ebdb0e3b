# evomerge: `make demo` runs the main job, `make test` runs every test. Both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ZOO ?= .cache/zoo
# One thread per process: on small CPU machines oversubscription makes torch much slower.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv venv-mergekit zoo demo test test-fast bench clean

venv: $(VENV)/.installed

# torch first, pinned, and only when the venv has none: a CUDA torch you installed yourself is kept.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# mergekit, the peer we compare with, in a venv of its own (never imported by evomerge itself).
venv-mergekit: .venv-mergekit/.installed

.venv-mergekit/.installed:
	test -x .venv-mergekit/bin/python || $(PYTHON) -m venv .venv-mergekit
	.venv-mergekit/bin/python -c "import torch" 2>/dev/null || .venv-mergekit/bin/pip install -q torch==2.13.0
	.venv-mergekit/bin/pip install -q mergekit==0.1.5
	touch $@

zoo: venv
	$(VENV)/bin/evomerge zoo build $(ZOO)

demo: zoo
	$(PY) -m evomerge.service.demo --zoo $(ZOO) --out out/demo

test: zoo
	EVOMERGE_ZOO=$(ZOO) $(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv venv-mergekit
	$(PY) bench/merge_speed.py

clean:
	rm -rf out build .pytest_cache
