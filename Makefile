# The README's two commands. Each creates .venv on first use and installs the
# project into it (CPU TensorFlow, the test and Ray extras); re-installs when
# the package metadata changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= build/demo

.PHONY: demo test test-fast clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[cpu,test,ray]'
	touch $(STAMP)

# Two pytest workers: most tests wait on subprocesses, so the two cores stay busy.
# Tests that start Ray or the 2-worker reference run share one worker (xdist_group).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# The tests not marked slow: the quick loop while editing (CI runs `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tools/demo.py --work_dir=$(DEMO_DIR)

clean:
	rm -rf $(VENV) build *.egg-info
