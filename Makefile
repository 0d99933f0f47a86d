# Quick start: `make demo` and `make test` each set up .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

# dev: test tools, the JupyterLab extension built from extensions/jupyterlab (npm registry), and Debian's
# chromium for the browser test (installed where we may, i.e. as root; the browser test skips without it)
$(VENV)/.installed-dev: $(VENV)/.installed $(wildcard extensions/jupyterlab/*.json extensions/jupyterlab/*.toml extensions/jupyterlab/src/*)
	$(PIP) -e ".[dev]"
	$(PIP) ./extensions/jupyterlab
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/workbench demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
