# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# setup.py imports torch to build the C++/CUDA extension itm_engine._C from csrc/, so torch and the
# build tools are installed first and the package is built without build isolation; the venv's
# ninja (put on PATH) compiles the sources in parallel. The CUDA part is compiled whenever torch is
# a CUDA build and a CUDA toolkit (nvcc) is found; ITM_BUILD_CUDA=0|1 and ITM_BUILD_EXT=0 override.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision setuptools wheel ninja
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m itm_engine.demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info itm_engine/_C*.so
