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
# Test processes (pytest-xdist), each with one torch thread: on 2 cores, 2 workers take the suite
# from ~11 to ~6.5 min (measured; one thread per process thrashes less than two). Whole files go
# to one worker (--dist loadfile), so module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: install demo test clean bench-throughput

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_CONSTRAINT) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pyrospatial demo --out results/demo

# squidpy (for the scverse interoperability test) pulls spatialdata and an S3 stack whose pins
# clash with ours (python-dateutil), so it lives in a venv of its own; ~2 min, ~1.5 GB, no torch.
SCVERSE_VENV ?= .venv-scverse
SCVERSE_STAMP := $(SCVERSE_VENV)/.installed

$(SCVERSE_STAMP):
	test -x $(SCVERSE_VENV)/bin/python || $(PYTHON) -m venv $(SCVERSE_VENV)
	$(SCVERSE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SCVERSE_VENV)/bin/python -m pip install --quiet 'squidpy>=1.6,<1.9'
	touch $(SCVERSE_STAMP)

test: $(STAMP) $(SCVERSE_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYROSPATIAL_SCVERSE_PYTHON=$(abspath $(SCVERSE_VENV))/bin/python \
		$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench-throughput: $(STAMP)
	$(BIN)/python benchmarks/engine_throughput.py --out benchmarks/results

clean:
	rm -rf $(VENV) $(SCVERSE_VENV) $(GPU_VENV) build dist *.egg-info

# --- deconvolution benchmark (issue 5): peers live in their own venv ---------------------
BENCH_VENV ?= .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed-deconvolution

.PHONY: bench-env bench-deconvolution

bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): benchmarks/requirements-peers-deconvolution.txt constraints-cpu.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install --quiet -c constraints-cpu.txt -r benchmarks/requirements-peers-deconvolution.txt
	touch $(BENCH_STAMP)

