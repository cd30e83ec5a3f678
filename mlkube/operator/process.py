"""The operator as a process: standalone kopf with the handlers registered, /healthz on
MLKUBE_OPERATOR_HEALTH_PORT and Prometheus /metrics on MLKUBE_OPERATOR_METRICS_PORT."""

from __future__ import annotations

import logging


def run_operator(
    namespaces: list[str] | None = None,
    log_format: str | None = None,
    verbose: bool = False,
) -> None:
    import kopf

    from mlkube.operator.metrics import serve_metrics
    from mlkube.operator.settings import get_settings

    settings = get_settings()
    watched = settings.namespaces if namespaces is None else namespaces
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat[(log_format or settings.log_format).upper()],
    )
    if not verbose:
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
    import mlkube.operator.handlers  # noqa: F401  (registers the handlers)

    serve_metrics(settings.metrics_port)
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    # Standalone: no peering CRDs needed, and one replica is the deployment model.
    kopf.run(
        standalone=True,
        clusterwide=not watched,
        namespaces=watched,
        liveness_endpoint=liveness,
    )
