"""Runs in a pod of the test node: trains a scikit-learn model on the insurance CSV and
registers it in MLflow the way a team outside mlkube would (mlflow.sklearn.log_model with a
signature and no input example), so that a test can serve a model without a TrainingRun.
The registered model carries the owner tag a namespace's ModelDeployments need
(docs/security.md). Prints one JSON object: {"version": N} (of the last model), and
"versions" by name. Argument: a JSON object with "model" (the registered name) or "models"
(several names, one model each), "owner" (the namespace) and "data" (the CSV's URL). The
MLflow server comes from $MLFLOW_TRACKING_URI."""

from __future__ import annotations

import json
import sys


def main() -> None:
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    args = json.loads(sys.argv[1])
    table = pd.read_csv(args["data"])
    features, target = table.drop(columns=["charges"]), table["charges"]
    categorical = ["sex", "smoker", "region"]
    model = make_pipeline(
        make_column_transformer(
            (OneHotEncoder(handle_unknown="ignore"), categorical), remainder="passthrough"
        ),
        HistGradientBoostingRegressor(max_iter=50, random_state=0),
    ).fit(features, target)
    versions = {}
    for name in args.get("models") or [args["model"]]:
        mlflow.MlflowClient().create_registered_model(
            name, tags={"mlkube.owner.namespace": args["owner"]}
        )
        mlflow.set_experiment(f"{name}-outside")
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                signature=infer_signature(features, model.predict(features)),
                serialization_format="cloudpickle",
                pip_requirements=["scikit-learn", "pandas"],
                registered_model_name=name,
            )
        versions[name] = int(info.registered_model_version)
    print(json.dumps({"version": versions[name], "versions": versions}))


if __name__ == "__main__":
    main()
