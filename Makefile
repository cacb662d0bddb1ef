# Two commands do all the set-up on a fresh machine:
#   make demo   builds (or reuses) the tiny model pair and authenticates its images
#   make test   runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel these machines carry; a torch already in the venv is kept
# (a rerun), and TORCH_SPEC= skips the pin (pip then picks the torch setup.py allows).
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: demo test env clean

$(VENV)/.installed: setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch present"; \
	elif [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q -c constraints.txt "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -c constraints.txt numpy  # setup.py imports torch, which warns without it
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	touch $@

env: $(VENV)/.installed

demo: env
	$(VENV)/bin/cgidm demo --out $(DEMO_OUT)

# The tiny world is built (or found in the cache) once, with every core, before the
# test workers start: inside a worker it would train on one thread while the other waits.
test: env
	$(PY) -m cgidm.testing.tiny
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_OUT)

# The first GPU contact in one command, on a CUDA machine with the carried wheels (.whl/,
# ../shared/tools/gpu-wheels.sh), under its own python3 (no venv, nothing fetched): builds
# the extension, runs the CUDA/graph/Triton tests, the ops under compute-sanitizer, and
# bench_engine at batch 1 and the calibrated batch; a stage table at the end, rows in
# bench/results/ (copied into $OUT when set). Without CUDA: a CPU smoke of the same script.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check:
	$(GPU_PY) bench/gpu_check.py
