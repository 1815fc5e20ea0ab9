# The README's commands. Each target does its own set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
ENGINE ?= embedded

# The real OPA, built from source once and kept in the checkout (.tools/, ignored
# by git): the `opa` engine's tests, the conformance corpus and `make demo
# ENGINE=opa` run it. Tests find it through REGATE_OPA.
OPA_VERSION := 1.22.4
TOOLS := $(CURDIR)/.tools
OPA := .tools/bin/opa
REGATE_OPA ?= $(CURDIR)/$(OPA)
export REGATE_OPA

.PHONY: demo test bench fuzz venv opa clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { \
	  echo "python3 venv module missing: installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	@# The real OPA engine (Go, c-shared) is the test oracle; it declares
	@# Python >= 3.14 but runs on 3.11 (see README.md, "Using OPA").
	$(BIN)/pip install -q --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4
	@touch $(STAMP)

venv: $(STAMP)

# Reuses the binary when it is there at the right version (a 20 ms check), or
# REGATE_OPA when that names another executable; otherwise `go install` with GOPATH, GOBIN and GOCACHE inside .tools/
# (-modcacherw, so that rm -rf / make clean can remove the module cache).
opa:
	@if [ "$(REGATE_OPA)" != "$(CURDIR)/$(OPA)" ] && [ -x "$(REGATE_OPA)" ]; then :; \
	elif [ -x $(OPA) ] && $(OPA) version 2>/dev/null | grep -qx 'Version: $(OPA_VERSION)'; then :; else \
	  command -v go >/dev/null 2>&1 || { echo "make: Go is not installed: it is needed once, to build the real OPA" \
	    "v$(OPA_VERSION) into $(OPA) (install Go from https://go.dev/dl/ or your distribution's golang package)"; \
	    exit 1; }; \
	  echo "building OPA v$(OPA_VERSION) from source into $(OPA) (once; a few minutes)"; \
	  GOPATH=$(TOOLS)/go GOBIN=$(TOOLS)/bin GOCACHE=$(TOOLS)/go/cache GOFLAGS=-modcacherw \
	    go install github.com/open-policy-agent/opa@v$(OPA_VERSION) || exit 1; \
	fi

# The OPA build only when the demo asks OPA (ENGINE=opa).
demo: $(STAMP) $(if $(filter opa,$(ENGINE)),opa)
	ENGINE=$(ENGINE) $(BIN)/python examples/demo.py $(ARGS)

test: $(STAMP) opa
	@sh scripts/ensure-debs.sh redis-server:redis-server wrk:wrk nginx:nginx chromium:chromium
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	@sh scripts/ensure-debs.sh wrk:wrk nginx:nginx
	$(BIN)/python -m benchmarks $(if $(QUICK),--quick,) $(ARGS)

# The committed screenshots (docs/overview.png, docs/approval-inbox.png): the browser
# tests write them here only when asked; `make test` writes to build/screenshots/.
.PHONY: screenshots
screenshots: $(STAMP)
	@sh scripts/ensure-debs.sh chromium:chromium
	REGATE_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_observability_browser.py tests/test_approvals_browser.py $(ARGS)

# Longer, randomised fuzzing (fuzz targets and the hostile-request differential);
# every input that breaks a target joins tests/fuzz/corpus/.
fuzz: $(STAMP)
	REGATE_FUZZ_EXAMPLES=$${REGATE_FUZZ_EXAMPLES:-10000} REGATE_FUZZ_SAVE=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
	  -o timeout=0 tests/fuzz tests/security/test_differential.py $(ARGS)

clean:
	rm -rf $(VENV) audit build *.egg-info .tools

# ---- deployment: the lock, Helm, generated docs and manifests --------------------
# Helm v4, built from the Go module proxy once into .tools/bin like OPA; the
# deploy tests render the chart with it (tests/test_deploy_helm.py, via REGATE_HELM).
HELM_VERSION := 4.3.2
HELM := .tools/bin/helm
REGATE_HELM ?= $(CURDIR)/$(HELM)
export REGATE_HELM
UV_VERSION := 0.13.8

.PHONY: helm lock docs manifests generate

test: helm

helm:
	@if [ "$(REGATE_HELM)" != "$(CURDIR)/$(HELM)" ] && [ -x "$(REGATE_HELM)" ]; then :; \
	elif [ -x $(HELM) ] && { ! command -v go >/dev/null 2>&1 || \
	    go version -m $(HELM) | grep -Eq '^[[:space:]]+mod[[:space:]]+helm.sh/helm/v4[[:space:]]+v$(HELM_VERSION)([[:space:]]|$$)'; }; then :; else \
	  command -v go >/dev/null 2>&1 || { echo "make: Go is not installed: it is needed once, to build Helm" \
	    "v$(HELM_VERSION) into $(HELM) (install Go from https://go.dev/dl/ or your distribution's golang package)"; \
	    exit 1; }; \
	  echo "building Helm v$(HELM_VERSION) from source into $(HELM) (once; a few minutes)"; \
	  GOPATH=$(TOOLS)/go GOBIN=$(TOOLS)/bin GOCACHE=$(TOOLS)/go/cache GOFLAGS=-modcacherw \
	    go install helm.sh/helm/v4/cmd/helm@v$(HELM_VERSION) || exit 1; \
	fi

# The locked, hashed runtime dependencies the container installs (pip
# --require-hashes); the ranges stay in pyproject.toml. Run after changing them.
lock: $(STAMP)
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	  --custom-compile-command 'make lock' -q -o requirements.lock

# Generated files, checked for staleness by tests/test_docs.py and tests/test_deploy_helm.py.
docs: $(STAMP)
	$(BIN)/regate config reference > docs/configuration.md

manifests: $(STAMP) helm
	$(BIN)/python deploy/render.py

generate: docs manifests
