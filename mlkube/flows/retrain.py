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

import datetime as dt
import random
import re
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from pydantic import BaseModel, Field, model_validator

from mlkube.api import CommandFailed, TrainingRun, load_manifest, parse_resource
from mlkube.api.common import GROUP, VERSION, CamelModel
from mlkube.flows.checks import CheckReport, CheckSettings, run_checks
from mlkube.flows.ingest import (
    DatasetSettings,
    IngestRecord,
    commit,
    dataset_lock,
    mark_decided,
    not_committed,
    plan_ingest,
    read_ledger_document,
    undecided_hours,
)
from mlkube.flows.sources import TIME_COLUMN, AnySource

PLURAL = "trainingruns"
LABEL_FLOW_RUN_ID = "mlkube.io/flow-run-id"
LABEL_FLOW_RUN_NAME = "mlkube.io/flow-run-name"
LABEL_DEPLOYMENT = "mlkube.io/deployment"
LABEL_CREATED_BY = "app.kubernetes.io/created-by"
CREATED_BY = "mlkube-retrain"
ANNOTATION_DATA_THROUGH = "mlkube.io/dataset-through"
ANNOTATION_REASON = "mlkube.io/retrain-reason"
TERMINAL_PHASES = ("Succeeded", "Failed")


class RetrainFailed(CommandFailed):
    """The TrainingRun failed or did not finish in time; the report says more (exit 1)."""


class ClusterSettings(CamelModel):
    namespace: str | None = Field(
        default=None, description="Where TrainingRuns go; the kubeconfig's (or pod's) default."
    )
    timeout_seconds: float = Field(default=6 * 3600, gt=0)
    poll_seconds: float = Field(default=5.0, gt=0)


