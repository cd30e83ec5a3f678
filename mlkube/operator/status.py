"""Foreign status -> our status: RayJob (+ the MLflow outcome) -> TrainingRun, and the
InferenceService's conditions and url as the rollout logic needs them. Pure functions; the
conditions' own transitions are in conditions.py."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from mlkube.api.modeldeployment import UNLOADABLE_EXIT_CODE
from mlkube.api.trainingrun import (
    TERMINAL_PHASES,
    BestTrial,
    TrainingRunPhase,
    TrainingRunStatus,
    TrialCounts,
)
from mlkube.operator.conditions import (
    ConditionStatus,
    drop_condition,
    find_condition,
    held_since,
    mlflow_answered,
    parse_timestamp,
    set_condition,
    timestamp,
)
from mlkube.operator.events import Event
from mlkube.operator.inferenceservice import PREDICTOR_CONTAINER
from mlkube.operator.names import (
    ANNOTATION_DEPLOYMENT_MODE,
    ANNOTATION_MODEL_VERSION,
    ANNOTATION_MODEL_VERSIONS,
)
from mlkube.operator.settings import is_raw_mode
from mlkube.training.outcome import Outcome

# TrainingRun condition types.
SUCCEEDED = "Succeeded"
# Succeeded's status in each terminal phase (Unknown until then).
VERDICTS: dict[TrainingRunPhase, ConditionStatus] = {"Succeeded": "True", "Failed": "False"}
# jobStatus FAILED seen while jobDeploymentStatus still said Running; since its transition.
JOB_FAILING = "JobFailing"
# False while the MLflow parent run carries outcome tags that do not parse.
OUTCOME_READABLE = "OutcomeReadable"


def status_patch(stored: Mapping[str, Any], new: BaseModel) -> dict[str, Any]:
    """The merge patch from the stored status to `new`: changed keys, None for removed
    ones. Compared with what is stored, not with a parsed copy, so that defaults (phase
    Pending) get written too. Keys our model does not know are left alone."""
    after = new.model_dump(by_alias=True, exclude_none=True, mode="json")
    known = {field.alias or name for name, field in type(new).model_fields.items()}
    changes: dict[str, Any] = {k: v for k, v in after.items() if stored.get(k) != v}
    changes.update({k: None for k in stored if k in known and k not in after})
    return changes


class _Foreign(BaseModel):
    """A foreign object's status: camelCase, unknown fields ignored (they evolve upstream)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class RayJobStatus(_Foreign):
    job_deployment_status: str = ""
    job_status: str = ""
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    end_time: str | None = None


_ERROR_LINE = re.compile(r"^(error: |[A-Za-z_][\w.]*(Error|Exception)\b)")


