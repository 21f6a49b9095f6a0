# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines install the local CPU build first so the `torch>=2.4` range pulls no CUDA wheel.
# On a GPU machine with its own torch: make test TORCH_SPEC=
TORCH_SPEC ?= torch==2.13.0
# dev: tests (Triton included: the suite runs the kernels in its interpreter) and stub generation;
# demo: the demo's plot. On a GPU machine with its own torch: make test TORCH_SPEC=
EXTRAS ?= dev,demo

# Wheels a GPU machine lent without network lacks: its image has torch, triton, numpy, tokenizers,
# msgpack, rich and prometheus_client, but not lmdb, grpcio-health-checking or a grpcio/protobuf
# as new as the generated stubs need (pyproject.toml's floors; the stubs check them). Carry .wheels/ to it and run
# bench/gpu_session.sh there. Its python is 3.12 (WHEELS_PY). Ray is left out: its wheel (79 MB) is
# over the 64 MiB the machine may be carried, and the GPU checks run without it (local_shards.py).
WHEELS_PY ?= 3.12
WHEELS := grpcio==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2 lmdb==3.0.0

.PHONY: demo test venv clean wheels
venv: $(VENV)/.installed

# setup.py and the C sources: the compiled kernels (memory_service/native/) are rebuilt when they change
$(VENV)/.installed: pyproject.toml Makefile setup.py $(wildcard memory_service/native/*.c)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(VENV)/bin/engram demo

# Two workers (pytest-xdist), each test file whole on one of them (its module fixtures, e.g. one
# Ray cluster, shared): most tests wait on shard processes, so two share the 2 cores well.
JOBS ?= 2
test: venv
	$(VENV)/bin/pytest -q -n $(JOBS) --dist loadfile

wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(WHEELS_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .wheels $(WHEELS)
	du -ch .wheels/*.whl | tail -n 1

clean:
	rm -rf $(VENV) .pytest_cache
