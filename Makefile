# The two commands a newcomer types: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vaelab-installed
DOCS_STAMP := $(VENV)/.vaelab-docs-installed
DEMO := demo

# A second environment with the oldest versions pyproject.toml allows, to prove its floors.
MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.vaelab-installed
MIN_VERSIONS := .ci/minimum-versions.txt

.PHONY: demo test test-min test-slow docs lint format bench clean

# The CPU wheel of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The ONNX round trips (slow tests) need the export extra; make test stays without it.
EXPORT_STAMP := $(VENV)/.vaelab-export-installed
$(EXPORT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,export]'
	touch $(EXPORT_STAMP)

# The site's tools (the docs extra) beside dev, in the same .venv; torch's CPU wheel first, as above.
$(DOCS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,docs]'
	touch $(DOCS_STAMP)

# Wheels only: an old release without a Python 3.11 wheel must fail here, not build from source.
$(MIN_STAMP): pyproject.toml $(MIN_VERSIONS)
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install --quiet torch==2.13.0
	$(MIN_PY) -m pip install --quiet --only-binary :all: -r $(MIN_VERSIONS)
	$(MIN_PY) -m pip install --quiet --no-deps -e .
	touch $(MIN_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest

# The fast suite against the floors (.ci/minimum-versions.txt); the browser test skips there.
# The old hypothesis keeps its own example database: it should not replay the new one's.
test-min: $(MIN_STAMP)
	OMP_NUM_THREADS=1 HYPOTHESIS_STORAGE_DIRECTORY=$(MIN_VENV)/hypothesis \
		$(MIN_PY) -m pytest -q -x -p no:cacheprovider

test-slow: $(EXPORT_STAMP)
	$(PY) -m pytest -m slow

# The site in site/ (site/index.html), strict: a broken link, an unresolved reference or a failing
# tutorial cell fails the build. The tutorials run here, on the CPU (a few minutes in all).
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench examples
	$(VENV)/bin/ruff format src tests bench examples

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(MIN_VENV) $(DEMO) site .pytest_cache .mypy_cache .ruff_cache
