# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines install the local CPU build first so the `torch>=2.4` range pulls no CUDA wheel.
# On a GPU machine with its own torch: make test TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/engram demo

test: venv
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
