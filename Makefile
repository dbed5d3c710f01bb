# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench bench-kernels clean

install: $(STAMP)

# setup.py imports torch to build the C++/CUDA extension itm_engine._C from csrc/, so torch and the
# build tools are installed first and the package is built without build isolation; the venv's
# ninja (put on PATH) compiles the sources in parallel. The CUDA part is compiled whenever torch is
# a CUDA build and a CUDA toolkit (nvcc) is found; ITM_BUILD_CUDA=0|1 and ITM_BUILD_EXT=0 override.
# Every extra is installed (the scorer alone needs none of them: docs/dependencies.md).
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision setuptools wheel ninja
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e '.[all,test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/itm-shapes demo

lint: install
	$(VENV)/bin/ruff check .

# the whole suite, lint first
test: lint
	$(PY) -m pytest -q

# without the tests marked slow (subprocess kills, multi-process runs, training)
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info itm_engine/_C*.so

# Benchmarks (not part of `make test`): the fused ops per backend, and itm-bench's default run.
bench-kernels: install
	$(PY) -m pytest benchmarks/test_kernels.py --benchmark-enable --benchmark-json=benchmarks/results/kernels-$$( $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json
	$(PY) benchmarks/summarize.py benchmarks/results/kernels-$$( $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')").json

bench: install
	$(VENV)/bin/itm-bench --json benchmarks/results/itm-bench-cpu-tiny.json --plot benchmarks/results/itm-bench-cpu-tiny.png --batch-sweep 1,4,16,64