bench-deconvolution: $(STAMP) $(BENCH_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/deconvolution.py --peer-python $(BENCH_VENV)/bin/python --out benchmarks/results
	# data sets where types vary inside (issue 21); DestVI shortened to 500 epochs to fit a CPU session
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/deconvolution.py --peer-python $(BENCH_VENV)/bin/python \
		--datasets sim_gradient osmfish_broad_100um osmfish_broad_50um --epochs-override '{"destvi": 500}' \
		--method-timeouts '{"pyrospatial_states": 1200, "stereoscope": 1200, "cell2location": 1800, "destvi": 2700}' \
		--timeout 900 --out benchmarks/results --out-name deconvolution_broad

# --- alignment benchmark (issue 7): PASTE, moscot, POT in their own venv ------------------
# CPU torch first (never a CUDA build), then the peers, then pyrospatial itself (editable):
# the benchmark runs every method, pyrospatial included, with this venv's python.
BENCH_ALIGN_VENV ?= .bench-venv-align
BENCH_ALIGN_STAMP := $(BENCH_ALIGN_VENV)/.installed-alignment

.PHONY: bench-env-align bench-alignment

bench-env-align: $(BENCH_ALIGN_STAMP)

$(BENCH_ALIGN_STAMP): benchmarks/requirements-peers-alignment.txt constraints-cpu.txt pyproject.toml
	test -x $(BENCH_ALIGN_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_ALIGN_VENV)
	$(BENCH_ALIGN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_ALIGN_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_ALIGN_VENV)/bin/python -m pip install --quiet -c constraints-cpu.txt -r benchmarks/requirements-peers-alignment.txt
	$(BENCH_ALIGN_VENV)/bin/python -m pip install --quiet -c constraints-cpu.txt -e .
	touch $(BENCH_ALIGN_STAMP)

bench-alignment: $(BENCH_ALIGN_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BENCH_ALIGN_VENV)/bin/python benchmarks/alignment.py --out benchmarks/results

# held-apart section pairs (HER2 ST) for choosing align's settings; POT is in the main environment
.PHONY: bench-alignment-heldapart
bench-alignment-heldapart: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/alignment_heldapart.py --out benchmarks/results

# --- calibration study (issue 6): coverage, SBC, SVI vs NUTS; ~25 min on one CPU thread ------
.PHONY: bench-calibration

bench-calibration: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/calibration.py --out benchmarks/results

# --- domains benchmark (issue 19): one venv per peer, .bench-venv-domains-<peer> -----------
# CPU torch==2.13.0 first where a peer needs torch (never a CUDA build). A peer that fails to
# install leaves <venv>/install.log and no stamp; benchmarks/domains.py records it as
# finished: false with that reason instead of dropping it. scanpy and KMeans run in .venv.
DOMAIN_PEERS ?= banksy spagcn graphst cellcharter aestetik stagate
BENCH_DOMAINS_VENV ?= .bench-venv-domains

.PHONY: bench-env-domains bench-domains

bench-env-domains:
	@for p in $(DOMAIN_PEERS); do \
	  v=$(BENCH_DOMAINS_VENV)-$$p; req=benchmarks/requirements-peers-domains-$$p.txt; \
	  test -f $$v/.installed -a $$v/.installed -nt $$req && continue; \
	  echo "installing $$p into $$v"; \
	  ( test -x $$v/bin/python || $(PYTHON) -m venv $$v ) && \
	  ( $$v/bin/python -m pip install --quiet --upgrade pip && \
	    if grep -q '^torch==' $$req; then $$v/bin/python -m pip install --quiet torch==2.13.0; fi && \
	    $$v/bin/python -m pip install --quiet -r $$req && \
	    if test -f benchmarks/requirements-peers-domains-$$p-nodeps.txt; then \
	      $$v/bin/python -m pip install --quiet --no-deps -r benchmarks/requirements-peers-domains-$$p-nodeps.txt; fi \
	  ) > $$v/install.log 2>&1 && touch $$v/.installed || echo "$$p failed to install: see $$v/install.log"; \
	done

bench-domains: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/domains.py --venv-prefix $(BENCH_DOMAINS_VENV) --out benchmarks/results

# --- mapping benchmark (issue 20): Tangram, novoSpaRc, POT in .bench-venv-mapping ------------
# CPU torch==2.13.0 first (never a CUDA build; without it tangram-sc is not installed), then each
# line of the requirements on its own: a line pip cannot install is logged as "FAILED: <line>"
# in $(BENCH_MAPPING_VENV)/install.log and benchmarks/mapping.py records the methods needing it
# as finished: false with that reason. pyrospatial runs in .venv. ~25 min on one CPU thread.
BENCH_MAPPING_VENV ?= .bench-venv-mapping
BENCH_MAPPING_STAMP := $(BENCH_MAPPING_VENV)/.installed

.PHONY: bench-env-mapping bench-mapping

bench-env-mapping: $(BENCH_MAPPING_STAMP)

$(BENCH_MAPPING_STAMP): benchmarks/requirements-peers-mapping.txt
	test -x $(BENCH_MAPPING_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_MAPPING_VENV)
	@log=$(BENCH_MAPPING_VENV)/install.log; pip="$(BENCH_MAPPING_VENV)/bin/python -m pip install --quiet"; \
	$$pip --upgrade pip > $$log 2>&1; \
	if $$pip torch==2.13.0 >> $$log 2>&1; then torch=ok; else torch=; echo "FAILED: torch==2.13.0" | tee -a $$log; fi; \
	for req in $$(grep -v '^#' benchmarks/requirements-peers-mapping.txt); do \
	  case $$req in tangram*) test -n "$$torch" || { echo "FAILED: $$req (needs the CPU torch)" | tee -a $$log; continue; };; esac; \
	  echo "== $$req" >> $$log; \
	  $$pip $$req >> $$log 2>&1 || echo "FAILED: $$req" | tee -a $$log; \
	done
	touch $(BENCH_MAPPING_STAMP)

bench-mapping: $(STAMP) $(BENCH_MAPPING_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/mapping.py --peer-python $(BENCH_MAPPING_VENV)/bin/python --out benchmarks/results

# --- scaling (issue 23): wall time, peak RSS and coverage per stage vs cells -----------------
.PHONY: bench-scaling bench-gpu bench-export-parts

bench-scaling: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/scaling.py --device cpu --out benchmarks/results

# the export's costly parts for this checkout and, side by side, the revision EXPORT_AGAINST
EXPORT_AGAINST ?= 1a92edb
bench-export-parts: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/export_parts.py --sizes 10000,30000,100000 \
		--against $(EXPORT_AGAINST) --out benchmarks/results

# GPU: a CUDA build of torch in a venv of its own (.venv-gpu, pyrospatial editable), then the
# CUDA tests (every test with 'cuda' in its name) and the 300k / 1M-cell scaling records,
# added to benchmarks/results/scaling.json beside the CPU ones. Needs a GPU and the network
# (the CUDA wheels); GPU_TORCH_INDEX picks the CUDA version of the wheels. The scaling records
# are written even when a CUDA test fails; the target then exits non-zero.
GPU_VENV ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
GPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet torch==2.13.0 --index-url $(GPU_TORCH_INDEX)
	$(GPU_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(GPU_STAMP)

bench-gpu: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu: torch sees no CUDA device')"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(GPU_VENV)/bin/python -m pytest -q -k cuda tests/; echo $$? > $(GPU_VENV)/cuda-tests.rc
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(GPU_VENV)/bin/python benchmarks/scaling.py --device cuda --sizes 300000,1000000 --out benchmarks/results
	@test "$$(cat $(GPU_VENV)/cuda-tests.rc)" = 0 || { echo "bench-gpu: the CUDA tests failed (scaling records written anyway)"; exit 1; }
