"""The contract: pydantic models of mlkube's custom resources. Imports nothing of ours."""

from mlkube.api.common import API_VERSION, GROUP, VERSION, Condition, ObjectMeta
from mlkube.api.errors import CommandFailed, UserError
from mlkube.api.manifest import ManifestError, load_manifest, parse_resource
from mlkube.api.modeldeployment import ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus
from mlkube.api.trainingrun import (
    BUILTIN_TASKS,
    TERMINAL_PHASES,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
)

__all__ = [
    "API_VERSION",
    "BUILTIN_TASKS",
    "CommandFailed",
    "GROUP",
    "VERSION",
    "Condition",
    "ManifestError",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "ObjectMeta",
    "TERMINAL_PHASES",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "UserError",
    "load_manifest",
    "parse_resource",
]
