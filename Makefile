# Two-command set-up:  make install  (optional; every target installs when needed)  then  make demo / make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU torch is pinned by default. GPU users: pre-install a CUDA torch into .venv
# (e.g. `.venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124`)
# and run `make install TORCH_CONSTRAINT=` so the pin does not replace it.
TORCH_CONSTRAINT ?= -c constraints-cpu.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean bench-throughput

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_CONSTRAINT) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pyrospatial demo --out results/demo

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-throughput: $(STAMP)
	$(BIN)/python benchmarks/engine_throughput.py --out benchmarks/results

clean:
	rm -rf $(VENV) build dist *.egg-info