def one_line(message: str, limit: int = 400) -> str:
    """Ray's failure message carries a log tail: keep its first line and, of the tail, the
    train flow's `error: ...` line, else the last exception line, else the last line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) == 1:
        text = lines[0]
    else:
        tail = lines[1:]
        flagged = [line for line in tail if _ERROR_LINE.match(line)]
        chosen = next((line for line in reversed(flagged) if line.startswith("error: ")), None)
        chosen = chosen or (flagged[-1] if flagged else tail[-1])
        text = f"{lines[0].rstrip(':,')}: {chosen}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


JobVerdict = Literal["pending", "running", "succeeded", "failed"]


class JobReading(BaseModel):
    verdict: JobVerdict
    reason: str
    message: str = ""


def read_rayjob(
    job: RayJobStatus, failing_since: dt.datetime | None, now: dt.datetime, grace_seconds: float
) -> JobReading:
    deployment, state = job.job_deployment_status, job.job_status
    if deployment == "Complete":
        if state == "SUCCEEDED":
            return JobReading(verdict="succeeded", reason="JobSucceeded")
        reason = job.reason or f"Job{state.title() or 'Ended'}"
        return JobReading(verdict="failed", reason=reason, message=one_line(job.message))
    if deployment in ("Failed", "ValidationFailed"):
        fallback = "ValidationFailed" if deployment == "ValidationFailed" else "RayJobFailed"
        reason = job.reason or fallback
        return JobReading(verdict="failed", reason=reason, message=one_line(job.message))
    if deployment == "Retrying":
        # spec.ray.retries: the failed attempt's jobStatus stays until the next one starts.
        return JobReading(verdict="running", reason="Retrying", message=one_line(job.message))
    if state == "FAILED":
        # KubeRay may still say Running while the job already failed; give it a grace period.
        since = parse_timestamp(job.end_time) or failing_since or now
        if (now - since).total_seconds() >= grace_seconds:
            message = one_line(job.message) or "the Ray job failed"
            return JobReading(verdict="failed", reason="JobFailed", message=message)
        return JobReading(verdict="running", reason="JobFailing", message=one_line(job.message))
    if deployment in ("Running", "Retrying") or state == "RUNNING":
        return JobReading(verdict="running", reason="Running")
    if deployment in ("Suspended", "Suspending"):
        return JobReading(verdict="pending", reason=deployment)
    return JobReading(verdict="pending", reason=deployment or "WaitingForRayJob")


def _apply_outcome(status: TrainingRunStatus, outcome: Outcome) -> None:
    status.mlflow_run_id = outcome.run_id
    if outcome.trials_total:
        status.trials = TrialCounts(completed=outcome.trials_completed, total=outcome.trials_total)
    if outcome.best_metric is not None and outcome.best_value is not None:
        status.best = BestTrial(
            metric=outcome.best_metric, value=outcome.best_value, params=outcome.best_params
        )
    if outcome.model_version is not None:
        status.model_version = outcome.model_version
    if outcome.promoted is not None:
        status.promoted = outcome.promoted
    if outcome.reason is not None:
        status.promotion_reason = outcome.reason


def trainingrun_status(
    previous: TrainingRunStatus,
    *,
    rayjob_status: dict[str, Any] | None,
    rayjob_exists: bool,
    outcome: Outcome | None,
    mlflow_error: str | None,
    mlflow_checked: bool,
    now: dt.datetime,
    grace_seconds: float,
    mlflow_reason: str = "Unreachable",
) -> TrainingRunStatus:
    """The TrainingRun's next status from its RayJob's status and its MLflow parent run.

    MLflow is the source of truth for what the run produced; the RayJob says whether the
    process ran and how it ended. `mlflow_error` and `mlflow_reason` are the operator's own
    words, never what a server said. In steps:

    - a terminal phase is final;
    - what MLflow said: whether it answered, the outcome so far, tags that do not parse;
    - how the job stands: read off its RayJob; without one, from MLflow's finished run,
      else still waiting for the RayJob (Pending), else deleted (failed);
    - the phase: a job that succeeded is Succeeded once MLflow has its finished run; a
      failed RayJob whose run MLflow saw finish succeeded all the same;
    - the times, the Succeeded condition and the message.
    """
    if previous.phase in TERMINAL_PHASES:
        return previous
    status = previous.model_copy(deep=True)
    _take_mlflow_answer(status, outcome, mlflow_error, mlflow_reason, mlflow_checked, now)
    if rayjob_exists:
        reading, ended_at = _read_rayjob_of(status, rayjob_status, now, grace_seconds)
    else:
        reading, ended_at = _without_rayjob(status, outcome), now
    reading, phase = _phase(reading, outcome, mlflow_error, ended_at, now, grace_seconds)
    _settle(status, reading, phase, ended_at, now)
    return status


def _take_mlflow_answer(
    status: TrainingRunStatus, outcome: Outcome | None, mlflow_error: str | None,
    mlflow_reason: str, mlflow_checked: bool, now: dt.datetime,
) -> None:  # fmt: skip
    """MlflowReachable, the outcome so far, and OutcomeReadable."""
    if mlflow_error is not None:
        status.conditions = mlflow_answered(status.conditions, now, mlflow_reason, mlflow_error)
    elif mlflow_checked:
        status.conditions = mlflow_answered(status.conditions, now)
    if outcome is None:
        return
    _apply_outcome(status, outcome)
    if outcome.unreadable_tags:
        message = "the MLflow parent run has tags that do not parse: " + ", ".join(
            sorted(outcome.unreadable_tags)
        )
        status.conditions = set_condition(
            status.conditions, OUTCOME_READABLE, "False", "UnreadableTags", message, now
        )
    else:
        status.conditions = drop_condition(status.conditions, OUTCOME_READABLE)


def _read_rayjob_of(
    status: TrainingRunStatus, rayjob_status: dict[str, Any] | None, now: dt.datetime,
    grace_seconds: float,
) -> tuple[JobReading, dt.datetime]:  # fmt: skip
    """How the job stands by its RayJob, and when it ended (now, if it has not)."""
    job = RayJobStatus.model_validate(rayjob_status or {})
    failing_since = held_since(status.conditions, JOB_FAILING, "True")
    reading = read_rayjob(job, failing_since, now, grace_seconds)
    if reading.reason == "JobFailing":
        status.conditions = set_condition(
            status.conditions, JOB_FAILING, "True", "JobFailing", reading.message, now
        )
    else:
        status.conditions = drop_condition(status.conditions, JOB_FAILING)
    if job.start_time and not status.start_time:
        status.start_time = job.start_time
    return reading, parse_timestamp(job.end_time) or now


def _without_rayjob(status: TrainingRunStatus, outcome: Outcome | None) -> JobReading:
    """No RayJob: not made yet (Pending), or gone (deleted by hand?), when MLflow may still
    know how the run ended."""
    if outcome is not None and outcome.finished:
        ok = outcome.state == "FINISHED"
        return JobReading(
            verdict="succeeded" if ok else "failed",
            reason="JobSucceeded" if ok else "RunFailed",
            message=outcome.error or "",
        )
    if status.phase == "Pending":
        return JobReading(verdict="pending", reason="WaitingForRayJob")
    return JobReading(verdict="failed", reason="RayJobDeleted", message="the RayJob was deleted")


def _phase(
    reading: JobReading, outcome: Outcome | None, mlflow_error: str | None,
    ended_at: dt.datetime, now: dt.datetime, grace_seconds: float,
) -> tuple[JobReading, TrainingRunPhase]:  # fmt: skip
    """The job's verdict as a phase, with what MLflow knows of the run."""
    if reading.verdict == "failed" and outcome is not None and outcome.state == "FINISHED":
        # The train flow finished and recorded its outcome; the RayJob failed afterwards (seen
        # on a real node: the Ray head deleted after the job's end, so KubeRay never read
        # the job's terminal state). What the run produced is MLflow's to say.
        reading = JobReading(verdict="succeeded", reason=reading.reason)
    if reading.verdict == "succeeded":
        return _success(reading, outcome, mlflow_error, ended_at, now, grace_seconds)
    if reading.verdict == "failed":
        if outcome is not None and outcome.error:
            reading = reading.model_copy(update={"message": outcome.error})
        return reading, "Failed"
    return reading, "Running" if reading.verdict == "running" else "Pending"


