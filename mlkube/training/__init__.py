"""ML code the flows call: tasks, the Ray Tune driver, MLflow tracking and the registry."""
