"""MLflow records of a TrainingRun: one parent run, one nested run per trial, live tags."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from mlkube.training import outcome
from mlkube.training.search_space import config_key, logged_value, plain
from mlkube.training.tasks.base import Mode


@dataclass
class TrialRecord:
    number: int
    trial_id: str
    run_id: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    error: str | None = None
    done: bool = False


def is_better(candidate: float, incumbent: float | None, mode: Mode) -> bool:
    if incumbent is None or math.isnan(incumbent):
        return not math.isnan(candidate)
    return candidate < incumbent if mode == "min" else candidate > incumbent


ProgressSink = Callable[["TrialRecord", "RunTracker"], None]


class RunTracker:
    """Implements the Tune driver's TrialObserver by writing to MLflow from the driver
    (about 16 ms a trial; logging from the trial workers costs 1.5 s per worker).

    A tracker of a resumed search starts with the trial runs the earlier attempt left
    (`resume`): finished ones count and are not logged again, and an unfinished one goes on
    in its own run when Tune resumes it."""

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        parent_run_id: str,
        metric: str,
        mode: Mode,
        total: int,
        on_trial_done: ProgressSink | None = None,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric = metric
        self.mode: Mode = mode
        self.total = total
        self.trials: dict[str, TrialRecord] = {}
        self.best: TrialRecord | None = None
        self.on_trial_done = on_trial_done
        # Runs of an earlier attempt that Tune has not spoken of (yet), by configuration.
        self.unclaimed: dict[str, TrialRecord] = {}

    @property
    def completed(self) -> int:
        return sum(1 for t in self.trials.values() if t.done)

    def resume(self) -> None:
        """Takes in the trial runs an earlier attempt logged under the parent run."""
        from mlflow.entities import ViewType

        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{outcome.TAG_PARENT_RUN}` = '{self.parent_run_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=50000,
        )
        for run in found:
            tags = run.data.tags
            trial_id = tags.get(outcome.TAG_TRIAL_ID)
            number = _number(run.info.run_name)
            if not trial_id or number is None:
                continue
            status = run.info.status
            record = TrialRecord(
                number, trial_id, run.info.run_id,
                {k: logged_value(v) for k, v in run.data.params.items()},
                metrics=dict(run.data.metrics),
                error=tags.get(outcome.TAG_ERROR) if status == "FAILED" else None,
                done=status in ("FINISHED", "FAILED"),
            )  # fmt: skip
            if not record.done:
                # Tune's saved state can be a second older than what was logged: epochs up
                # to this one are not logged again when the trial goes on.
                history = self.client.get_metric_history(run.info.run_id, self.metric)
                record.epochs = max((point.step for point in history), default=0)
            self.trials[trial_id] = record
            self.unclaimed[config_key(record.params)] = record
            if record.done and record.error is None:
                self._consider(record)

    def finished_results(self) -> dict[str, dict[str, float]]:
        """The results of trials that finished, by trial id and by configuration: what a
        resumed search reports for them instead of training them again."""
        results: dict[str, dict[str, float]] = {}
        for record in self.trials.values():
            if record.done and record.error is None and record.metrics:
                results[record.trial_id] = record.metrics
                results[config_key(record.params)] = record.metrics
        return results

    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        params = {k: plain(v) for k, v in config.items()}
        known = self.trials.get(trial_id) or self.unclaimed.get(config_key(params))
        if known is not None:
            self._claim(known, trial_id)
            return
        number = max((t.number for t in self.trials.values()), default=0) + 1
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number:03d}",
            tags={
                outcome.TAG_PARENT_RUN: self.parent_run_id,
                outcome.TAG_ROLE: "trial",
                outcome.TAG_TRIAL_ID: trial_id,
            },
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.trials[trial_id] = TrialRecord(number, trial_id, run.info.run_id, params)

    def _claim(self, record: TrialRecord, trial_id: str) -> None:
        """An earlier attempt's run is this trial's: Tune resumed it, or (seeded) drew the
        same configuration again under a new id."""
        self.unclaimed.pop(config_key(record.params), None)
        if record.trial_id != trial_id:
            self.trials.pop(record.trial_id, None)
            record.trial_id = trial_id
            self.client.set_tag(record.run_id, outcome.TAG_TRIAL_ID, trial_id)
        self.trials[trial_id] = record
        if not record.done:
            self.client.update_run(record.run_id, status="RUNNING")

    def forget_unclaimed(self, known_to_tune: set[str]) -> None:
        """Runs of an earlier attempt that the resumed search did not take up (Tune's saved
        state had not caught up with them when the driver died) are deleted, so that every
        trial is logged once."""
        for record in list(self.trials.values()):
            if record.trial_id in known_to_tune or record.error is not None:
                continue
            if config_key(record.params) in self.unclaimed:
                self.client.delete_run(record.run_id)
                del self.trials[record.trial_id]
        self.unclaimed.clear()
        self.best = None
        for record in self.trials.values():
            if record.done and record.error is None:
                self._consider(record)

    def _consider(self, trial: TrialRecord) -> None:
        value = trial.metrics.get(self.metric)
        incumbent = self.best.metrics[self.metric] if self.best else None
        if value is not None and is_better(value, incumbent, self.mode):
            self.best = trial

    def trial_result(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None:
        trial = self.trials[trial_id]
        if trial.done or step <= trial.epochs:  # logged already by an earlier attempt
            return
        trial.metrics = dict(metrics)
        trial.epochs = step
        now = int(time.time() * 1000)
        self.client.log_batch(
            trial.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
        )

    def trial_ended(self, trial_id: str, error: str | None) -> None:
        trial = self.trials.get(trial_id)
        if trial is None or trial.done:
            return
        trial.done, trial.error = True, error
        if error is None:
            self._consider(trial)
        tags = [RunTag(outcome.TAG_TRIALS_COMPLETED, str(self.completed))]
        if self.best is not None:
            tags += [
                RunTag(outcome.TAG_BEST_METRIC, self.metric),
                RunTag(outcome.TAG_BEST_VALUE, repr(self.best.metrics[self.metric])),
                RunTag(outcome.TAG_BEST_PARAMS, json.dumps(self.best.params)),
            ]
        self.client.log_batch(self.parent_run_id, tags=tags)
        if error is not None:
            self.client.set_tag(trial.run_id, outcome.TAG_ERROR, error)
        self.client.set_terminated(trial.run_id, "FAILED" if error else "FINISHED")
        if self.on_trial_done:
            self.on_trial_done(trial, self)

    def finish_open_trials(self) -> None:
        """Trials Tune never ended (time budget): close their runs as killed."""
        for trial in self.trials.values():
            if not trial.done:
                trial.done = True
                self.client.set_terminated(trial.run_id, "KILLED")


def end_orphaned_runs(
    client: MlflowClient,
    experiment_id: str,
    uid: str,
    namespace: str,
    why: str,
    keep: str | None = None,
) -> list[str]:
    """Parent runs of this TrainingRun that are still RUNNING (and their open trials) end
    as KILLED with `why`: their driver died without ending them, and a new attempt of the
    same TrainingRun (same uid: a RayJob retried, a flow re-run) is starting."""
    from mlflow.entities import ViewType

    running = f"{outcome.trainingrun_filter(uid, namespace)} and attributes.status = 'RUNNING'"
    found = client.search_runs([experiment_id], running, run_view_type=ViewType.ALL)
    orphans = [run for run in found if run.info.run_id != keep]
    for run in orphans:
        run_id = run.info.run_id
        trials = client.search_runs(
            [experiment_id],
            f"tags.`{outcome.TAG_PARENT_RUN}` = '{run_id}' and attributes.status = 'RUNNING'",
            run_view_type=ViewType.ALL,
        )
        for trial in trials:
            client.set_terminated(trial.info.run_id, "KILLED")
        client.set_tag(run_id, outcome.TAG_ERROR, why)
        client.set_terminated(run_id, "KILLED")
    return [run.info.run_id for run in orphans]


def _number(run_name: str | None) -> int | None:
    """A trial run's number, from its name trial-NNN."""
    match = re.fullmatch(r"trial-(\d+)", run_name or "")
    return int(match.group(1)) if match else None
