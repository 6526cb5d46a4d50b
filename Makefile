# metaserve: `make run` serves the embedded default (serving dependencies only), `make test`
# runs the whole suite (installing the test and benchmark extras),
# `make test-fast` the tier without servers, Ray or PostgreSQL (minutes, for every change).
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only torch
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-fast cluster-test install clean-state

# Two stamps in the one venv. `make run` installs what serving needs and nothing else (the
# package's own dependencies: no pytest, schemathesis, moto, selenium, hypothesis, pandas...);
# `make test`, `make test-fast` and .ci/run install the dev, benchmark and examples extras too,
# and the example plugin (examples/plugins), which the plugin tests and the cluster test use.
$(VENV)/.serve-installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(VENV)/bin/pip install -c constraints.txt -e .
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt examples/plugins/metaserve-example-plugin/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(VENV)/bin/pip install -c constraints.txt -e '.[dev,benchmark,examples]'
	$(VENV)/bin/pip install -e examples/plugins/metaserve-example-plugin
	touch $@ $(VENV)/.serve-installed

install: $(VENV)/.installed

# Serving only: a venv that `make test` made already serves as it is.
run: $(VENV)/.serve-installed
	$(VENV)/bin/metaserve serve

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The fast tier: no server process, no Ray, SQLite only, on two workers (tests/conftest.py
# says how the markers are applied). METASERVE_TEST_TIER=fast makes an unmarked server start fail.
FAST_TIER = not (postgres or ray or server or cluster or slow)
test-fast: $(VENV)/.installed
	METASERVE_TEST_TIER=fast $(VENV)/bin/pytest -q -p no:cacheprovider -n 2 -m "$(FAST_TIER)" $(PYTEST_ARGS)

# The compose cluster on network/PID/mount namespaces (root; part of `make test` too).
cluster-test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/cluster

# Forget the embedded default's state (SQLite database, admin key, artifacts).
clean-state:
	rm -rf .metaserve
