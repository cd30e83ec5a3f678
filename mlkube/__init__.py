"""mlkube: Kubernetes-native MLOps; the same code runs on one machine with no cluster."""

from mlkube.local import apply_env_defaults

# Telemetry of Ray, MLflow and Prefect is off unless the user turned it on: these must be
# set before those packages start their servers, so at the first import of mlkube.
apply_env_defaults()

__version__ = "0.1.0"
