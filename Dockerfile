# syntax=docker/dockerfile:1
# mlkube images, built by scripts/build-images.sh:
#   --target operator  mlkube/operator  pip install '.[operator]': kopf, kubernetes client,
#                                       mlflow-skinny; no ray, torch or prefect
#   --target runtime   mlkube/runtime   pip install '.[serve,train]' with CPU-only torch:
#                                       RayJob head/workers (the train flow) and KServe
#                                       predictors (python -m mlkube.model_servers)
# Both run as uid/gid 10001 and work with a read-only root filesystem (HOME=/tmp).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/mlkube \
    PATH=/opt/mlkube/bin:$PATH \
    # The stack must not phone home (same switches as mlkube.local.OFFLINE_ENV).
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
RUN groupadd --gid 10001 mlkube \
 && useradd --uid 10001 --gid 10001 --home-dir /home/mlkube --create-home \
      --shell /usr/sbin/nologin mlkube

# The package source, only what a build needs (see .dockerignore).
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlkube ./mlkube

# --------------------------------------------------------------------------- operator
FROM source AS operator-build
RUN python -m venv "$VIRTUAL_ENV" \
 && pip install '.[operator]' \
 # The operator image stays small: fail the build if a heavy dependency slipped in.
 && python -c "import importlib.util as u, sys; heavy = [m for m in ('ray', 'torch', 'prefect') if u.find_spec(m)]; sys.exit(f'operator image has {heavy}' if heavy else 0)" \
 && python -c "import mlkube.operator.handlers"

FROM base AS operator
COPY --from=operator-build /opt/mlkube /opt/mlkube
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
# /healthz on 8081, /metrics on 9090 (MLKUBE_OPERATOR_HEALTH_PORT / _METRICS_PORT).
EXPOSE 8081 9090
CMD ["python", "-m", "mlkube.operator", "run"]

# --------------------------------------------------------------------------- runtime
FROM source AS runtime-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# CPU-only torch first, from PyTorch's CPU index; the extras' `torch==X` is then satisfied
# by `X+cpu` and pip does not fetch the CUDA build.
RUN python -m venv "$VIRTUAL_ENV" \
 && TORCH=$(python -c "import re, pathlib; print(re.search(r'\"(torch==[^\"]+)\"', pathlib.Path('pyproject.toml').read_text()).group(1))") \
 && pip install --index-url "$TORCH_INDEX_URL" "$TORCH" \
 && pip install '.[serve,train]' \
 && python -c "import torch; print('torch', torch.__version__)" \
 && python -c "import mlkube.model_servers, mlkube.flows.train, ray, kserve"

FROM base AS runtime
# KubeRay's injected probes call wget on the Ray head and workers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
COPY --from=runtime-build /opt/mlkube /opt/mlkube
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
# Predictor HTTP port (KServe); Ray's ports are opened by `ray start` (KubeRay).
EXPOSE 8080
CMD ["python", "-m", "mlkube.model_servers", "--help"]
