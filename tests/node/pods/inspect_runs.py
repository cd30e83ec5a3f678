"""Runs in a pod of the test node: what MLflow holds for one TrainingRun. Prints one JSON
object: the parent runs tagged with its uid (status and how often each was resumed) and the
number of trial runs nested under them. Argument: a JSON object with "model" (the registered
model, whose experiment holds the runs) and "uid". The MLflow server comes from
$MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from mlflow import MlflowClient

    args = json.loads(sys.argv[1])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(args["model"])
    tagged = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlkube.trainingrun.uid` = '{args['uid']}'"
    )
    parents = [r for r in tagged if r.data.tags.get("mlkube.role") == "parent"]
    trials = [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}
    ]
    print(
        json.dumps(
            {
                "parents": [
                    {"status": p.info.status, "resumed": p.data.tags.get("mlkube.resumed")}
                    for p in parents
                ],
                "trials": len(trials),
                "trial_ids": sorted({t.data.tags.get("mlkube.trial.id", "") for t in trials}),
            }
        )
    )


if __name__ == "__main__":
    main()
