# refimpl: every target creates or refreshes the local virtual environment (.venv) first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-all golden bench bench-peers lint wheel-check clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,plot,dask]'
	touch $(STAMP)

install: $(STAMP)

# The main job: train a small spiking SSM (SpikingSSM LIF) on the delayed-recall task and
# print its summary (about a minute on 2 cores), then the parallel-vs-iterative checks.
run: install
	$(BIN)/refimpl info
	$(BIN)/refimpl train --task recall --activation lif --samples 1000 --length 100 \
	  --d-model 32 --d-state 16 --layers 2 --epochs 12 --out runs/make-run --overwrite
	$(BIN)/refimpl evaluate runs/make-run/checkpoint.h5 --stream
	$(BIN)/refimpl equivalence --cases 20 --seed 0

# Fast suite (a few minutes on 2 cores, Numba compile included).
test: install
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider --hypothesis-profile=dev tests

# Everything, with the heavier hypothesis profile (derandomized, more examples).
test-all: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci tests

golden: install
	$(BIN)/refimpl golden generate --overwrite

bench: install
	$(BIN)/python benchmarks/run.py

# refimpl beside PyTorch CPU eager, the same model in the same run (issue 13): builds the separate
# benchmark environment .venv-peers (PyTorch 2.13 CPU; a benchmark-only tool, never a refimpl
# dependency; refimpl installed editable so the peer reads its parameters), checks that the torch
# model gives refimpl's float64 loss and gradients, then times the grid and writes
# benchmarks/peers/results.json and the `peers` region of BENCHMARKS.md (about an hour on
# 2 cores). Options through PEERS_ARGS, e.g. PEERS_ARGS="--only-family lif" or "--quick".
PEERS       := .venv-peers
PEERS_STAMP := $(PEERS)/.installed-stamp
PEERS_ARGS  ?=

$(PEERS_STAMP): setup.cfg pyproject.toml
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet torch==2.13.0
	$(PEERS)/bin/python -m pip install --quiet numpy scipy h5py -e .
	touch $(PEERS_STAMP)

bench-peers: install $(PEERS_STAMP)
	$(BIN)/python benchmarks/peers/run.py --peers-python $(PEERS)/bin/python $(PEERS_ARGS)

# Threads that cooperate and a fast first step (issue 25): refimpl at 1f81af2 (a temporary git
# worktree; CONTENTION_ARGS="--before REF" for another) beside the working tree, every figure
# from a fresh process on the thread settings the version chooses (NUMBA_NUM_THREADS and the
# other thread variables removed): the lif classifier and language-model training steps quiet
# and beside 2 and 4 busy processes, and `refimpl generate` of 20 tokens (warm and cold Numba
# cache) and the steady tokens/s of every family; writes benchmarks/contention.json and the
# `contention` region of BENCHMARKS.md (about 10 minutes on 2 cores). Options through
# CONTENTION_ARGS, e.g. "--only generate" or "--quick --out-dir /tmp/contention-quick".
CONTENTION_ARGS ?=

.PHONY: bench-contention
bench-contention: install
	$(BIN)/python benchmarks/contention.py $(CONTENTION_ARGS)

# The PyTorch backend example run for real (issue 21): in the .venv-peers environment above
# (torch CPU; never a refimpl dependency) examples/torch_backend.py writes candidates for every
# case of its suites at --dtype float64, float32, bfloat16 and float16 into a temporary folder,
# `refimpl golden verify --precision` checks each at its own profile; fails if any verdict fails,
# and writes the verdict table into examples/README.md (examples/run_backend_check.py; 40-55 s
# on 2 cores once the environment exists, which takes a minute to build).
.PHONY: example-check
example-check: install $(PEERS_STAMP)
	$(BIN)/python examples/run_backend_check.py --torch-python $(PEERS)/bin/python \
	  --refimpl $(BIN)/refimpl

