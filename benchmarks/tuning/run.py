"""Tuning benchmark: 16 small trials through mlkube's search vs a plain loop doing the same.

    python benchmarks/tuning/run.py [--trials 16] [--repeats 3] [--dataset CSV]

Both sides train the same configurations (the ones mlkube's seeded search draws) of the
insurance task (HistGradientBoosting, 3-fold CV) with scikit-learn pinned to one thread,
and both log every trial as a nested MLflow run of one parent. mlkube's side is
`mlkube.training.tune.run_search` with the driver-side MLflow tracker, exactly as the train
flow runs it. Ray's start is timed on its own. Also shows where the median search spends its
time: until the first trial starts, its result, the other trials, Tune's wrap-up. Prints
markdown tables and writes them to benchmarks/tuning/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
os.environ["MLKUBE_HOME"] = tempfile.mkdtemp(prefix="mlkube-bench-tuning-")
os.environ.pop("MLFLOW_TRACKING_URI", None)
sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plain_loop(prepared: Any, configs: list[dict[str, Any]], client: Any, experiment: str) -> float:
    """What a user would write without Ray: train each configuration, log it, move on."""
    from mlflow.entities import Metric, Param
    from threadpoolctl import threadpool_limits

    from mlkube.training import outcome

    started = time.perf_counter()
    parent = client.create_run(experiment, run_name="plain-loop").info.run_id
    with threadpool_limits(1):
        for number, config in enumerate(configs, 1):
            run_id = client.create_run(
                experiment,
                run_name=f"trial-{number:03d}",
                tags={outcome.TAG_PARENT_RUN: parent, outcome.TAG_ROLE: "trial"},
            ).info.run_id
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.items()])
            reported: dict[str, float] = {}
            prepared.task.train(
                config,
                prepared.data,
                lambda metrics, state=None, into=reported: into.update(metrics),
                prepared.settings.seed,
            )
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, 1) for k, v in reported.items()])
            client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return time.perf_counter() - started


class Timeline:
    """Passes Tune's trial events on to the tracker and notes when the first and last came."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.started = time.perf_counter()
        self.first_start: float | None = None
        self.first_result: float | None = None
        self.last_end = 0.0

    def trial_started(self, trial_id: str, config: Any) -> None:
        self.first_start = self.first_start or time.perf_counter() - self.started
        self.tracker.trial_started(trial_id, config)

    def trial_result(self, trial_id: str, metrics: Any, step: int) -> None:
        self.first_result = self.first_result or time.perf_counter() - self.started
        self.tracker.trial_result(trial_id, metrics, step)

    def trial_ended(self, trial_id: str, error: str | None) -> None:
        self.last_end = time.perf_counter() - self.started
        self.tracker.trial_ended(trial_id, error)


def mlkube_search(
    prepared: Any, client: Any, experiment: str
) -> tuple[float, list[dict], Timeline]:
    from mlkube.training.tracking import RunTracker
    from mlkube.training.tune import experiment_dir, run_search

    settings = prepared.settings
    started = time.perf_counter()
    parent = client.create_run(experiment, run_name="mlkube").info.run_id
    tracker = RunTracker(
        client, experiment, parent, settings.metric, settings.mode, settings.num_trials
    )
    timeline = Timeline(tracker)
    run_search(prepared.task, prepared.data, settings, timeline, experiment_dir("bench-tuning"))
    client.set_terminated(parent, "FINISHED")
    elapsed = time.perf_counter() - started
    configs = [t.params for t in sorted(tracker.trials.values(), key=lambda t: t.number)]
    assert len(configs) == settings.num_trials and all(t.done for t in tracker.trials.values())
    return elapsed, configs, timeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append", action="store_true", help="add to RESULTS.md, not replace")
    parser.add_argument("--dataset", default=str(REPO.parent / "shared/data/insurance.csv"))
    parser.add_argument(
        "--search-space",
        default="{}",
        help='JSON override of the task\'s space, e.g. \'{"max_iter": {"randint": [300, 500]}}\'',
    )
    args = parser.parse_args()

    import mlflow
    from mlflow import MlflowClient

    from mlkube.api import parse_resource
    from mlkube.local import local_tracking_uri
    from mlkube.training.prepare import prepare
    from mlkube.training.tune import ensure_ray

    load_before = os.getloadavg()[0]
    run = parse_resource(
        {
            "apiVersion": "mlkube.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "bench"},
            "spec": {
                "task": "insurance",
                "dataset": {"uri": args.dataset},
                "model": {"name": "bench"},
                "tuning": {
                    "numTrials": args.trials,
                    "maxConcurrentTrials": os.cpu_count(),
                    "searchSpace": json.loads(args.search_space),
                },
            },
        }
    )
    prepared = prepare(run)  # type: ignore[arg-type]
    uri = local_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench")

    log("starting Ray")
    started = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - started
    log(f"Ray started in {ray_start:.2f} s")

    searches, loops, timelines = [], [], []
    for repeat in range(1, args.repeats + 1):
        elapsed, configs, timeline = mlkube_search(prepared, client, experiment)
        searches.append(elapsed)
        timelines.append(timeline)
        log(f"repeat {repeat}/{args.repeats}: mlkube search {elapsed:.2f} s")
        loops.append(plain_loop(prepared, configs, client, experiment))
        log(f"repeat {repeat}/{args.repeats}: plain loop {loops[-1]:.2f} s")

    search, loop = statistics.median(searches), statistics.median(loops)
    first_with_start = searches[0] + ray_start
    rows = [
        ("plain loop (1 thread, logs each trial to MLflow)", f"{loop:.2f}", "1.00x"),
        ("mlkube search, Ray already up", f"{search:.2f}", f"{loop / search:.2f}x"),
        (
            "mlkube search, first one, including Ray's start",
            f"{first_with_start:.2f}",
            f"{loop / first_with_start:.2f}x",
        ),
        ("Ray's start alone (ray.init)", f"{ray_start:.2f}", ""),
    ]
    median = timelines[searches.index(search)] if search in searches else timelines[0]
    first_start, first_result = median.first_start or 0.0, median.first_result or 0.0
    phases = [
        ("first trial starts (trial actors up: a process each, Ray Tune imported)", first_start),
        (
            "its first result (scikit-learn imported in the actor, one trial)",
            first_result - first_start,
        ),
        ("the other trials, two at a time", median.last_end - first_result),
        ("Tune's wrap-up after the last trial", search - median.last_end),
    ]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = [
        f"{args.trials} trials of the insurance task (HistGradientBoosting, 3-fold CV; "
        f"search space override {args.search_space}), "
        f"median of {args.repeats}; {os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}, load average {load_before:.1f} at start; {when}.",
        "",
        "| | seconds | speed vs plain loop |",
        "| --- | ---: | ---: |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"All runs: mlkube {', '.join(f'{s:.2f}' for s in searches)}; "
        f"loop {', '.join(f'{s:.2f}' for s in loops)}.",
        "",
        "Where the median mlkube search spends its time (seconds from the search's start):",
        "",
        "| phase | seconds |",
        "| --- | ---: |",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in phases),
    ]
    text = "\n".join(table)
    print(text)
    results = HERE / "RESULTS.md"
    previous = results.read_text() if results.exists() and args.append else "# Tuning benchmark\n"
    results.write_text(f"{previous}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
