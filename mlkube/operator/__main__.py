"""`python -m mlkube.operator`: the operator as a process (standalone kopf, /healthz on
MLKUBE_OPERATOR_HEALTH_PORT, Prometheus /metrics on MLKUBE_OPERATOR_METRICS_PORT)."""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    from mlkube.operator.commands import add_operator_parser

    # Usage lines read `mlkube operator run ...`, the same command through the CLI.
    parser = argparse.ArgumentParser(prog="mlkube")
    add_operator_parser(parser.add_subparsers())
    args = parser.parse_args(["operator", *(argv if argv is not None else _argv())])
    return int(args.handler(args))


def _argv() -> list[str]:
    import sys

    given = sys.argv[1:]
    # `python -m mlkube.operator` alone, or with only options, means `run`.
    return given if given[:1] in (["run"], ["render"], ["-h"], ["--help"]) else ["run", *given]


if __name__ == "__main__":
    raise SystemExit(main())
