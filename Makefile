# Two commands matter: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8

.PHONY: venv demo test test-cluster lint crds images k8s-binaries node-deps clean-venv

venv: $(VENV)/.installed

# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on the CI
# machines), every Python process would otherwise compile ray, mlflow and the rest from
# source on each start (`import mlflow` 4.7 s instead of 1.7 s here).
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode -e '.[dev]'
	@touch $@

# Builds the test cluster's binaries from Go modules (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy, etcd, helm, CoreDNS, the KubeRay operator, the KServe
# controller) into ~/.cache/mlkube/k8s-<version>/ once; later calls return at once.
k8s-binaries:
	@bash tests/cluster/build.sh

# Debian packages the real test node runs on (containerd, runc, CNI plugins, nftables).
node-deps:
	@bash tests/cluster/node-deps.sh

# DEMO_TRIALS: the search's size (the test of this target uses fewer).
DEMO_TRIALS ?= 8
demo: venv
	$(VENV)/bin/mlkube demo --trials $(DEMO_TRIALS)

# Everything: the real-node lane starts first and runs in the background; lint, then unit,
# integration and the control-plane e2e tests run beside it (tests/run-lanes.sh).
test: venv k8s-binaries node-deps images
	$(PY) -m tests.cluster.node clean
	@bash tests/run-lanes.sh --first "$(MAKE) --no-print-directory lint" $(PY)

# The real-node lane alone (tests/node), from nothing built to torn down.
test-cluster: venv k8s-binaries node-deps images
	$(PY) -m tests.cluster.node clean
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests/node

# ruff, mypy --strict (pyproject.toml [tool.mypy]) and the import contracts ([tool.importlinter]).
lint: venv
	$(VENV)/bin/ruff check mlkube tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

# The chart ships the same CRDs; tests fail when either copy drifts from the models.
crds: venv
	$(VENV)/bin/mlkube crds --output crds/
	cp crds/*.yaml charts/mlkube/crds/

# Operator and runtime images with buildah (installed by the script, no daemon), left as
# docker-archive tarballs under ~/.cache/mlkube/images (current.json lists them);
# an unchanged tree returns at once. DOCKER=docker builds with Docker instead.
images:
	@bash scripts/build-images.sh

clean-venv:
	rm -rf $(VENV)
