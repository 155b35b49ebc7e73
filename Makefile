# The two commands of the README:
#   make demo  -> install what is missing, then the main job: dense vs TT DLRM, export, serve, query, summary
#   make test  -> install what is missing, then ruff and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test lint bench

install:
	@bash scripts/install.sh

demo: install
	$(PY) -m pipelines --out runs/demo

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	RECSYS_DATA_DIR=$${RECSYS_DATA_DIR:-$(DATA_DIR)} $(PY) -m pytest -q -ra

bench: install
	RECSYS_DATA_DIR=$${RECSYS_DATA_DIR:-$(DATA_DIR)} $(PY) -m bench.preprocess_throughput
	$(PY) -m bench.train_throughput
