# dsv32: `make demo` (the main job) and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

install: $(STAMP)

# torch is pinned to the CPU wheel the CI machines carry offline; the package itself asks only torch>=2.6.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: install  # every stage on the tiny model (DSA recipe -> ... -> Speciale), then the report
	$(PY) -m dsv32 pipeline --preset tiny --out runs/pipeline-tiny
	@echo "make demo: report in runs/pipeline-tiny/report.md (report.json and PNG plots beside it)"

test: install
	$(PY) -m pytest -q

test-all: install  # also the slow tests (GPU tests need `-m gpu` on a CUDA machine)
	$(PY) -m pytest -q -m 'not gpu'

bench: install  # DSA against dense MLA and transformers, one attention layer: runs/bench/attention.{json,md,png}
	$(PY) -m dsv32 bench attention --out runs/bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
