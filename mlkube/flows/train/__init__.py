"""The train flow: tune -> fit -> evaluate -> register -> promote, after load and validate.

Runs in-process for `mlkube train`, and as a RayJob's entrypoint on a cluster:
`python -m mlkube.flows.train --spec-json '<TrainingRun as JSON>'` (or `--spec-file F`).
Loading and validating happen before the flow run starts, so that bad input is refused
with one line and leaves nothing behind: no flow run, no MLflow run, no model version.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from pydantic import BaseModel

from mlkube.api import ManifestError, TrainingRun, UserError, load_manifest, parse_resource
from mlkube.api.errors import first_line
from mlkube.flows.logs import quiet_console
from mlkube.flows.prefect_api import start_prefect_api, wait_for_prefect_api
from mlkube.local import is_local_store, local_artifact_root, local_tracking_uri
from mlkube.training import outcome, registry
from mlkube.training.ownership import owner_namespace
from mlkube.training.prepare import MISSING_EXTRA, Prepared, preflight, prepare
from mlkube.training.tracking import RunTracker, TrialRecord, end_orphaned_runs
from mlkube.training.trial_workers import leave_trial_workers
from mlkube.training.tune import SearchSettings, first_trial_workers, run_search, start_ray


class TrainingFailed(UserError):
    """The flow could not finish; the message is one line for the user."""


class TrialSummary(BaseModel):
    number: int
    params: dict[str, Any]
    value: float | None
    epochs: int
    error: str | None = None


class TrainResult(BaseModel):
    trainingrun: str
    run_id: str
    experiment_id: str
    metric: str
    mode: str
    trials: list[TrialSummary]
    best_params: dict[str, Any]
    best_value: float
    holdout: dict[str, float]
    model_name: str
    version: int
    promoted: bool
    alias: str
    reason: str
    champion_version: int | None


def experiment_for(client: Any, model_name: str, tracking_uri: str) -> str:
    """The experiment named after the model; local stores keep artifacts under MLKUBE_HOME."""
    found = client.get_experiment_by_name(model_name)
    if found is not None:
        return str(found.experiment_id)
    local = is_local_store(tracking_uri)
    location = f"{local_artifact_root()}/{model_name}" if local else None
    return str(client.create_experiment(model_name, artifact_location=location))


@task(name="tune", cache_policy=NO_CACHE)
def tune_task(
    prepared: Prepared, tracker: RunTracker, experiment: Path, resuming: bool
) -> TrialRecord:
    finished = tracker.finished_results() if resuming else None
    known = run_search(
        prepared.task, prepared.data, prepared.settings, tracker, experiment, finished
    )
    if resuming:
        tracker.forget_unclaimed(known)
    tracker.finish_open_trials()
    if tracker.best is None:
        errors = [t.error for t in tracker.trials.values() if t.error]
        raise TrainingFailed(
            "no trial finished" + (f"; first error: {errors[0]}" if errors else "")
        )
    return tracker.best


@task(name="fit-and-log", cache_policy=NO_CACHE)
def fit_and_log(prepared: Prepared, best: TrialRecord, experiment_id: str, run_id: str) -> str:
    """Refits the best configuration on all of the search data and logs it to MLflow."""
    import mlflow

    model = prepared.task.fit(best.params, prepared.data, prepared.settings.seed)
    # Tasks log through MLflow's fluent API; its process-wide active experiment must be
    # this run's, whatever ran in this process before.
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_id=run_id):
        return prepared.task.log_model(model, prepared.data, name="model")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(prepared: Prepared, client: Any, model_uri: str) -> registry.Evaluation:
    spec = prepared.run.spec
    return registry.evaluate(
        client,
        prepared.task,
        prepared.data,
        model_uri,
        spec.model.name,
        spec.promotion.alias,
        prepared.settings.metric,
    )


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    prepared: Prepared,
    client: Any,
    model_uri: str,
    evaluation: registry.Evaluation,
    decision: registry.Decision,
    shared: bool,
) -> int:
    """Claims the registered model for the run's namespace (or finds it is not that
    namespace's: ModelNotOwned, nothing registered), then registers the version."""
    run = prepared.run
    namespace = owner_namespace(run.metadata.namespace)
    registry.claim(client, run.spec.model.name, namespace, shared)
    metric = evaluation.metric
    tags = {
        outcome.TAG_NAME: run.metadata.name,
        outcome.TAG_UID: run.metadata.uid or "",
        outcome.TAG_NAMESPACE: namespace,
        f"holdout.{metric}": repr(evaluation.new[metric]),
    }
    return registry.register(model_uri, run.spec.model.name, tags, decision.reason)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(
    prepared: Prepared,
    client: Any,
    tracking_uri: str,
    version: int,
    evaluation: registry.Evaluation,
    decide_on: Callable[[registry.Evaluation], registry.Decision],
    shared: bool,
) -> registry.GateResult:
    """The promotion gate on the registered version (registry.promote)."""
    run = prepared.run
    return registry.promote(
        client,
        tracking_uri,
        evaluation,
        decide_on,
        lambda champion: registry.score_version(
            prepared.task, prepared.data, run.spec.model.name, champion
        ),
        name=run.spec.model.name,
        version=version,
        alias=run.spec.promotion.alias,
        namespace=owner_namespace(run.metadata.namespace),
        shared=shared,
    )


