# metaserve: `make run` serves the embedded default, `make test` runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only torch
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test cluster-test install clean-state

# The example plugin (examples/plugins) is installed too: the plugin tests and the cluster test use it.
$(VENV)/.installed: pyproject.toml examples/plugins/metaserve-example-plugin/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(VENV)/bin/pip install -e '.[dev,benchmark,examples]'
	$(VENV)/bin/pip install -e examples/plugins/metaserve-example-plugin
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/metaserve serve

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The compose cluster on network/PID/mount namespaces (root; part of `make test` too).
cluster-test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/cluster

# Forget the embedded default's state (SQLite database, admin key, artifacts).
clean-state:
	rm -rf .metaserve
