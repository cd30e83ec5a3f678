"""The retrain flow: ingest -> check -> TrainingRun -> wait -> report, on a schedule.

Step 1 of the continuous-training loop (DESIGN.md). Each run asks its source for the hours
the dataset lacks, checks them, appends them, and decides: no new hours, rows that fail
the quality checks, or a drifted window skip training (unless forced), with the reason in
the report. Otherwise it applies a TrainingRun made from a template (dataset.uri pointed
at the dataset, a generated name, labels naming the flow run) and waits for the operator
to report a terminal phase; with `local` it runs the train flow in this process instead.
The outcome is a Prefect markdown artifact and the flow's return value.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from pydantic import BaseModel

from mlkube.api import TrainingRun, parse_resource
from mlkube.flows.checks import run_checks
from mlkube.flows.ingest import (
    commit,
    dataset_lock,
    mark_decided,
    not_committed,
    plan_ingest,
    read_ledger_document,
    undecided_hours,
)
from mlkube.flows.retrain_models import (
    IngestStep,
    RetrainConfig,
    RetrainFailed,
    RetrainOutcome,
    TrainDecision,
    TrainingOutcome,
    template_manifest,
)
from mlkube.flows.retrain_report import artifact_key, markdown_report
from mlkube.flows.sources import TIME_COLUMN
from mlkube.flows.trainingrun_client import train_on_cluster

LABEL_FLOW_RUN_ID = "mlkube.io/flow-run-id"
LABEL_FLOW_RUN_NAME = "mlkube.io/flow-run-name"
LABEL_DEPLOYMENT = "mlkube.io/deployment"
LABEL_CREATED_BY = "app.kubernetes.io/created-by"
CREATED_BY = "mlkube-retrain"
ANNOTATION_DATA_THROUGH = "mlkube.io/dataset-through"
ANNOTATION_REASON = "mlkube.io/retrain-reason"


# --------------------------------------------------------------------------- steps


def ingest_and_check(
    config: RetrainConfig,
    flow_run_id: str | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> IngestStep:
    """Fetch, check, and keep the new rows unless they fail a quality check; with the
    dataset's lock held throughout, so two runs never interleave."""
    with dataset_lock(config.dataset, on_wait):
        plan = plan_ingest(config.dataset, config.source)
        untrained = undecided_hours(
            plan.existing, read_ledger_document(config.dataset).decided_through
        )
        checks = run_checks(plan.new, plan.existing, config.checks, config.source.plausible_range)
        if checks.quality_ok:
            record = commit(plan, config.dataset, flow_run_id)
        else:
            failure = checks.first_failure()
            assert failure is not None
            why = f"refused by the {failure.name} check: {failure.detail}"
            record = not_committed(plan, config.dataset, why, flow_run_id)
    times = untrained[TIME_COLUMN]
    return IngestStep(
        record=record,
        checks=checks,
        unit=config.source.unit,
        untrained_hours=len(untrained),
        untrained_first=None if untrained.empty else times.min().to_pydatetime(),
        untrained_last=None if untrained.empty else times.max().to_pydatetime(),
    )


def untrained_note(step: IngestStep) -> str:
    return (
        f"{step.untrained_hours} hours held ({step.untrained_first:%Y-%m-%d %H:%M} to "
        f"{step.untrained_last:%Y-%m-%d %H:%M}) that no run has trained on yet"
    )


def decide_training(step: IngestStep, force: bool) -> TrainDecision:
    record, checks = step.record, step.checks
    failure = checks.first_failure()
    if not checks.quality_ok and failure is not None:
        why = f"the new rows failed the {failure.name} check ({failure.detail}); none were added"
    elif record.rows_added == 0 and step.untrained_hours:
        return TrainDecision(train=True, reason=f"no new hours, but {untrained_note(step)}")
    elif record.rows_added == 0:
        held = f"after {record.last_before:%Y-%m-%d %H:%M}" if record.last_before else "at all"
        why = f"no new data: the source has no hours {held}"
    elif checks.drifted and failure is not None:
        why = f"drift: {failure.detail}"
    else:
        earlier = f", and {untrained_note(step)}" if step.untrained_hours else ""
        return TrainDecision(
            train=True,
            reason=f"{record.rows_added} new hours ({record.first_added:%Y-%m-%d %H:%M} to "
            f"{record.last_added:%Y-%m-%d %H:%M}), checks passed{earlier}",
        )
    if force:
        return TrainDecision(train=True, reason=f"forced, although {why}")
    return TrainDecision(train=False, reason=why)


class FlowIdentity(BaseModel):
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    deployment: str | None = None


def current_identity() -> FlowIdentity:
    from prefect.runtime import deployment, flow_run

    return FlowIdentity(
        flow_run_id=flow_run.id, flow_run_name=flow_run.name, deployment=deployment.name
    )


