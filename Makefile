# Set-up and the two user-facing jobs. `make report` and `make test` each create .venv when it is missing, and install
# exactly requirements/lock.txt: every package at the version the test suite last passed on.
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements/lock.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MALLOC := MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000
REPORT ?= reports/default
PIP_TOOLS := pip-tools==7.7.0

.PHONY: install test test-fast test-latest test-oldest lock report bench grid lint clean corpus docs docs-check

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) torch -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(MALLOC) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-latest: $(STAMP)  # the canary: the compatibility subset on the newest releases, no lock, upper bounds lifted
	$(MALLOC) $(BIN)/python tools/canary.py --venv .venv-latest

test-oldest: $(STAMP)  # the compatibility subset on every range's floor
	$(MALLOC) $(BIN)/python tools/canary.py --venv .venv-oldest --oldest

lock:  # maintainer: re-resolve requirements/lock.txt from pyproject.toml and requirements/lock.in, then make test
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install --quiet "$(PIP_TOOLS)")
	.venv-tools/bin/pip-compile --quiet --upgrade --extra dev --extra docs --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --no-emit-trusted-host --output-file $(LOCK) pyproject.toml requirements/lock.in
	sed -i "1i # Locked on $$(date -u +%F) with Python $$($(PYTHON) -c 'import platform; print(platform.python_version())') by make lock." $(LOCK)

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
	$(BIN)/python benchmarks/bench_refusal.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_streamed.py  # writes about 11 GB under /tmp
	$(BIN)/python benchmarks/bench_streamed_estimate.py  # the same checkpoint, every probe of 48 layers (~30 min)

grid: $(STAMP)  # the pruning grid on both shipped models (about 30 min on 2 cores; resumes)
	$(MALLOC) $(BIN)/sensitivity grid --out benchmarks/results/grid

docs: $(STAMP)  # the documentation site, built strictly (a warning fails) into site/: open site/index.html, no network
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-check: docs  # every page of site/ opened in headless Chromium (Debian's package): no broken link, image or script
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(BIN)/python tools/check_site.py site --shots index.html studies/paper.html reference/api/probes.html

lint: $(STAMP)
	$(BIN)/ruff check sensitivity tests benchmarks notebooks docs tools conftest.py

corpus: $(STAMP)  # maintainer: rebuild the built-in corpus from Debian packages (needs apt-get and dpkg-deb)
	$(BIN)/python -m sensitivity.data.build_corpus

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-tools build *.egg-info site site-screenshots
