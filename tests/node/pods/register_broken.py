"""Runs in a pod of the test node: registers a version of a model whose artifacts are
broken and moves an alias to it, as a bad upload or a damaged store would. Prints one JSON
object: {"version": N}. Argument: a JSON object with
- "model", "from_version": the registered model and a good version to start from;
- "alias": the alias to move (the ModelDeployment follows it);
- "how": "corrupt" (every file there, the model file's bytes replaced: downloads, cannot
  load) or "missing" (a source with no files at all: cannot even be downloaded).
The MLflow server comes from $MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    import mlflow
    from mlflow import MlflowClient

    args = json.loads(sys.argv[1])
    client = MlflowClient()
    name, alias = args["model"], args["alias"]
    good = client.get_model_version(name, str(args["from_version"]))
    experiment = mlflow.set_experiment(f"{name}-broken-uploads")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        if args["how"] == "corrupt":
            with tempfile.TemporaryDirectory() as where:
                local = Path(mlflow.artifacts.download_artifacts(good.source, dst_path=where))
                damaged = [
                    path
                    for path in local.rglob("*")
                    if path.is_file() and path.suffix in (".skops", ".pkl", ".pt", ".pt2")
                ]
                if not damaged:
                    raise SystemExit(f"no model file under {good.source}")
                for path in damaged:
                    path.write_bytes(b"\x00 not a model " * (path.stat().st_size // 14 + 1))
                mlflow.log_artifacts(str(local), artifact_path="model")
            source = f"{run.info.artifact_uri}/model"
        else:
            source = f"{run.info.artifact_uri}/nothing-here"
    version = client.create_model_version(name, source, run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    print(json.dumps({"version": int(version.version)}))


if __name__ == "__main__":
    main()