def label_value(value: str) -> str:
    """A valid label value: 63 characters of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63]
    return cleaned.strip("-._")


def trainingrun_body(
    template: TrainingRun, dataset_uri: str, identity: FlowIdentity, step: IngestStep, reason: str
) -> dict[str, Any]:
    """The template with the dataset, a name to generate, and labels back to the flow run."""
    body = template_manifest(template)
    metadata = body["metadata"]
    base = metadata.pop("name")[:40].rstrip("-")
    metadata.pop("namespace", None)
    metadata["generateName"] = f"{base}-"
    labels = {
        LABEL_CREATED_BY: CREATED_BY,
        LABEL_FLOW_RUN_ID: identity.flow_run_id,
        LABEL_FLOW_RUN_NAME: identity.flow_run_name,
        LABEL_DEPLOYMENT: identity.deployment,
    }
    metadata["labels"] = {
        **metadata.get("labels", {}),
        **{k: label_value(v) for k, v in labels.items() if v and label_value(v)},
    }
    through = step.record.last_added or step.record.last_before
    annotations = {ANNOTATION_REASON: reason[:1000]}
    if through:
        annotations[ANNOTATION_DATA_THROUGH] = through.isoformat()
    metadata["annotations"] = {**metadata.get("annotations", {}), **annotations}
    body["spec"].setdefault("dataset", {})["uri"] = dataset_uri
    return body


# --------------------------------------------------------------------------- local


def train_locally(body: dict[str, Any]) -> TrainingOutcome:
    """The train flow in this process (a subflow), as `mlkube train` runs it."""
    from mlkube.flows.train import TrainingFailed, train

    metadata = dict(body["metadata"])
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    metadata["name"] = f"{metadata.pop('generateName')}{suffix}"
    resource = parse_resource({**body, "metadata": metadata}, "trainingrun", TrainingRun)
    model = resource.spec.model.name
    try:
        result = train(resource, show_progress=False)
    except TrainingFailed as error:
        return TrainingOutcome(
            trainingrun=metadata["name"], phase="Failed", model_name=model, message=str(error)
        )
    return TrainingOutcome(
        trainingrun=result.trainingrun,
        phase="Succeeded",
        model_name=result.model_name,
        model_version=result.version,
        promoted=result.promoted,
        promotion_reason=result.reason,
        metric=result.metric,
        best_value=result.holdout.get(result.metric, result.best_value),
    )


# --------------------------------------------------------------------------- the flow


@task(name="ingest-and-check", cache_policy=NO_CACHE)
def ingest_task(config: RetrainConfig, flow_run_id: str | None) -> IngestStep:
    step = ingest_and_check(config, flow_run_id, on_wait=get_run_logger().info)
    get_run_logger().info(
        "ingest: %d hours fetched, %d added (%s)",
        step.record.rows_fetched, step.record.rows_added, step.record.note or "ok",
    )  # fmt: skip
    return step


@flow(name="retrain", log_prints=False)
def retrain_flow(config: RetrainConfig) -> RetrainOutcome:
    """Ingest -> check -> TrainingRun (or the local train flow) -> wait -> report."""
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    template = config.template()  # a bad template fails before anything is fetched
    identity = current_identity()
    step = ingest_task(config, identity.flow_run_id)
    decision = decide_training(step, config.force)
    logger.info("decision: %s (%s)", "train" if decision.train else "skip", decision.reason)

    def decided() -> None:
        # Only once a training has the rows (or they were skipped on purpose): rows of a
        # run whose TrainingRun could not be submitted stay to be trained on next time.
        if step.through is not None:
            mark_decided(config.dataset, step.through)

    training = None
    if decision.train:
        body = trainingrun_body(template, config.dataset.uri, identity, step, decision.reason)
        if config.local:
            training = train_locally(body)
            decided()
        else:
            training = train_on_cluster(body, config.cluster, decided)
    elif step.checks.quality_ok and step.checks.drifted:
        decided()
    outcome = RetrainOutcome(
        flow_run_id=identity.flow_run_id,
        ingest=step.record,
        checks=step.checks,
        decision=decision,
        training=training,
    )
    model_name = template.spec.model.name
    create_markdown_artifact(
        markdown_report(outcome, model_name),
        key=artifact_key(model_name),
        description=outcome.summary()[:500],
    )
    logger.info("%s", outcome.summary())
    if training is not None and training.phase != "Succeeded":
        raise RetrainFailed(outcome.summary())
    return outcome


def retrain(config: RetrainConfig) -> RetrainOutcome:
    """What `mlkube retrain` does: check the template first, then run the flow."""
    config.template()
    return retrain_flow(config)
