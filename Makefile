# Two commands a new user types: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned: a bare `torch` requirement on a machine without one can pull a
# multi-GB CUDA build. Override for a GPU machine, e.g. make TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url ...".
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
# The exact versions the suite last passed with (README, "Dependencies"): every install here uses them.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.latentwire-installed
# `make test-latest`: the newest release of everything but torch, in a venv of its own
LATEST ?= .venv-latest
# -n 2: both cores (pytest-xdist); --dist loadfile keeps a module on one worker, so a module-scoped fixture
# (a Ray instance, a shared daemon) starts once
TEST_ARGS ?= tests bench/test_step_device.py --benchmark-disable --durations=20 -n 2 --dist loadfile

.PHONY: install test demo bench test-latest constraints clean

install: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c $(CONSTRAINTS) pip setuptools
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev,bench,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest $(TEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/latentwire demo

# Benchmarks are not part of `make test`; bench/README.md says which command made each table.
bench: $(STAMP)
	$(VENV)/bin/pytest bench --benchmark-only --benchmark-columns=min,median,mean,rounds

# Meets upstream first: a fresh venv with the newest release of every dependency (torch stays at
# TORCH_SPEC: the newest from PyPI may be a multi-GB CUDA build), then the whole suite. When it passes,
# $(LATEST)/constraints.txt holds what it passed with, and `make constraints` adopts it.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt -e ".[dev,bench,ray]"
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' > $(LATEST)/freeze.txt
	$(LATEST)/bin/pytest $(TEST_ARGS)
	(sed -n '/^#/p' $(CONSTRAINTS); cat $(LATEST)/freeze.txt) > $(LATEST)/constraints.txt
	@echo "test-latest passed: 'make constraints' adopts these versions (diff $(CONSTRAINTS) $(LATEST)/constraints.txt)"

constraints: $(LATEST)/constraints.txt
	cp $(LATEST)/constraints.txt $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .pytest_cache