def default_progress(trial: TrialRecord, tracker: RunTracker) -> None:
    value = trial.metrics.get(tracker.metric)
    shown = f"failed: {trial.error}" if trial.error else f"{tracker.metric}={value:.6g}"
    best = tracker.best.metrics[tracker.metric] if tracker.best else float("nan")
    print(
        f"trial {tracker.completed}/{tracker.total} done (#{trial.number}): {shown}"
        f"  best {tracker.metric}={best:.6g}",
        file=sys.stderr,
        flush=True,
    )


def parent_run_tags(run: TrainingRun, settings: SearchSettings) -> dict[str, str]:
    return {
        outcome.TAG_ROLE: "parent",
        outcome.TAG_UID: run.metadata.uid or "",
        outcome.TAG_NAME: run.metadata.name,
        outcome.TAG_NAMESPACE: run.metadata.namespace or "",
        outcome.TAG_TASK: run.spec.task,
        outcome.TAG_TRIALS_TOTAL: str(settings.num_trials),
        outcome.TAG_TRIALS_COMPLETED: "0",
        outcome.TAG_MODEL_NAME: run.spec.model.name,
        outcome.TAG_SPEC_DIGEST: spec_digest(run),
    }


STOPPED_BY_SIGTERM = (
    "stopped by SIGTERM (pod deleted or job stopped); the next attempt of this TrainingRun "
    "resumes its search"
)


def stopped_from_outside(error: BaseException) -> bool:
    """SIGTERM, as mlkube.training.tune.start_ray turns it into an exit."""
    return isinstance(error, SystemExit) and error.code == signal.SIGTERM


