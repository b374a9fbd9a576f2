# The two commands of the README:  `make demo`  and  `make test`.
# Everything a command needs is installed here, from the project's own files.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing neuroflow-dagster and its tools into $(VENV) (log: $(VENV)/pip.log)"
	@$(VENV)/bin/pip install -e '.[test]' > $(VENV)/pip.log 2>&1 || (tail -30 $(VENV)/pip.log; exit 1)
	@touch $(STAMP)

install: $(STAMP)

## Run the embedded default end to end on real DICOM, with the Dagster UI on http://127.0.0.1:3000
demo: $(STAMP)
	$(VENV)/bin/neuroflow demo --dir demo

## The whole test suite (what .ci/run calls)
test: $(STAMP)
	@bash scripts/system-deps.sh
	$(VENV)/bin/ruff check neuroflow_dagster neuroflow_dagster_tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

## ruff, and the import contracts of setup.cfg (the layers of docs/architecture.md)
lint: $(STAMP)
	$(VENV)/bin/ruff check neuroflow_dagster neuroflow_dagster_tests benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/discovery_tick.py

clean:
	rm -rf $(VENV) demo .pytest_cache