class RetrainConfig(CamelModel):
    """The flow's parameters: what `mlkube retrain -f` reads and a deployment stores."""

    source: AnySource
    dataset: DatasetSettings
    trainingrun_file: str | None = Field(
        default=None, description="TrainingRun YAML used as the template."
    )
    trainingrun: dict[str, Any] | None = Field(
        default=None, description="The template inline (what `mlkube schedule` stores)."
    )
    checks: CheckSettings = Field(default_factory=CheckSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    local: bool = Field(default=False, description="Train in this process, not on the cluster.")
    force: bool = Field(default=False, description="Train even when the checks say skip.")

    @model_validator(mode="after")
    def _one_template(self) -> RetrainConfig:
        if (self.trainingrun_file is None) == (self.trainingrun is None):
            raise ValueError("give exactly one of trainingrunFile, trainingrun")
        return self

    def template(self) -> TrainingRun:
        if self.trainingrun_file is not None:
            return load_manifest(Path(self.trainingrun_file), TrainingRun)
        return parse_resource(self.trainingrun, "trainingrun", TrainingRun)

    def with_inline_template(self) -> RetrainConfig:
        """The same config with the template file read in, so that it runs anywhere."""
        if self.trainingrun is not None:
            return self
        document = handed_over(self.template())
        return self.model_copy(update={"trainingrun": document, "trainingrun_file": None})


class IngestStep(BaseModel):
    record: IngestRecord
    checks: CheckReport
    unit: str
    # Hours held before this run that no run has trained on (an earlier run committed
    # them and then could not submit its TrainingRun).
    untrained_hours: int = 0
    untrained_first: dt.datetime | None = None
    untrained_last: dt.datetime | None = None

    @property
    def through(self) -> dt.datetime | None:
        """The last hour held after this run."""
        return self.record.last_added or self.record.last_before


class Decision(BaseModel):
    train: bool
    reason: str


class TrainingOutcome(BaseModel):
    trainingrun: str
    namespace: str | None = None
    phase: str
    model_name: str
    model_version: int | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    metric: str | None = None
    best_value: float | None = None
    message: str | None = None


class RetrainOutcome(BaseModel):
    flow_run_id: str | None
    ingest: IngestRecord
    checks: CheckReport
    decision: Decision
    training: TrainingOutcome | None = None

    @property
    def trained(self) -> bool:
        return self.training is not None

    def summary(self) -> str:
        added = f"{self.ingest.rows_added} new hours"
        if self.training is None:
            return f"{added}; training skipped: {self.decision.reason}"
        t = self.training
        if t.phase != "Succeeded":
            return f"{added}; TrainingRun {t.trainingrun} {t.phase}: {t.message or ''}".rstrip(": ")
        promoted = "promoted" if t.promoted else "not promoted"
        return (
            f"{added}; TrainingRun {t.trainingrun} Succeeded: {t.model_name} version "
            f"{t.model_version}, {promoted} ({t.promotion_reason})"
        )


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


def decide(step: IngestStep, force: bool) -> Decision:
    record, checks = step.record, step.checks
    failure = checks.first_failure()
    if not checks.quality_ok and failure is not None:
        why = f"the new rows failed the {failure.name} check ({failure.detail}); none were added"
    elif record.rows_added == 0 and step.untrained_hours:
        return Decision(train=True, reason=f"no new hours, but {untrained_note(step)}")
    elif record.rows_added == 0:
        held = f"after {record.last_before:%Y-%m-%d %H:%M}" if record.last_before else "at all"
        why = f"no new data: the source has no hours {held}"
    elif checks.drifted and failure is not None:
        why = f"drift: {failure.detail}"
    else:
        earlier = f", and {untrained_note(step)}" if step.untrained_hours else ""
        return Decision(
            train=True,
            reason=f"{record.rows_added} new hours ({record.first_added:%Y-%m-%d %H:%M} to "
            f"{record.last_added:%Y-%m-%d %H:%M}), checks passed{earlier}",
        )
    if force:
        return Decision(train=True, reason=f"forced, although {why}")
    return Decision(train=False, reason=why)


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


def handed_over(run: TrainingRun) -> dict[str, Any]:
    meta = run.metadata.model_dump(exclude_none=True)
    meta = {k: v for k, v in meta.items() if v not in ({}, None) and k not in ("uid", "generation")}
    return {
        "apiVersion": run.api_version,
        "kind": run.kind,
        "metadata": meta,
        "spec": run.spec.to_k8s(),
    }


def trainingrun_body(
    template: TrainingRun, dataset_uri: str, identity: FlowIdentity, step: IngestStep, reason: str
) -> dict[str, Any]:
    """The template with the dataset, a name to generate, and labels back to the flow run."""
    body = handed_over(template)
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


# --------------------------------------------------------------------------- cluster


@task(name="submit-trainingrun", cache_policy=NO_CACHE)
def submit_trainingrun(body: dict[str, Any], namespace: str) -> str:
    from kubernetes import client

    from mlkube.kube_config import api_client

    with api_client() as api:
        try:
            created = cast(
                dict[str, Any],
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, body
                ),
            )
        except client.exceptions.ApiException as error:
            raise RetrainFailed(
                f"cannot create a TrainingRun in {namespace}: {error.status} {error.reason}"
            ) from None
    name = str(created["metadata"]["name"])
    get_run_logger().info("created TrainingRun %s/%s", namespace, name)
    return name


