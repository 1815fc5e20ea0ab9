# The README's commands. Each target does its own set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test bench fuzz venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { \
	  echo "python3 venv module missing: installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	@# The real OPA engine (Go, c-shared) is the test oracle; it declares
	@# Python >= 3.14 but runs on 3.11 (see DESIGN.md).
	$(BIN)/pip install -q --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(ARGS)

test: $(STAMP)
	@sh scripts/ensure-debs.sh redis-server:redis-server wrk:wrk nginx:nginx chromium:chromium
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	@sh scripts/ensure-debs.sh wrk:wrk nginx:nginx
	$(BIN)/python -m benchmarks $(if $(QUICK),--quick,) $(ARGS)

# Longer, randomised fuzzing (fuzz targets and the hostile-request differential);
# every input that breaks a target joins tests/fuzz/corpus/.
fuzz: $(STAMP)
	REGATE_FUZZ_EXAMPLES=$${REGATE_FUZZ_EXAMPLES:-10000} REGATE_FUZZ_SAVE=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
	  -o timeout=0 tests/fuzz tests/security/test_differential.py $(ARGS)

clean:
	rm -rf $(VENV) audit build *.egg-info
