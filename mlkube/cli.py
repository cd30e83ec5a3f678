"""`mlkube`: train, serve and inspect on one machine; generate CRDs; run the operator."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mlkube.api import CommandFailed

Command = Callable[[argparse.Namespace], int]


def cmd_crds(args: argparse.Namespace) -> int:
    from mlkube.api.crd import render_crds, write_crds

    out = Path(args.output)
    if args.check:
        stale = [
            name
            for name, text in render_crds().items()
            if not (out / name).exists() or (out / name).read_text() != text
        ]
        if stale:
            raise CommandFailed(f"{out}: out of date: {', '.join(stale)} (run `mlkube crds`)")
        print(f"{out}: up to date")
        return 0
    for path in write_crds(out):
        print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mlkube.api import TrainingRun, load_manifest

    run = load_manifest(Path(args.file), TrainingRun)
    if args.dataset:
        run.spec.dataset.uri = args.dataset
    if args.tracking_uri:
        run.spec.mlflow.tracking_uri = args.tracking_uri
    from mlkube.training.prepare import preflight

    # What can be refused without Ray and Prefect is refused before either starts.
    preflight(run)
    from mlkube.flows.logs import quiet_console
    from mlkube.flows.prefect_api import start_prefect_api

    quiet_console(args.verbose)
    # Prefect's temporary API comes up while the pipeline's modules load and data is read.
    start_prefect_api()
    from mlkube.flows.train import train
    from mlkube.reports import print_train_result

    result = train(run, show_progress=not args.quiet)
    print_train_result(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mlkube.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlkube", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="run a TrainingRun on this machine")
    train.add_argument("-f", "--file", required=True, help="TrainingRun YAML")
    train.add_argument("--dataset", help="override spec.dataset.uri")
    train.add_argument("--tracking-uri", help="override spec.mlflow.trackingUri")
    train.add_argument("-q", "--quiet", action="store_true", help="no per-trial progress")
    train.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    train.set_defaults(handler=cmd_train)

    crds = sub.add_parser("crds", help="write the CRD YAML generated from the api models")
    crds.add_argument("-o", "--output", default="crds", help="directory (default: crds)")
    crds.add_argument("--check", action="store_true", help="fail if the files differ")
    crds.set_defaults(handler=cmd_crds)

    demo = sub.add_parser("demo", help="train -> register -> serve -> predict, offline")
    demo.add_argument("--trials", type=int, default=8)
    demo.add_argument("--dataset", help="insurance CSV (default: ../shared/data/insurance.csv)")
    demo.set_defaults(handler=cmd_demo)

    for module, adder in (
        ("mlkube.model_servers.commands", "add_serve_parser"),
        ("mlkube.model_servers.commands", "add_predict_parser"),
        ("mlkube.operator.commands", "add_operator_parser"),
        ("mlkube.flows.commands", "add_flow_parsers"),
    ):
        _add_optional(sub, module, adder)
    return parser


def _add_optional(sub: Any, module: str, adder: str) -> None:
    """Subcommands whose module needs an optional extra: left out when it is not installed."""
    try:
        commands = importlib.import_module(module)
    except ModuleNotFoundError as missing:
        # Only a third-party package may be missing; a module of ours missing is a bug.
        if missing.name is None or missing.name.split(".")[0] == "mlkube":
            raise
        return
    getattr(commands, adder)(sub)


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs one command line, `mlkube`'s unless another parser is given, and returns its exit
    code. The one place where an error becomes a line on stderr and an exit code."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> NoReturn:
    """The `mlkube` command, and the `python -m` entry points (with their own argv or parser)."""
    from mlkube.local import exit_process

    exit_process(main(argv, parser))


if __name__ == "__main__":
    run()
