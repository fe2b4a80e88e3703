# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-slow lint

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(VENV)/.installed

demo: setup  ## run the whole pipeline on the built-in synthetic benchmark
	dvc repro

test: setup  ## fast unit tier, then the slow tier (end-to-end, multi-process, kill tests)
	DRET_TRACKING=off $(PY) -m pytest -q -m "not slow" -p no:cacheprovider
	DRET_TRACKING=off $(PY) -m pytest -q -m slow -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check pipeline stages tests benchmarks
