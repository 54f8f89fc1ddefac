# Two commands a new user types: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned: a bare `torch` requirement on a machine without one can pull a
# multi-GB CUDA build. Override for a GPU machine, e.g. make TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url ...".
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.latentwire-installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=70.1"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,bench,ray]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest tests bench/test_step_device.py --benchmark-disable --durations=20

demo: $(STAMP)
	$(VENV)/bin/latentwire demo

# Benchmarks are not part of `make test`; bench/README.md says which command made each table.
bench: $(STAMP)
	$(VENV)/bin/pytest bench --benchmark-only --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
