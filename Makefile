# Set-up and the two entry points: `make quickstart` runs the main job, `make test` passes the tests.
# Both create .venv on first use. Where no NVIDIA GPU is present, the CPU build of torch is
# installed first, so that pip does not pull a multi-GB CUDA build (TORCH_PIP_ARGS can point
# pip at another index, e.g. --index-url https://download.pytorch.org/whl/cpu).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# pip's errors only: its warnings about a machine's own pip configuration are not the run's
PIP_ARGS ?= --quiet --quiet --disable-pip-version-check

.PHONY: setup quickstart test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): torch, then llm-dist and its dependencies (a few minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install $(PIP_ARGS) $(TORCH_PIP_ARGS) "$(TORCH)"; fi
	@$(BIN)/pip install $(PIP_ARGS) -e ".[dev]"
	@touch $@

quickstart: setup
	$(BIN)/llm-dist data stdlib data/
	$(BIN)/llm-dist run jobs/quickstart.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

test-fast:
	$(MAKE) test PYTEST_ARGS='-m "not slow"'

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
