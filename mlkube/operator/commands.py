"""`mlkube operator ...`: run the operator, or render the children it would create."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from mlkube.api import UserError
from mlkube.api.modeldeployment import ModelDeployment


def add_operator_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `operator` (with `run` and `render`) to an argparse subparsers object.

    Each leaf sets `handler`: `args.handler(args)` returns an exit code or raises
    mlkube.api.CommandFailed.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator (TrainingRun -> RayJob, ModelDeployment -> KServe)",
        description="The mlkube Kubernetes operator.",
    )
    actions = parser.add_subparsers(dest="operator_command", metavar="{run,render}")

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(handler=usage)

    run = actions.add_parser(
        "run",
        help="watch TrainingRuns and ModelDeployments (standalone kopf; /healthz, /metrics)",
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], dest="namespaces",
        help="namespace to watch (repeatable; default: MLKUBE_OPERATOR_NAMESPACES or all)",
    )  # fmt: skip
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    run.add_argument("--log-format", choices=["plain", "full", "json"], default=None)
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=run_command)

    render = actions.add_parser(
        "render", help="print the RayJob or InferenceService the operator would create"
    )
    render.add_argument("-f", "--filename", required=True, help="TrainingRun/ModelDeployment YAML")
    render.add_argument(
        "--model-version", type=int, default=None,
        help="for a ModelDeployment following an alias: the version it resolves to",
    )  # fmt: skip
    render.set_defaults(handler=render_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    from mlkube.operator.process import run_operator

    namespaces = [] if args.all_namespaces else args.namespaces
    run_operator(namespaces=namespaces or None, log_format=args.log_format, verbose=args.verbose)
    return 0


def render_command(args: argparse.Namespace) -> int:
    from mlkube.api import TrainingRun
    from mlkube.api.manifest import parse_resource, read_documents
    from mlkube.operator.inferenceservice import inferenceservice_for
    from mlkube.operator.rayjob import rayjob_for
    from mlkube.operator.settings import get_settings

    settings = get_settings()
    resources = [parse_resource(d, args.filename) for d in read_documents(args.filename)]
    rendered = []
    for resource in resources:
        if resource.metadata.namespace is None:
            resource.metadata.namespace = "default"
        if isinstance(resource, TrainingRun):
            rendered.append(rayjob_for(resource, settings))
        elif isinstance(resource, ModelDeployment):
            pinned = render_versions(resource, args.model_version, args.filename)
            canary = resource.spec.canary
            rendered.append(
                inferenceservice_for(
                    resource,
                    pinned,
                    settings,
                    tracking_uri=resource.spec.mlflow.tracking_uri_or(settings.mlflow_tracking_uri),
                    canary_traffic_percent=canary.traffic_percent if canary else None,
                    deployment_mode=settings.kserve_deployment_mode,
                )
            )
    print(yaml.safe_dump_all(rendered, sort_keys=False, width=100), end="")
    return 0


def render_versions(
    deployment: ModelDeployment, given: int | None, filename: str
) -> int | dict[str, int]:
    """The version(s) `operator render` pins: each model's own pin, else --model-version
    for a model that follows an alias (the operator would ask MLflow); {} for anyModel."""
    pinned: dict[str, int] = {}
    for selector in deployment.spec.selectors:
        version = selector.version or given
        if version is None:
            which = "" if deployment.spec.model is not None else f" of {selector.name}"
            raise UserError(
                f"{filename}: {deployment.metadata.name} follows an alias{which}; "
                "give --model-version"
            )
        pinned[selector.name] = version
    if deployment.spec.model is not None:
        return pinned[deployment.spec.model.name]
    return pinned


def module_argv(given: Sequence[str] | None = None) -> list[str]:
    """`python -m mlkube.operator ARGS` as the `mlkube` arguments it stands for:
    `operator ARGS`, where ARGS alone or with only options mean `run ARGS`."""
    given = list(sys.argv[1:] if given is None else given)
    named = given[:1] in (["run"], ["render"], ["-h"], ["--help"])
    return ["operator", *(given if named else ["run", *given])]
