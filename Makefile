# make demo · make test — each creates .venv and installs the locked set of tested versions (constraints.txt).
# On a machine without a GPU, torch==2.13.0 is installed first (a CPU build); override with `make TORCH=torch`.
# make lock: refresh constraints.txt from the newest versions (written only if the suite passes on them).
# make test-latest: the suite on the newest versions in a scratch venv; reports what moved and broke, never gates.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
LOCK := constraints.txt
INSTALL := $(PY) -m pip install -q -c $(LOCK)
STAMP := $(VENV)/.installed
FULL ?=
JOBS ?= 2  # pytest-xdist workers: the tests run one thread each

.PHONY: demo test test-slurm install lock test-latest clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip setuptools
	$(INSTALL) "$(TORCH)"
	$(INSTALL) --build-constraint $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py --out demo_out $(if $(FULL),--full)

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal  # idle workers take queued tests: no long tail on one

# root only: installs Debian's slurm-wlm and munge, runs slurmctld + two slurmd here (tests/slurm/cluster.sh)
test-slurm: $(STAMP)
	DIFFTUNE_SLURM_TESTS=1 $(PY) -m pytest -q -p no:xdist tests/test_slurm.py

lock:
	$(PYTHON) tools/deps.py lock --torch "$(TORCH)"

test-latest:
	$(PYTHON) tools/deps.py drift --torch "$(TORCH)"

clean:
	rm -rf demo_out .cache/difftune .cache/deps
