# Set-up and the two user-facing jobs. `make report` and `make test` each create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MALLOC := MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000
REPORT ?= reports/default

.PHONY: install test test-fast report bench grid lint clean corpus

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(MALLOC) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

report: $(STAMP)  # the whole pipeline on the embedded default model (about 10 min on 2 cores; resumes)
	$(BIN)/sensitivity zoo list
	$(MALLOC) $(BIN)/sensitivity report --out $(REPORT)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scan.py
	$(BIN)/python benchmarks/bench_zoo.py
	$(BIN)/python benchmarks/bench_probes.py
	$(BIN)/python benchmarks/bench_estimate.py
	$(BIN)/python benchmarks/bench_prune.py
	$(BIN)/python benchmarks/bench_explain.py
	$(BIN)/python benchmarks/bench_agreement.py
	$(BIN)/python benchmarks/bench_load.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_streamed.py  # writes about 11 GB under /tmp

grid: $(STAMP)  # the pruning grid on both shipped models (about 30 min on 2 cores; resumes)
	$(MALLOC) $(BIN)/sensitivity grid --out benchmarks/results/grid

lint: $(STAMP)
	$(BIN)/ruff check sensitivity tests benchmarks notebooks

corpus: $(STAMP)  # maintainer: rebuild the built-in corpus from Debian packages (needs apt-get and dpkg-deb)
	$(BIN)/python -m sensitivity.data.build_corpus

clean:
	rm -rf $(VENV) build *.egg-info