def _settle(
    status: TrainingRunStatus, reading: JobReading, phase: TrainingRunPhase,
    ended_at: dt.datetime, now: dt.datetime,
) -> None:  # fmt: skip
    """The phase, its times, the Succeeded condition and the message."""
    if phase in ("Running", "Succeeded", "Failed") and not status.start_time:
        status.start_time = timestamp(now)
    if phase in TERMINAL_PHASES:
        status.completion_time = timestamp(ended_at)
        status.conditions = drop_condition(status.conditions, JOB_FAILING)
    verdict = VERDICTS.get(phase, "Unknown")
    status.conditions = set_condition(
        status.conditions, SUCCEEDED, verdict, reading.reason, reading.message, now
    )
    status.phase = phase
    status.message = reading.message or None


def phase_event(status: TrainingRunStatus) -> Event:
    """The Event posted when a TrainingRun enters `status.phase`: a Succeeded run's version
    and whether it was promoted; a Failed one (a warning) or any other, its message."""
    verdict = find_condition(status.conditions, SUCCEEDED)
    reason = verdict.reason if verdict else status.phase
    if status.phase == "Succeeded":
        promoted = "promoted" if status.promoted else "not promoted"
        why = f" ({status.promotion_reason})" if status.promotion_reason else ""
        message = f"model version {status.model_version}, {promoted}{why}"
    else:
        message = f"{status.phase}: {status.message}" if status.message else status.phase
    kind: Literal["Normal", "Warning"] = "Warning" if status.phase == "Failed" else "Normal"
    return Event(type=kind, reason=reason, message=message)


