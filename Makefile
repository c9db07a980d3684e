# make demo · make test — each creates .venv and installs what it needs.
# On a machine without a GPU, torch==2.13.0 is installed first (a CPU build); override with `make TORCH=torch`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf demo_out .cache/difftune
