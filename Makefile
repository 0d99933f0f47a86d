# Quick start: `make demo`, `make lab` and `make test` each set up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# make lab serves LAB_DIR on PORT; LAB_ARGS go to `jupyter lab` as they are, e.g. LAB_ARGS="--no-browser --allow-root"
LAB_DIR  ?= notebooks
PORT     ?= 8888
LAB_ARGS ?=

.PHONY: demo lab test gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

# lab: JupyterLab and the workbench extension built from extensions/jupyterlab (Node.js, npm registry)
$(VENV)/.installed-lab: $(VENV)/.installed $(wildcard extensions/jupyterlab/*.json extensions/jupyterlab/*.toml \
		extensions/jupyterlab/src/* extensions/jupyterlab/moe_workbench_jupyterlab/*.py extensions/jupyterlab/jupyter-config/*/*)
	$(PIP) -e ".[lab]"
	$(PIP) ./extensions/jupyterlab
	touch $@

# dev: test tools, and Debian's chromium for the browser test (installed where we may, i.e. as root; the browser
# test skips without it)
$(VENV)/.installed-dev: $(VENV)/.installed-lab
	$(PIP) -e ".[dev]"
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/workbench demo

# tests/test_install.py runs this recipe with its own interpreter (PY=...) and without the setup (-o)
lab: $(VENV)/.installed-lab
	$(PY) -m jupyterlab --ServerApp.root_dir="$(LAB_DIR)" --port=$(PORT) $(LAB_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest

# gpu-check: on one H100/H200, the kernel tests compiled on the GPU and bench/gpu_moe.py; one results file
GPU_CHECK_OUT ?= gpu-check.json
gpu-check: $(VENV)/.installed-dev
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
