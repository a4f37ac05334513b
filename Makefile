# Set-up bootstraps .venv on a Python >= 3.12 (PATH first, then pyenv versions).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Prefer 3.12 (the accelerator image's version), then any newer one.
find_python = $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3 2>/dev/null | sort -V -r) \
  python3.13 python3 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V -r); do \
  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then command -v $$p; break; fi; done)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@PYBIN="$(find_python)"; \
	if [ -z "$$PYBIN" ]; then echo "error: no Python >= 3.12 found on PATH or in pyenv; install one (e.g. 'pyenv install 3.12')" >&2; exit 1; fi; \
	echo "using $$PYBIN"; \
	[ -x $(PY) ] || $$PYBIN -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q -e '.[dev,video]' && touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vidlm demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/vidlm bench attention

clean:
	rm -rf $(VENV) runs
