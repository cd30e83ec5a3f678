# Two commands matter: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8

.PHONY: venv demo test lint crds images k8s-binaries clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(PY) -e '.[dev]'
	@touch $@

# Builds kube-apiserver, kube-controller-manager, etcd and helm from Go modules
# into ~/.cache/mlkube/k8s-<version>/ once; later calls return at once.
k8s-binaries:
	@bash tests/cluster/build.sh

demo: venv
	$(VENV)/bin/mlkube demo

test: venv k8s-binaries
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: venv
	$(VENV)/bin/ruff check mlkube tests benchmarks
	$(VENV)/bin/mypy

# The chart ships the same CRDs; tests fail when either copy drifts from the models.
crds: venv
	$(VENV)/bin/mlkube crds --output crds/
	cp crds/*.yaml charts/mlkube/crds/

# Operator and runtime images; needs a Docker engine (there is none on the dev machines).
images:
	@bash scripts/build-images.sh

clean-venv:
	rm -rf $(VENV)
