"""RayJob status + MLflow outcome -> TrainingRun status; InferenceService -> rollout view."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from mlkube.api.modeldeployment import UNLOADABLE_EXIT_CODE
from mlkube.api.trainingrun import TrainingRunStatus, TrialCounts
from mlkube.operator.conditions import MLFLOW_REACHABLE, find_condition, mlflow_answered
from mlkube.operator.events import Event, mlflow_events
from mlkube.operator.status import (
    JOB_FAILING,
    OUTCOME_READABLE,
    SUCCEEDED,
    failed_to_load,
    inferenceservice_view,
    one_line,
    phase_event,
    rayjob_created_status,
    trainingrun_status,
)
from mlkube.training import outcome as tags
from mlkube.training.outcome import Outcome, outcome_from_tags

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
GRACE = 30.0


def sync(previous: TrainingRunStatus, rayjob: dict | None, **kw: object) -> TrainingRunStatus:
    args: dict = {
        "rayjob_status": rayjob,
        "rayjob_exists": rayjob is not None,
        "outcome": None,
        "mlflow_error": None,
        "mlflow_checked": True,
        "now": T0,
        "grace_seconds": GRACE,
    }
    args.update(kw)
    return trainingrun_status(previous, **args)


def outcome(state: str = "RUNNING", **kw: object) -> Outcome:
    return Outcome(run_id="r1", state=state, **kw)  # type: ignore[arg-type]


def started() -> TrainingRunStatus:
    return TrainingRunStatus(phase="Pending", ray_job_name="ins")


def test_initializing_is_pending_and_running_reads_progress() -> None:
    pending = sync(started(), {"jobDeploymentStatus": "Initializing"}, mlflow_checked=False)
    assert pending.phase == "Pending"
    assert find_condition(pending.conditions, MLFLOW_REACHABLE) is None
    running = sync(
        pending,
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
         "startTime": "2026-01-01T11:59:00Z"},
        outcome=outcome(trials_completed=1, trials_total=2, best_metric="mae", best_value=2.5,
                        best_params={"lr": "0.1"}),
    )  # fmt: skip
    assert running.phase == "Running"
    assert running.start_time == "2026-01-01T11:59:00Z"
    assert running.trials and (running.trials.completed, running.trials.total) == (1, 2)
    assert running.best and running.best.value == 2.5 and running.best.params == {"lr": "0.1"}
    assert running.mlflow_run_id == "r1"


def test_success_takes_the_outcome_from_mlflow() -> None:
    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
            "endTime": "2026-01-01T12:00:00Z"}  # fmt: skip
    final = outcome("FINISHED", model_version=3, promoted=True, reason="beats champion by 5%")
    status = sync(started(), done, outcome=final)
    assert status.phase == "Succeeded"
    assert (status.model_version, status.promoted) == (3, True)
    assert status.promotion_reason == "beats champion by 5%"
    assert status.completion_time == "2026-01-01T12:00:00Z"
    verdict = find_condition(status.conditions, SUCCEEDED)
    assert verdict and (verdict.status, verdict.reason) == ("True", "Promoted")
    # Terminal phases are final.
    assert sync(status, {"jobDeploymentStatus": "Failed"}) == status


def test_success_waits_for_mlflow_then_gives_up_without_an_outcome() -> None:
    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
            "endTime": "2026-01-01T12:00:00Z"}  # fmt: skip
    down = sync(started(), done, mlflow_error="connection refused")
    assert down.phase == "Running"
    reachable = find_condition(down.conditions, MLFLOW_REACHABLE)
    assert reachable and reachable.status == "False" and "refused" in reachable.message
    soon = sync(started(), done, now=T0 + dt.timedelta(seconds=5))
    assert soon.phase == "Running"
    late = sync(started(), done, now=T0 + dt.timedelta(seconds=GRACE + 1))
    assert late.phase == "Failed"
    verdict = find_condition(late.conditions, SUCCEEDED)
    assert verdict and verdict.reason == "OutcomeMissing"


def test_failed_rayjob_reason_and_message() -> None:
    message = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated "
        "to 20,000 chars):\nTraceback...\nerror: dataset not found: /nope.csv\n"
    )
    status = sync(
        started(),
        {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
         "message": message},
    )  # fmt: skip
    assert status.phase == "Failed"
    verdict = find_condition(status.conditions, SUCCEEDED)
    assert verdict and (verdict.status, verdict.reason) == ("False", "AppFailed")
    assert status.message and status.message.endswith("error: dataset not found: /nope.csv")
    # The flow's own error tag in MLflow wins over Ray's log tail.
    tagged = sync(
        started(), {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": message},
        outcome=outcome("FAILED", error="FileNotFoundError: /nope.csv"),
    )  # fmt: skip
    assert tagged.message == "FileNotFoundError: /nope.csv"


def test_job_failed_while_deployment_running_fails_after_grace() -> None:
    failing = {"jobDeploymentStatus": "Running", "jobStatus": "FAILED", "message": "boom"}
    first = sync(started(), failing)
    assert first.phase == "Running"
    marker = find_condition(first.conditions, JOB_FAILING)
    assert marker and marker.status == "True"
    still = sync(first, failing, now=T0 + dt.timedelta(seconds=GRACE - 1))
    assert still.phase == "Running"
    after = sync(still, failing, now=T0 + dt.timedelta(seconds=GRACE))
    assert after.phase == "Failed" and after.message == "boom"
    assert find_condition(after.conditions, JOB_FAILING) is None


def test_a_rayjob_retrying_after_a_failed_attempt_is_still_running() -> None:
    """spec.ray.retries: KubeRay starts a new Ray cluster; the failed attempt's jobStatus is
    still there meanwhile, and no grace period turns it into a failure."""
    retrying = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "message": "head lost"}
    first = sync(started(), retrying)
    later = sync(first, retrying, now=T0 + dt.timedelta(seconds=10 * GRACE))
    assert first.phase == later.phase == "Running"


def test_deadline_exceeded_and_deleted_rayjob() -> None:
    deadline = sync(
        started(), {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "x"}
    )
    verdict = find_condition(deadline.conditions, SUCCEEDED)
    assert verdict and verdict.reason == "DeadlineExceeded"
    running = TrainingRunStatus(phase="Running", ray_job_name="ins")
    gone = sync(running, None)
    assert gone.phase == "Failed" and gone.message == "the RayJob was deleted"
    # ... unless MLflow says the run finished.
    recorded = sync(running, None, outcome=outcome("FINISHED", model_version=1, promoted=False))
    assert recorded.phase == "Succeeded" and recorded.promoted is False
    assert sync(started(), None).phase == "Pending"


def test_one_line() -> None:
    assert one_line("") == ""
    assert one_line("plain") == "plain"
    assert one_line("head:\n  a\n  last words \n") == "head: last words"
    tail = "failed:\nTraceback\n  File x\nValueError: bad\n12:00 | INFO | prefect - Stopping\n"
    assert one_line(tail) == "failed: ValueError: bad"
    flow = "failed:\nKeyError: 'x'\nerror: dataset not found\nINFO shutting down\n"
    assert one_line(flow) == "failed: error: dataset not found"


def isvc(generation: int, status: dict, annotations: dict | None = None, **predictor: object):
    return {
        "metadata": {"generation": generation,
                     "annotations": {"mlkube.io/model-version": "2", **(annotations or {})}},
        "spec": {"predictor": predictor},
        "status": status,
    }  # fmt: skip


def conds(**kinds: str) -> list[dict]:
    return [
        {"type": k, "status": v, "reason": f"R{k}", "message": f"m {k}"} for k, v in kinds.items()
    ]


def test_inferenceservice_view() -> None:
    ready = inferenceservice_view(
        isvc(2, {"observedGeneration": 2, "url": "http://x", "conditions": conds(Ready="True"),
                 "components": {"predictor": {"latestCreatedRevision": "a-2",
                                              "latestReadyRevision": "a-2"}}},
             canaryTrafficPercent=10),
    )  # fmt: skip
    assert (ready.state, ready.version, ready.canary_traffic_percent, ready.url) == (
        "Ready",
        2,
        10,
        "http://x",
    )
    stale = inferenceservice_view(
        isvc(3, {"observedGeneration": 2, "conditions": conds(Ready="True")})
    )
    assert stale.state == "Progressing"
    starting = inferenceservice_view(
        isvc(2, {"observedGeneration": 2, "conditions": conds(Ready="True"),
                 "components": {"predictor": {"latestCreatedRevision": "a-3",
                                              "latestReadyRevision": "a-2"}}})
    )  # fmt: skip
    assert starting.state == "Progressing"
    failed = inferenceservice_view(
        isvc(2, {"observedGeneration": 2,
                 "conditions": conds(Ready="False", PredictorReady="False")},
             annotations={"serving.kserve.io/deploymentMode": "Standard"})
    )  # fmt: skip
    assert (failed.state, failed.reason, failed.deployment_mode) == (
        "Failed",
        "RPredictorReady",
        "Standard",
    )


def predictor_pod(container: str, **states: dict[str, Any]) -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"name": container, **states}]}}


def test_a_predictor_that_exited_because_its_version_does_not_load_fails_the_rollout() -> None:
    """In raw mode KServe stays Ready on the old pods while the new one crash-loops; the
    server's exit status on the new version's pods tells the operator at once."""
    rolling = inferenceservice_view(
        isvc(2, {"observedGeneration": 2, "conditions": conds(Ready="True")},
             annotations={"serving.kserve.io/deploymentMode": "Standard"})
    )  # fmt: skip
    assert rolling.state == "Progressing"
    said = "models:/insurance/2 does not load: not a model"
    crashed = {"terminated": {"exitCode": UNLOADABLE_EXIT_CODE, "message": said}}
    looping = predictor_pod("kserve-container", state={"waiting": {"reason": "CrashLoopBackOff"}},
                            lastState=crashed)  # fmt: skip
    failed = failed_to_load(rolling, [predictor_pod("kserve-container", state={"running": {}}),
                                      looping])  # fmt: skip
    assert (failed.state, failed.reason, failed.message) == ("Failed", "ModelLoadFailed", said)
    just_exited = failed_to_load(rolling, [predictor_pod("kserve-container", state=crashed)])
    assert just_exited.state == "Failed"
    # Other exits (OOM, a bug) and other containers are left to the rollout timeout.
    other = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    for pods in ([], [predictor_pod("kserve-container", lastState=other)],
                 [predictor_pod("queue-proxy", lastState=crashed)]):  # fmt: skip
        assert failed_to_load(rolling, pods) == rolling
    silent = {"terminated": {"exitCode": UNLOADABLE_EXIT_CODE}}
    unsaid = failed_to_load(rolling, [predictor_pod("kserve-container", lastState=silent)])
    assert unsaid.message == "version 2 does not load"


def test_status_patch_writes_defaults_and_removes_what_is_gone() -> None:
    from mlkube.operator.status import status_patch

    assert status_patch({}, TrainingRunStatus()) == {"phase": "Pending", "conditions": []}
    stored = {"phase": "Running", "message": "old", "conditions": [], "kopf": {"x": 1}}
    new = TrainingRunStatus(phase="Running")
    assert status_patch(stored, new) == {"message": None}


def test_a_raw_deployment_still_starting_is_progressing_until_kserve_says_the_load_failed() -> None:
    """KServe's raw mode reports the Deployment's Available=False (MinimumReplicasUnavailable)
    while the first pod starts (seen on the real node); only a blocked model is a failure."""
    starting = [
        {"type": t, "status": "False", "reason": "MinimumReplicasUnavailable",
         "message": "Deployment does not have minimum availability."}
        for t in ("PredictorReady", "Ready")
    ]  # fmt: skip
    pending = inferenceservice_view(
        isvc(1, {"observedGeneration": 1, "conditions": starting,
                 "modelStatus": {"transitionStatus": "InProgress"}})
    )  # fmt: skip
    assert pending.state == "Progressing"
    crashing = inferenceservice_view(
        isvc(1, {"observedGeneration": 1, "conditions": starting,
                 "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                 "lastFailureInfo": {"reason": "ModelLoadFailed",
                                                     "message": "exit code 1"}}})
    )  # fmt: skip
    assert (crashing.state, crashing.reason) == ("Failed", "MinimumReplicasUnavailable")
    blocked_only = inferenceservice_view(
        isvc(1, {"observedGeneration": 1,
                 "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                 "lastFailureInfo": {"reason": "ModelLoadFailed"}}})
    )  # fmt: skip
    assert (blocked_only.state, blocked_only.reason) == ("Failed", "ModelLoadFailed")


def test_a_rayjob_failing_after_the_flow_finished_keeps_mlflows_outcome() -> None:
    """Seen on the real node: the Ray head deleted right after the search ended; KubeRay
    marks the RayJob Failed (it cannot read the job's end), while MLflow has the finished
    parent run and the promoted version."""
    lost_head = {
        "jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
        "reason": "JobDeploymentStatusTransitionGracePeriodExceeded",
        "message": "The RayJob submitter finished but the ray job did not reach terminal state",
        "endTime": "2026-01-01T11:59:30Z",
    }  # fmt: skip
    done = sync(
        started(), lost_head,
        outcome=outcome("FINISHED", model_version=3, promoted=True, reason="beats champion"),
    )  # fmt: skip
    assert (done.phase, done.model_version, done.promoted) == ("Succeeded", 3, True)
    still_running = sync(started(), lost_head, outcome=outcome("RUNNING"))
    assert still_running.phase == "Failed"
    assert "did not reach terminal state" in (still_running.message or "")


PARSED_TAGS = [
    tags.TAG_TRIALS_TOTAL, tags.TAG_TRIALS_COMPLETED, tags.TAG_BEST_VALUE, tags.TAG_BEST_PARAMS,
    tags.TAG_HOLDOUT_VALUE, tags.TAG_MODEL_VERSION, tags.TAG_PROMOTED,
]  # fmt: skip


@pytest.mark.parametrize("value", ["abc", "[1,2]", "{", "nan", "-3", "1e999"])
@pytest.mark.parametrize("key", PARSED_TAGS)
def test_an_outcome_tag_that_does_not_parse_is_a_condition_not_a_crash(
    key: str, value: str
) -> None:
    good = {tags.TAG_TRIALS_TOTAL: "4", tags.TAG_TRIALS_COMPLETED: "4", tags.TAG_BEST_METRIC: "mae",
            tags.TAG_BEST_VALUE: "2.5", tags.TAG_BEST_PARAMS: '{"lr": 0.1}',
            tags.TAG_MODEL_VERSION: "3", tags.TAG_PROMOTED: "true"}  # fmt: skip
    if key == tags.TAG_BEST_PARAMS and value in ("-3", "nan", "1e999"):
        pytest.skip("JSON that is no dict is covered by [1,2]")
    if key in (tags.TAG_BEST_VALUE, tags.TAG_HOLDOUT_VALUE) and value == "-3":
        pytest.skip("a metric may be negative")
    read = outcome_from_tags("r1", "FINISHED", {**good, key: value})
    assert read.unreadable_tags == [key]
    status = sync(started(), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
                  outcome=read)  # fmt: skip
    condition = find_condition(status.conditions, OUTCOME_READABLE)
    assert condition is not None and condition.status == "False"
    assert condition.reason == "UnreadableTags" and key in condition.message
    assert value not in condition.message  # the tag is named, its value is not echoed
    status.model_dump_json()  # what is written to the API server: finite numbers only
    # The next read with good tags clears it.
    fixed = sync(started(), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                 outcome=outcome_from_tags("r1", "RUNNING", good))  # fmt: skip
    assert find_condition(fixed.conditions, OUTCOME_READABLE) is None


def test_an_unknown_run_state_is_unreadable_not_a_crash() -> None:
    read = outcome_from_tags("r1", "EXPLODED", {})
    assert (read.state, read.unreadable_tags) == ("RUNNING", ["status"])


def test_raw_mode_is_ready_only_once_the_new_replicaset_serves() -> None:
    """KServe's raw mode says Ready while a rolling update is stuck, because the old pods
    keep the Deployment Available; its PredictorReady reason tells the two apart."""

    def raw(predictor_reason: str) -> dict[str, object]:
        conditions = [
            {"type": "PredictorReady", "status": "True", "reason": predictor_reason},
            {"type": "Ready", "status": "True"},
        ]
        return isvc(2, {"observedGeneration": 2, "deploymentMode": "Standard",
                        "conditions": conditions})  # fmt: skip

    assert inferenceservice_view(raw("NewReplicaSetAvailable")).state == "Ready"
    rolling = inferenceservice_view(raw("MinimumReplicasAvailable"))
    assert (rolling.state, rolling.version) == ("Progressing", 2)
    # Knative mode keeps reading revisions, not the Deployment's reason.
    knative = isvc(2, {"observedGeneration": 2, "conditions": conds(Ready="True")})
    assert inferenceservice_view(knative).state == "Ready"


def test_the_events_of_a_trainingrun_entering_a_phase_say_its_outcome() -> None:
    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    promoted = sync(started(), done, outcome=outcome(
        "FINISHED", model_version=3, promoted=True, reason="beats champion by 5%"
    ))  # fmt: skip
    assert phase_event(promoted) == Event(
        reason="Promoted", message="model version 3, promoted (beats champion by 5%)"
    )
    kept = sync(started(), done, outcome=outcome("FINISHED", model_version=4, promoted=False))
    assert phase_event(kept) == Event(reason="NotPromoted", message="model version 4, not promoted")
    failed = sync(started(), {"jobDeploymentStatus": "Failed", "message": "head pod evicted"})
    assert phase_event(failed) == Event(
        type="Warning", reason="RayJobFailed", message="Failed: head pod evicted"
    )
    running = sync(started(), {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    assert phase_event(running) == Event(reason="Running", message="Running")


def test_mlflow_going_away_and_coming_back_are_events_once() -> None:
    up = mlflow_answered([], T0)
    down = mlflow_answered(up, T0, "Unreachable", "MLflow did not answer")
    assert mlflow_events([], up) == []  # the first answer is no news
    assert mlflow_events(up, down) == [
        Event(type="Warning", reason="MlflowUnreachable", message="MLflow did not answer")
    ]
    assert mlflow_events(down, mlflow_answered(down, T0, "Unreachable", "again")) == []
    assert mlflow_events(down, mlflow_answered(down, T0)) == [
        Event(reason="MlflowReachable", message="MLflow answers again")
    ]


def test_a_trainingrun_whose_rayjob_exists_waits_for_its_trials() -> None:
    created = rayjob_created_status(TrainingRunStatus(), "ins", 8, T0)
    assert (created.phase, created.ray_job_name) == ("Pending", "ins")
    assert created.trials == TrialCounts(completed=0, total=8)
    verdict = find_condition(created.conditions, SUCCEEDED)
    assert verdict and (verdict.status, verdict.reason) == ("Unknown", "RayJobCreated")
    # Found again after a restart: what the status already counted stays.
    running = created.model_copy(update={"trials": TrialCounts(completed=3, total=8)})
    assert rayjob_created_status(running, "ins", 8, T0).trials == TrialCounts(completed=3, total=8)