def rayjob_created_status(
    previous: TrainingRunStatus, rayjob: str, num_trials: int, now: dt.datetime
) -> TrainingRunStatus:
    """The TrainingRun once its RayJob exists (created, or found after a restart)."""
    status = previous.model_copy(deep=True)
    status.ray_job_name = rayjob
    status.trials = status.trials or TrialCounts(completed=0, total=num_trials)
    status.conditions = set_condition(
        status.conditions, SUCCEEDED, "Unknown", "RayJobCreated", f"RayJob {rayjob}", now
    )
    return status


def refused_trainingrun_status(
    previous: TrainingRunStatus, reason: str, message: str, now: dt.datetime
) -> TrainingRunStatus:
    """A TrainingRun the operator will not run (its spec asks for something the admin does
    not allow): Failed at once, with the reason; no RayJob."""
    status = previous.model_copy(deep=True)
    status.phase = "Failed"
    status.message = message
    status.completion_time = status.completion_time or timestamp(now)
    status.conditions = set_condition(status.conditions, SUCCEEDED, "False", reason, message, now)
    return status


def _success(
    reading: JobReading,
    outcome: Outcome | None,
    mlflow_error: str | None,
    ended_at: dt.datetime,
    now: dt.datetime,
    grace_seconds: float,
) -> tuple[JobReading, TrainingRunPhase]:
    """The job succeeded: Succeeded once MLflow has the finished parent run."""
    if outcome is not None and outcome.state == "FINISHED":
        reason = "Promoted" if outcome.promoted else "NotPromoted"
        if outcome.promoted is None:
            reason = "Completed"
        return JobReading(verdict="succeeded", reason=reason, message=outcome.reason or ""), (
            "Succeeded"
        )
    if outcome is not None and outcome.finished:
        message = outcome.error or f"the MLflow parent run ended {outcome.state}"
        return JobReading(verdict="failed", reason="RunFailed", message=message), "Failed"
    if mlflow_error is not None:
        message = "the Ray job succeeded; waiting for MLflow to read the outcome"
        return JobReading(verdict="running", reason="WaitingForMlflow", message=message), (
            "Running"
        )
    if (now - ended_at).total_seconds() >= grace_seconds:
        message = "the Ray job succeeded but MLflow has no finished parent run for it"
        return JobReading(verdict="failed", reason="OutcomeMissing", message=message), "Failed"
    return JobReading(verdict="running", reason="ReadingOutcome"), "Running"


# --------------------------------------------------------------------------- InferenceService

RolloutState = Literal["Ready", "Failed", "Progressing"]
# KServe's raw mode copies the Deployment's Available condition: False with this reason
# while the first pods start, which is no failure.
STARTING_REASONS = frozenset({"MinimumReplicasUnavailable"})
# In raw (Standard) mode KServe's PredictorReady carries the Deployment's own reason. Only
# this one says the pods of the current template serve: during a rolling update the old
# pods keep the Deployment Available ("MinimumReplicasAvailable") and KServe says Ready.
ROLLED_OUT_REASON = "NewReplicaSetAvailable"
# modelStatus.transitionStatus values by which KServe says the model will not load.
FAILED_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})
# The reason a version whose predictor exited because it does not load fails with (KServe's own).
MODEL_LOAD_FAILED = "ModelLoadFailed"


class InferenceServiceView(BaseModel):
    """What the rollout logic reads off an InferenceService."""

    version: int | None
    # spec.models and spec.anyModel: the versions pinned by name ({} for anyModel)
    model_versions: dict[str, int] | None = None
    canary_traffic_percent: int | None
    deployment_mode: str | None
    state: RolloutState
    reason: str = ""
    message: str = ""
    url: str | None = None


