# Fresh machine: `make repro` runs the pipeline, `make test` the tests; both create .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
# The env is rebuilt only when the lock or the package metadata change.
STAMP   := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test test-fast test-long lint bench mutate clean-env

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

repro: install
	dvc repro

# The suite in three tiers (README: Tests; budgets and per-test limits in tests/conftest.py):
# `make test` everything but `long` (15 minutes on 2 cores), `make test-fast` no server, cluster,
# browser or DVC pipeline (3 minutes), `make test-long` what needs minutes by nature (10 minutes).
# Each prints its 20 slowest tests and its time against its budget.
# One xdist worker per core, a test file's tests on one worker (1.9x faster on 2 cores, measured
# on test-fast); PYTEST_ARGS adds options (`make test PYTEST_ARGS='-n 0 -x'`: one process, stop at
# the first failure).
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST) -m "not long" $(PYTEST_ARGS)

test-fast: install
	$(PYTEST) -m "not slow and not long" $(PYTEST_ARGS)

# pytest's exit 5 is "no test collected": the tier may be empty.
test-long: install
	$(PYTEST) -m long $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/data.py
	$(PY) benchmarks/train_step.py

# Mutation testing of the core (not part of `make test`; hours on 2 cores for all of it):
# `make mutate MODULE=losses` for one module (losses, prepared_data, checkpoint, config, model,
# training_state), or
# `make mutate MUTANTS='cyclegan.model.x_lr_factor*'` for mutants by name (globs), then
# `.venv/bin/mutmut show <name>` for a survivor. Config: [tool.mutmut] in pyproject.toml.
mutate: install
	# One torch thread per mutant worker: JOBS workers share the cores, not JOBS x cores threads.
	OMP_NUM_THREADS=1 PATH=$(VENV)/bin:$$PATH $(VENV)/bin/mutmut run --max-children $(or $(JOBS),2) $(if $(MODULE),"cyclegan.$(MODULE).*") $(MUTANTS)
	$(VENV)/bin/mutmut results

clean-env:
	rm -rf $(VENV)
