# syntax=docker/dockerfile:1
# mlkube images, built by scripts/build-images.sh (`make images`: buildah, or DOCKER=docker):
#   --target operator      mlkube/operator       '.[operator]': kopf, kubernetes client,
#                                                mlflow-skinny; no ray, torch or prefect
#   --target runtime       mlkube/runtime        '.[serve,train,mlflow-server]', scikit-learn
#                                                only (no torch): RayJob head/workers (the
#                                                train flow), the chart's MLflow server
#                                                (PostgreSQL, S3), KServe predictors
#                                                (python -m mlkube.model_servers)
#   --target runtime-full  mlkube/runtime-full   runtime + CPU-only torch (the torch extra) from
#                                                PyTorch's CPU index (--build-arg TORCH_INDEX_URL)
# All run as uid/gid 10001 and work with a read-only root filesystem (HOME=/tmp).
#
# Layers: dependencies are installed from pyproject.toml alone, mlkube itself (--no-deps)
# in a later layer, so a source change reinstalls only mlkube and downloads no dependency.
# PYTHON_IMAGE: any Debian-based image with `python` 3.11 and the venv module; the default
# is Docker Hub's, the build script here passes a locally debootstrapped one.

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
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    # There is no git in the images: MLflow then logs no commit, without GitPython's warning.
    GIT_PYTHON_REFRESH=quiet
RUN groupadd --gid 10001 mlkube \
 && useradd --uid 10001 --gid 10001 --home-dir /home/mlkube --create-home \
      --shell /usr/sbin/nologin mlkube

# uv resolves and installs in seconds where pip takes minutes; it stays out of the images.
FROM base AS uv
ARG UV_VERSION=0.13.8
# pip and uv trust the system's CA store (not their bundled ones), so that a proxy's CA
# added to it is trusted too.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python -m venv /opt/uv && /opt/uv/bin/pip install "uv==${UV_VERSION}"
ENV PATH=/opt/uv/bin:$PATH \
    # The cache is a build cache mount, on another filesystem than the venv.
    UV_LINK_MODE=copy \
    # Compiled now: with a read-only root filesystem nothing could cache bytecode later.
    UV_COMPILE_BYTECODE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_PROGRESS=1
WORKDIR /src

# mlkube alone (--no-deps), into a prefix that the final stages lay over their venv.
FROM uv AS pkg
COPY pyproject.toml README.md ./
COPY mlkube ./mlkube
RUN --mount=type=cache,id=mlkube-uv,target=/root/.cache/uv,sharing=locked \
    python -m venv --without-pip /opt/mlkube \
 && uv pip install --python /opt/mlkube/bin/python --no-deps --prefix /opt/pkg . \
 && rm -f /opt/pkg/.lock

# --------------------------------------------------------------------------- operator
FROM uv AS operator-deps
COPY pyproject.toml ./
RUN --mount=type=cache,id=mlkube-uv,target=/root/.cache/uv,sharing=locked \
    python -m venv /opt/mlkube \
 && uv pip install --python /opt/mlkube/bin/python -r pyproject.toml --extra operator

FROM base AS operator
COPY --from=operator-deps /opt/mlkube /opt/mlkube
COPY --from=pkg /opt/pkg/ /opt/mlkube/
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
# Checked as it runs, with a HOME that is thrown away (imports may write there).
# The operator image stays small: fail the build if a heavy dependency slipped in.
RUN export HOME="$(mktemp -d)" \
 && python -c "import importlib.util as u, sys; heavy = [m for m in ('ray', 'torch', 'prefect') if u.find_spec(m)]; sys.exit(f'operator image has {heavy}' if heavy else 0)" \
 && python -c "import mlkube.operator.handlers" \
 && rm -rf "$HOME"
# /healthz on 8081, /metrics on 9090 (MLKUBE_OPERATOR_HEALTH_PORT / _METRICS_PORT).
EXPOSE 8081 9090
CMD ["python", "-m", "mlkube.operator", "run"]

# --------------------------------------------------------------------------- runtime
FROM base AS runtime-base
# KubeRay's injected probes call wget on the Ray head and workers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# Ray's dashboard probes cloud metadata addresses (169.254.169.254, metadata.google.internal)
# at every start unless ~/ray_bootstrap_config.yaml exists, whatever the usage-stats setting
# (seen from a KubeRay head pod on the test node). HOME is /tmp in these images.
RUN printf '{}\n' > /tmp/ray_bootstrap_config.yaml && chmod 0644 /tmp/ray_bootstrap_config.yaml

FROM uv AS runtime-deps
COPY pyproject.toml ./
RUN --mount=type=cache,id=mlkube-uv,target=/root/.cache/uv,sharing=locked \
    python -m venv /opt/mlkube \
 && uv pip install --python /opt/mlkube/bin/python -r pyproject.toml --extra serve --extra train \
      --extra mlflow-server

# runtime-deps plus CPU-only torch. The CPU index is an extra index, which uv asks first:
# torch==X is then met by X+cpu from there, and PyPI's CUDA build is never fetched.
FROM runtime-deps AS runtime-full-deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,id=mlkube-uv,target=/root/.cache/uv,sharing=locked \
    uv pip install --python /opt/mlkube/bin/python --extra-index-url "$TORCH_INDEX_URL" \
      -r pyproject.toml --extra torch

FROM runtime-base AS runtime-full
COPY --from=runtime-full-deps /opt/mlkube /opt/mlkube
COPY --from=pkg /opt/pkg/ /opt/mlkube/
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
RUN export HOME="$(mktemp -d)" \
 && python -c "import torch, sys; print('torch', torch.__version__); sys.exit('runtime-full has a CUDA torch' if torch.version.cuda else 0)" \
 && python -c "import mlkube.model_servers, mlkube.flows.train, mlkube.cli, ray, kserve" \
 && rm -rf "$HOME"
EXPOSE 8080
CMD ["python", "-m", "mlkube.model_servers", "--help"]

# The default target: no torch, the tabular tasks and the predictors only need scikit-learn.
FROM runtime-base AS runtime
COPY --from=runtime-deps /opt/mlkube /opt/mlkube
COPY --from=pkg /opt/pkg/ /opt/mlkube/
USER 10001:10001
ENV HOME=/tmp
WORKDIR /tmp
RUN export HOME="$(mktemp -d)" \
 && python -c "import importlib.util as u, sys; sys.exit('runtime image has torch' if u.find_spec('torch') else 0)" \
 && python -c "import mlkube.model_servers, mlkube.flows.train, mlkube.cli, ray, kserve" \
 && rm -rf "$HOME"
# Predictor HTTP port (KServe); Ray's ports are opened by `ray start` (KubeRay).
EXPOSE 8080
CMD ["python", "-m", "mlkube.model_servers", "--help"]
