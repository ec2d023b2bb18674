# The two commands a new user needs: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and installs everything pinned in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opdplus-installed

.PHONY: demo test test-all test-realweights test-fast test-repeat lint bench setup clean-cache

$(STAMP): pyproject.toml constraints.txt scripts/setup_env.sh scripts/check_env.py
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opdplus demo

# CI (.ci/run sets CI=true) runs every test but the realweights ones; locally `make test` also
# leaves out the `long` ones (over a minute each: the cluster, browser and results-table runs and
# the SIGTERM-resume run, the episode chaos and sampler runs, the two-teacher run; CONTRIBUTING.md
# "How we test"), and `make test-all` runs what CI runs.
TEST_MARKS := $(if $(filter true 1,$(CI)),not realweights,not realweights and not long)
test: $(STAMP)
	$(PY) -m pytest tests -m "$(TEST_MARKS)"

test-all: $(STAMP)
	$(PY) -m pytest tests -m "not realweights"

test-realweights: $(STAMP)
	$(PY) -m pytest tests -m realweights

# The run-level tests N times in a row (flakiness check; CONTRIBUTING.md "How we test").
RUN_LEVEL := tests/test_resize.py tests/test_chaos.py tests/test_faults.py tests/test_resume_exact.py tests/test_inprocess.py tests/test_train_e2e.py tests/test_scheduler.py \
	tests/test_episodes_run.py tests/test_episodes_chaos.py
N ?= 10
test-repeat: $(STAMP)
	for i in $$(seq $(N)); do echo "== round $$i of $(N)"; $(PY) -m pytest $(RUN_LEVEL) -q || exit 1; done

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check rollout learner services models tests bench scripts
	$(VENV)/bin/ruff format --check rollout learner services models tests bench scripts

bench: $(STAMP)
	$(PY) bench/sampling.py
	$(PY) bench/smollm_sampling.py
	$(PY) bench/scoring.py
	$(PY) bench/weight_sync.py
	$(PY) bench/pipeline.py
	$(PY) bench/dispatch.py

clean-cache:
	rm -rf .cache