# The conformance matrix of SNN libraries (issue 24): builds its own environment .venv-conform
# (PyTorch 2.13 CPU from the local file, pinned by a constraints file so that no library pulls
# another torch; refimpl editable; then snntorch, spikingjelly and norse, each installed on its
# own: a library that fails keeps its rows in the matrix with pip's last line, from
# .venv-conform/install-<library>.log), runs `refimpl conform` on every adapter object of
# examples/conform/ (a library configuration at float32 and float64) and writes
# examples/conform/matrix.json, the minimal counterexamples (examples/conform/cases/) and the
# `conform-matrix` region of README.md. Never a refimpl dependency, not part of `make test`.
# Options through CONFORM_ARGS, e.g. CONFORM_ARGS="--examples 20" or "--only snntorch".
# Delete .venv-conform/.installed-stamp to retry the library installs.
CONFORM       := .venv-conform
CONFORM_STAMP := $(CONFORM)/.installed-stamp
CONFORM_LIBS  := snntorch spikingjelly norse
CONFORM_ARGS  ?=

$(CONFORM_STAMP): setup.cfg pyproject.toml
	test -x $(CONFORM)/bin/python || $(PYTHON) -m venv $(CONFORM)
	$(CONFORM)/bin/python -m pip install --quiet --upgrade pip
	echo "torch==2.13.0" > $(CONFORM)/constraints.txt
	$(CONFORM)/bin/python -m pip install --quiet -c $(CONFORM)/constraints.txt torch==2.13.0 -e .
	for lib in $(CONFORM_LIBS); do \
	  if $(CONFORM)/bin/python -m pip install -c $(CONFORM)/constraints.txt $$lib \
	      > $(CONFORM)/install-$$lib.log 2>&1; then echo "conform: installed $$lib"; \
	  else echo "conform: $$lib did not install: $$(tail -n 1 $(CONFORM)/install-$$lib.log)"; fi; \
	done
	$(CONFORM)/bin/python -m pip list --format=freeze > $(CONFORM)/versions.txt
	touch $(CONFORM_STAMP)

.PHONY: conform-matrix conform-matrix-check
conform-matrix: $(CONFORM_STAMP)
	$(CONFORM)/bin/python examples/conform/run_matrix.py $(CONFORM_ARGS)

# CI (.ci/run): the same campaigns, case files in a temporary folder, compared with the committed
# examples/conform/matrix.json (verdicts and minimal counterexamples); writes nothing, fails on a
# difference (then `make conform-matrix` and commit the new matrix).
conform-matrix-check: $(CONFORM_STAMP)
	$(CONFORM)/bin/python examples/conform/run_matrix.py --check

# ruff (settings in pyproject.toml), then the checks ruff cannot make (tools/check_style.py: every
# Numba kernel takes fastmath from refimpl.config; setup.cfg lists every package; --strict adds
# notes on Numba options spelled inline), then byte-compile everything and import every module
# with warnings as errors. A separate CI step after `make test` (.ci/run); the fastmath and
# package checks also run inside `make test` (tests/test_style.py).
lint: install
	$(BIN)/ruff check .
	$(BIN)/python tools/check_style.py --strict --positional-caches
	$(BIN)/python -m compileall -q refimpl cli tests benchmarks examples tools
	$(BIN)/python -W error -c "import importlib, pkgutil, refimpl, refimpl.cli; [importlib.import_module(m.name) for p in (refimpl, refimpl.cli) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]"

# Build the sdist and the wheel, check their contents, install the wheel into a fresh venv in a
# temporary folder and run the installed `refimpl golden check/verify/show` there (about a
# minute and a half with a warm pip cache; tools/wheel_check.sh). Not part of `make test`.
wheel-check: install
	bash tools/wheel_check.sh $(BIN)/python

clean:
	rm -rf $(VENV) $(PEERS) $(CONFORM) build dist *.egg-info .hypothesis .pytest_cache .ruff_cache
	rm -rf $${TMPDIR:-/tmp}/refimpl-wheel-check.*
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name '*.nbi' -delete -o -name '*.nbc' -delete
