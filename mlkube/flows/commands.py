"""`mlkube retrain`, `mlkube ingest`, `mlkube schedule`: the retrain flow from the command line.

All three read the flow's parameters from one YAML file (a RetrainConfig, e.g.
examples/atmos-temperature/retrain.yaml). Imports of Prefect wait until a command runs, so
that `mlkube --help` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mlkube.api import UserError
from mlkube.api.manifest import format_validation_error

DEFAULT_CRON = "0 */6 * * *"  # every 6 hours, as the original crawler


class RetrainConfigError(UserError):
    """The retrain config file cannot be used; one line naming the file and field."""


def load_config(path: str, overrides: dict[str, Any] | None = None) -> Any:
    """The RetrainConfig in `path`, with command-line overrides (dotted camelCase keys)."""
    from mlkube.flows.retrain_models import RetrainConfig

    source = Path(path)
    try:
        document = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise RetrainConfigError(f"{source}: no such file") from None
    except yaml.YAMLError as error:
        raise RetrainConfigError(f"{source}: malformed YAML: {error}".splitlines()[0]) from None
    if not isinstance(document, dict):
        raise RetrainConfigError(f"{source}: expected a mapping of the retrain flow's parameters")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, last = dotted.split(".")
        node = document
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    if document.get("trainingrunFile"):
        # Relative to the config file, so that it works from any directory.
        template = Path(document["trainingrunFile"])
        if not template.is_absolute() and not template.exists():
            document["trainingrunFile"] = str(source.parent / template)
    try:
        config = RetrainConfig.model_validate(document)
    except ValidationError as error:
        raise RetrainConfigError(f"{source}: {format_validation_error(error)}") from None
    config.template()  # refuse a bad TrainingRun template now, not in the flow run
    return config


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset.uri": getattr(args, "dataset", None),
        "cluster.namespace": getattr(args, "namespace", None),
        "cluster.timeoutSeconds": getattr(args, "timeout", None),
        "local": True if getattr(args, "local", False) else None,
        "force": True if getattr(args, "force", False) else None,
    }


def cmd_retrain(args: argparse.Namespace) -> int:
    config = load_config(args.file, _overrides(args))
    from mlkube.flows.logs import quiet_console

    quiet_console(args.verbose)
    from mlkube.flows.retrain import retrain

    print(retrain(config).summary())  # RetrainFailed: exit 1
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    config = load_config(args.file, _overrides(args))
    from mlkube.flows.retrain import ingest_and_check

    step = ingest_and_check(config, on_wait=lambda line: print(line, file=sys.stderr, flush=True))
    record = step.record
    for check in step.checks.results:
        verdict = "skipped" if check.skipped else ("pass" if check.passed else "FAIL")
        print(f"check {check.name}: {verdict}: {check.detail}")
    if record.note:
        print(f"{record.dataset_uri}: nothing added: {record.note}")
        return 1
    span = f" ({record.first_added} to {record.last_added})" if record.rows_added else ""
    print(f"{record.dataset_uri}: {record.rows_added} new hours{span}, {record.rows_after} held")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    config = load_config(args.file, _overrides(args)).with_inline_template()
    from mlkube.flows.logs import quiet_console

    quiet_console(verbose=True)
    from mlkube.flows.retrain import retrain_flow

    name = args.name or f"retrain-{config.template().metadata.name}"
    # One run at a time: two ingests of one dataset must not race.
    retrain_flow.serve(
        name=name,
        cron=args.cron,
        parameters={"config": config.model_dump(mode="json", by_alias=True, exclude_none=True)},
        global_limit=1,
        tags=["mlkube", "retrain"],
        description="ingest -> check -> TrainingRun -> wait -> report",
    )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, help="retrain config YAML (flow parameters)")
    parser.add_argument("--dataset", help="override dataset.uri")


def _training(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", action="store_true", help="train in this process (no cluster)")
    parser.add_argument("--force", action="store_true", help="train even when checks say skip")
    parser.add_argument("-n", "--namespace", help="namespace of the TrainingRun")
    parser.add_argument(
        "--timeout", type=float, help="seconds to wait for the TrainingRun (cluster.timeoutSeconds)"
    )


def add_flow_parsers(subparsers: Any) -> None:
    retrain = subparsers.add_parser(
        "retrain", help="ingest new data, check it, train (TrainingRun or --local), report"
    )
    _common(retrain)
    _training(retrain)
    retrain.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    retrain.set_defaults(handler=cmd_retrain)

    ingest = subparsers.add_parser("ingest", help="append a source's new hours to the dataset")
    _common(ingest)
    ingest.set_defaults(handler=cmd_ingest)

    schedule = subparsers.add_parser(
        "schedule", help="serve the retrain flow on a cron (Prefect deployment, this process)"
    )
    _common(schedule)
    _training(schedule)
    schedule.add_argument("--cron", default=DEFAULT_CRON, help=f"default {DEFAULT_CRON!r}")
    schedule.add_argument("--name", help="deployment name (default retrain-<TrainingRun name>)")
    schedule.set_defaults(handler=cmd_schedule)
