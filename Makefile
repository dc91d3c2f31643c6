# petdet — every target sets itself up: a .venv with the pinned installs, then the work.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
UV_VERSION := 0.13.9
DEMO_DIR ?= $(CURDIR)/.demo
# pytest-xdist processes for `make test`, each with its own SeaweedFS, Airflow DB and temp dir;
# see tests/conftest.py for how tests are grouped and ordered across them. Three on this
# project's 2-core machines: with two, the cores sat idle ~15% of the run (tests waiting on S3,
# Airflow, servers, polls); a third fills most of that (user+sys CPU over 2 x wall: 94%
# against 84%; pytest 16m57s against 18m25s, the same code on the same day)
TEST_WORKERS ?= 3

export AIRFLOW__CORE__LOAD_EXAMPLES := False
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help venv test lint demo demo-clean lock clean

help:
	@echo "make demo   - run the pipeline end to end on a generated sample (local storage, offline)"
	@echo "make test   - run the whole test suite (starts its own SeaweedFS and metadata DB)"
	@echo "make lint   - ruff + hadolint"
	@echo "make lock   - re-resolve requirements*.in (and the GPU image's) into pinned *.txt"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt -r requirements-dev.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint docker/*.Dockerfile

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --workdir $(DEMO_DIR) $(DEMO_ARGS)

demo-clean:
	rm -rf $(DEMO_DIR)

lock: $(STAMP)
	$(BIN)/uv pip compile --python-version 3.11 --no-header requirements.in -o requirements.txt
	$(BIN)/uv pip compile --python-version 3.11 --no-header requirements-dev.in -c requirements.txt -o requirements-dev.txt
	$(BIN)/uv pip compile --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --no-header docker/requirements-gpu-worker.in -c requirements.txt -o docker/requirements-gpu-worker.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