def spec_digest(run: TrainingRun) -> str:
    """What a search depends on: a resumed search must have been started by the same spec."""
    text = json.dumps(run.spec.to_k8s(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def resumable_parent(client: Any, experiment_id: str, run: TrainingRun) -> Any:
    """The parent run an earlier attempt of this TrainingRun left RUNNING (its driver
    died) for the same spec, if any: its search can go on."""
    from mlflow.entities import ViewType

    wanted = (
        f"{outcome.trainingrun_filter(run.metadata.uid or '', run.metadata.namespace or '')}"
        f" and attributes.status = 'RUNNING' and tags.`{outcome.TAG_SPEC_DIGEST}` = "
        f"'{spec_digest(run)}'"
    )
    found = client.search_runs(
        [experiment_id], wanted, run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    return found[0] if found else None


def end_orphans(client: Any, experiment_id: str, run: TrainingRun, keep: str | None = None) -> None:
    """A previous attempt of this TrainingRun whose driver died left its parent run
    RUNNING and maybe a version without an alias: say so in MLflow before starting. `keep`
    is a parent run whose search this attempt resumes: it stays RUNNING."""
    uid = run.metadata.uid or ""
    ended = end_orphaned_runs(
        client, experiment_id, uid, run.metadata.namespace or "",
        "KILLED: its train flow stopped without ending this run (driver killed or pod "
        "lost); ended when the next attempt of the same TrainingRun started",
        keep=keep,
    )  # fmt: skip
    stopped = [*ended, *([keep] if keep else [])]
    if stopped:
        registry.explain_versions_without_alias(
            client, run.spec.model.name, uid,
            f"not promoted: the train flow of run {stopped[0]} stopped after registering this "
            "version and before setting its alias (driver killed or pod lost)",
            run_ids=set(stopped),
        )  # fmt: skip


def open_parent_run(
    client: Any, experiment_id: str, prepared: Prepared, show_progress: bool
) -> tuple[str, bool]:
    """The parent run of this attempt and whether it resumes an earlier attempt's search:
    one parent run per TrainingRun, however often its driver dies."""
    from mlkube.training.tune import can_resume

    run, settings = prepared.run, prepared.settings
    previous = resumable_parent(client, experiment_id, run)
    if previous is not None and can_resume(search_experiment(run)):
        run_id = str(previous.info.run_id)
        end_orphans(client, experiment_id, run, keep=run_id)
        earlier = previous.data.tags.get(outcome.TAG_RESUMED, "0")
        times = int(earlier) + 1 if earlier.isdigit() else 1
        client.set_tag(run_id, outcome.TAG_RESUMED, str(times))
        if outcome.TAG_ERROR in previous.data.tags:  # how the last driver stopped: past now
            client.delete_tag(run_id, outcome.TAG_ERROR)
        if show_progress:
            done = previous.data.tags.get(outcome.TAG_TRIALS_COMPLETED, "0")
            print(
                f"resuming the search of mlflow run {run_id}: {done} of "
                f"{settings.num_trials} trials done before its driver stopped",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        return run_id, True
    end_orphans(client, experiment_id, run)
    created = client.create_run(
        experiment_id, run_name=run.metadata.name, tags=parent_run_tags(run, settings)
    )
    return str(created.info.run_id), False


def search_experiment(run: TrainingRun) -> Path:
    """Where Tune keeps this TrainingRun's search: by namespace, name and uid."""
    from mlkube.training.tune import experiment_dir

    meta = run.metadata
    return experiment_dir(f"{meta.namespace or 'local'}.{meta.name}.{meta.uid}")


@flow(name="train", log_prints=False, validate_parameters=False)
def train_flow(
    prepared: Prepared, show_progress: bool = True, allow_shared_models: bool = False
) -> TrainResult:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    run, settings = prepared.run, prepared.settings
    tracking_uri = run.spec.mlflow.tracking_uri_or(local_tracking_uri())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    # Before any work and any record: a model of another namespace is refused at once.
    registry.check_owner(
        client, run.spec.model.name, owner_namespace(run.metadata.namespace), allow_shared_models
    )
    experiment_id = experiment_for(client, run.spec.model.name, tracking_uri)
    run_id, resuming = open_parent_run(client, experiment_id, prepared, show_progress)
    try:
        tracker = RunTracker(
            client, experiment_id, run_id, settings.metric, settings.mode, settings.num_trials,
            default_progress if show_progress else None,
        )  # fmt: skip
        if resuming:
            tracker.resume()
        else:
            described = prepared.data.description.items()
            params = [Param(f"data.{k}", str(v)[:500]) for k, v in described]
            client.log_batch(run_id, params=params)
        best = tune_task(prepared, tracker, search_experiment(run), resuming)
        model_uri = fit_and_log(prepared, best, experiment_id, run_id)
        evaluation = evaluate_task(prepared, client, model_uri)
        promotion = run.spec.promotion

        def decide_on(scored: registry.Evaluation) -> registry.Decision:
            return registry.decide(
                scored, settings.mode, promotion.min_improvement, promotion.enabled
            )

        decision = decide_on(evaluation)
        version = register_task(
            prepared, client, model_uri, evaluation, decision, allow_shared_models
        )
        gate = promote_task(
            prepared, client, tracking_uri, version, evaluation, decide_on, allow_shared_models
        )
        decision = gate.decision
        client.log_batch(
            run_id,
            metrics=[Metric(f"holdout_{k}", v, 0, 0) for k, v in evaluation.new.items()],
            tags=[
                RunTag(outcome.TAG_HOLDOUT_VALUE, repr(evaluation.new[settings.metric])),
                RunTag(outcome.TAG_MODEL_VERSION, str(version)),
                RunTag(outcome.TAG_PROMOTED, str(decision.promote).lower()),
                RunTag(outcome.TAG_PROMOTION_REASON, decision.reason),
            ],
        )
        client.set_terminated(run_id, "FINISHED")
    except BaseException as error:
        if stopped_from_outside(error):
            # A pod being deleted, a job stopped: like a driver killed outright, the run stays
            # RUNNING so that the next attempt resumes the search (or ends the run).
            client.set_tag(run_id, outcome.TAG_ERROR, STOPPED_BY_SIGTERM)
            raise
        client.set_tag(run_id, outcome.TAG_ERROR, f"{type(error).__name__}: {first_line(error)}")
        client.set_terminated(
            run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        )
        shutil.rmtree(search_experiment(run), ignore_errors=True)  # nothing will resume it
        raise
    # The search is over and recorded: Tune's state and the trials' checkpoints can go.
    shutil.rmtree(search_experiment(run), ignore_errors=True)
    return TrainResult(
        trainingrun=run.metadata.name,
        run_id=run_id,
        experiment_id=experiment_id,
        metric=settings.metric,
        mode=settings.mode,
        trials=[
            TrialSummary(
                number=t.number,
                params=t.params,
                value=t.metrics.get(settings.metric),
                epochs=t.epochs,
                error=t.error,
            )
            for t in sorted(tracker.trials.values(), key=lambda t: t.number)
        ],
        best_params=best.params,
        best_value=best.metrics[settings.metric],
        holdout=evaluation.new,
        model_name=run.spec.model.name,
        version=version,
        promoted=decision.promote,
        alias=run.spec.promotion.alias,
        reason=decision.reason,
        champion_version=gate.evaluation.champion_version,
    )


def local_uid(run: TrainingRun) -> str:
    """The identity of a TrainingRun trained with no cluster (which gives none): its
    namespace and name, so that running the same one again finds what the last attempt
    left (a search to resume, a parent run to end)."""
    return f"local-{run.metadata.namespace or 'default'}-{run.metadata.name}"


def train(
    run: TrainingRun,
    show_progress: bool = True,
    allow_shared_models: bool = False,
    trial_workers_ahead: bool = False,
) -> TrainResult:
    """Validate, then run the flow: what `mlkube train` and the RayJob entrypoint do.
    `allow_shared_models`: the admin lets namespaces use each other's registered models.
    `trial_workers_ahead`: start the first trials' Ray workers as soon as Ray is connected,
    unless the run before left them, and leave the next run's as this one ends."""
    from mlkube.training.tune import search_lock

    if not run.metadata.uid:
        run = run.model_copy(deep=True)
        run.metadata.uid = local_uid(run)
    prepared = prepare(run)
    workers_ahead = first_trial_workers(prepared.settings) if trial_workers_ahead else 0
    # Ray starts while Prefect starts the flow run and MLflow opens its store.
    start_ray(trial_workers=workers_ahead, trial_modules=prepared.task.trial_modules)
    # Imported now, while Ray and Prefect's API come up, rather than after the search.
    for module in prepared.task.model_modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as missing:
            raise UserError(
                f"spec.task: {run.spec.task} needs {missing.name}, which this install lacks: "
                f"{MISSING_EXTRA}"
            ) from None
    wait_for_prefect_api()
    try:
        with search_lock(search_experiment(run)):
            return train_flow(prepared, show_progress, allow_shared_models)
    finally:
        leave_trial_workers(workers_ahead)  # the next run's, on this warm cluster


def read_trainingrun(spec_json: str | None, spec_file: str | None) -> TrainingRun:
    if spec_file:
        return load_manifest(Path(spec_file), TrainingRun)
    try:
        document = json.loads(spec_json or "")
    except json.JSONDecodeError as error:
        raise ManifestError(f"--spec-json: malformed JSON: {error.msg}") from None
    return parse_resource(document, "--spec-json", TrainingRun)


def entrypoint_parser() -> argparse.ArgumentParser:
    """The command line of `python -m mlkube.flows.train` (run by mlkube.cli.main)."""
    parser = argparse.ArgumentParser(prog="python -m mlkube.flows.train", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec-file", help="TrainingRun YAML file")
    source.add_argument("--spec-json", help="TrainingRun object as JSON")
    parser.add_argument(
        "--allow-shared-models",
        action="store_true",
        help="register and promote versions of models other namespaces own (the operator "
        "passes it when the admin allows shared models)",
    )
    parser.add_argument(
        "--trial-workers-ahead",
        action="store_true",
        help="start the first trials' Ray workers while the flow sets up, and the next "
        "run's as it ends (the operator passes it on warm clusters)",
    )
    parser.set_defaults(handler=run_entrypoint)
    return parser


def run_entrypoint(args: argparse.Namespace) -> int:
    """Trains and prints the result as JSON; bad input raises UserError (exit 2)."""
    quiet_console(verbose=True)
    run = read_trainingrun(args.spec_json, args.spec_file)
    preflight(run)
    start_prefect_api()
    result = train(
        run,
        allow_shared_models=args.allow_shared_models,
        trial_workers_ahead=args.trial_workers_ahead,
    )
    print(result.model_dump_json())
    return 0