def _conditions_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, dict)}


def pinned_versions(text: str | None) -> dict[str, int] | None:
    """The model-versions annotation ({"name": version, ...}); None when absent or not
    what the operator writes (then nothing counts as pinned)."""
    if not text:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    if not isinstance(found, dict):
        return None
    pinned = {
        str(name): version
        for name, version in found.items()
        if isinstance(version, int) and not isinstance(version, bool)
    }
    return pinned if len(pinned) == len(found) else None


def failed_to_load(view: InferenceServiceView, pods: list[dict[str, Any]]) -> InferenceServiceView:
    """The view, Failed if a predictor pod of its pinned version exited because that version
    does not load (UNLOADABLE_EXIT_CODE; the termination message says why). In raw mode
    KServe stays Ready on the old pods meanwhile, and would say nothing until the timeout."""
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != PREDICTOR_CONTAINER:
                continue
            for state in (container.get("state"), container.get("lastState")):
                ended = (state or {}).get("terminated") or {}
                if ended.get("exitCode") == UNLOADABLE_EXIT_CODE:
                    why = ended.get("message") or f"version {view.version} does not load"
                    return view.model_copy(
                        update={"state": "Failed", "reason": MODEL_LOAD_FAILED,
                                "message": one_line(why)}
                    )  # fmt: skip
    return view


def inferenceservice_view(isvc: dict[str, Any]) -> InferenceServiceView:
    meta = isvc.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    status = isvc.get("status") or {}
    version_text = annotations.get(ANNOTATION_MODEL_VERSION, "")
    version = int(version_text) if version_text.isdigit() else None
    model_versions = pinned_versions(annotations.get(ANNOTATION_MODEL_VERSIONS))
    canary = predictor.get("canaryTrafficPercent")

    conditions = _conditions_of(status)
    observed = status.get("observedGeneration")
    # Until KServe has looked at this generation, its conditions describe an older spec.
    current = observed is None or int(observed) >= int(meta.get("generation") or 0)
    model_status = status.get("modelStatus") or {}
    blocked = model_status.get("transitionStatus") in FAILED_TRANSITIONS
    failed = [
        c
        for kind in ("LatestDeploymentReady", "PredictorReady", "Ready")
        if (c := conditions.get(kind)) is not None
        and c.get("status") == "False"
        and (blocked or c.get("reason") not in STARTING_REASONS)
    ]
    if blocked and not failed:
        failure = model_status.get("lastFailureInfo") or {}
        failed = [
            {
                "reason": failure.get("reason") or model_status["transitionStatus"],
                "message": failure.get("message", ""),
            }
        ]
    ready = conditions.get("Ready", {}).get("status") == "True"
    mode = annotations.get(ANNOTATION_DEPLOYMENT_MODE) or status.get("deploymentMode")
    if is_raw_mode(mode) and ready:
        ready = conditions.get("PredictorReady", {}).get("reason") == ROLLED_OUT_REASON
    component = (status.get("components") or {}).get("predictor") or {}
    latest_created = component.get("latestCreatedRevision")
    latest_ready = component.get("latestReadyRevision")
    latest_is_ready = not latest_created or latest_created == latest_ready

    state: RolloutState = "Progressing"
    reason = message = ""
    if current and failed:
        state, reason, message = "Failed", failed[0].get("reason", ""), failed[0].get("message", "")
    elif current and ready and latest_is_ready:
        state = "Ready"
    elif conditions.get("Ready"):
        reason = conditions["Ready"].get("reason", "")
        message = conditions["Ready"].get("message", "")
    return InferenceServiceView(
        version=version,
        model_versions=model_versions,
        canary_traffic_percent=int(canary) if canary is not None else None,
        deployment_mode=mode,
        state=state,
        reason=reason or "",
        message=one_line(message or ""),
        url=status.get("url") or (status.get("address") or {}).get("url") or None,
    )