@task(name="wait-for-trainingrun", cache_policy=NO_CACHE)
def wait_for_trainingrun(name: str, namespace: str, settings: ClusterSettings) -> dict[str, Any]:
    """The TrainingRun once its phase is terminal; RetrainFailed after the timeout."""
    from kubernetes import client

    from mlkube.kube_config import api_client

    deadline = time.monotonic() + settings.timeout_seconds
    phase = None
    with api_client() as api:
        custom = client.CustomObjectsApi(api)
        while True:
            found = cast(
                dict[str, Any],
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
            status = found.get("status") or {}
            if status.get("phase") != phase:
                phase = status.get("phase")
                get_run_logger().info("TrainingRun %s: %s", name, phase or "no status yet")
            if phase in TERMINAL_PHASES:
                return found
            if time.monotonic() > deadline:
                raise RetrainFailed(
                    f"TrainingRun {namespace}/{name} is still {phase or 'Pending'} after "
                    f"{settings.timeout_seconds:g} s (it keeps running; see kubectl get tr)"
                )
            time.sleep(settings.poll_seconds)


def outcome_from_status(found: dict[str, Any]) -> TrainingOutcome:
    status = found.get("status") or {}
    best = status.get("best") or {}
    return TrainingOutcome(
        trainingrun=found["metadata"]["name"],
        namespace=found["metadata"].get("namespace"),
        phase=status.get("phase", "Pending"),
        model_name=found["spec"]["model"]["name"],
        model_version=status.get("modelVersion"),
        promoted=status.get("promoted"),
        promotion_reason=status.get("promotionReason"),
        metric=best.get("metric"),
        best_value=best.get("value"),
        message=status.get("message"),
    )


def train_on_cluster(
    body: dict[str, Any], settings: ClusterSettings, on_submitted: Callable[[], None]
) -> TrainingOutcome:
    from mlkube.kube_config import current_namespace

    namespace = settings.namespace or current_namespace()
    name = submit_trainingrun(body, namespace)
    on_submitted()
    try:
        found = wait_for_trainingrun(name, namespace, settings)
    except RetrainFailed as error:
        model = body["spec"]["model"]["name"]
        return TrainingOutcome(
            trainingrun=name, namespace=namespace, phase="Timeout", model_name=model,
            message=str(error),
        )  # fmt: skip
    return outcome_from_status(found)


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


# --------------------------------------------------------------------------- report


def _when(value: dt.datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else "-"


def markdown_report(outcome: RetrainOutcome, model_name: str) -> str:
    record, decision, training = outcome.ingest, outcome.decision, outcome.training
    if training is None:
        headline = f"**Training skipped**: {decision.reason}."
    elif training.phase == "Succeeded":
        promoted = "**promoted**" if training.promoted else "**not promoted**"
        headline = (
            f"**Trained** `{training.model_name}` version **{training.model_version}**, "
            f"{promoted}: {training.promotion_reason}."
        )
    else:
        headline = f"**Training {training.phase}**: {training.message or 'no message'}."
    lines = [
        f"# Retrain `{model_name}`",
        "",
        headline,
        "",
        "## Ingest",
        "",
        "| dataset | source | hours before | fetched | added | first added | last added | "
        "hours after |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |",
        f"| `{record.dataset_uri}` | {record.source} | {record.rows_before} | "
        f"{record.rows_fetched} | {record.rows_added} | {_when(record.first_added)} | "
        f"{_when(record.last_added)} | {record.rows_after} |",
    ]
    if record.note:
        lines += ["", f"Not added: {record.note}."]
    lines += ["", "## Checks", ""]
    if outcome.checks.results:
        lines += ["| check | result | detail |", "| --- | --- | --- |"]
        for check in outcome.checks.results:
            verdict = "skipped" if check.skipped else ("pass" if check.passed else "**fail**")
            lines.append(f"| {check.name} | {verdict} | {check.detail} |")
    else:
        lines.append("Nothing new to check.")
    lines += ["", "## Training", "", f"Decision: {'train' if decision.train else 'skip'} "
              f"({decision.reason})."]  # fmt: skip
    if training is not None:
        best = f"{training.metric}={training.best_value:.4g}" if training.best_value else "-"
        where = f"{training.namespace}/" if training.namespace else ""
        lines += [
            "",
            "| TrainingRun | phase | version | promoted | why | best |",
            "| --- | --- | ---: | --- | --- | --- |",
            f"| `{where}{training.trainingrun}` | {training.phase} | "
            f"{training.model_version or '-'} | {training.promoted} | "
            f"{training.promotion_reason or training.message or '-'} | {best} |",
        ]
    return "\n".join(lines) + "\n"


def artifact_key(model_name: str) -> str:
    """Artifact keys take lowercase letters, digits and dashes."""
    return "retrain-" + (re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-") or "model")


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
    decision = decide(step, config.force)
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
