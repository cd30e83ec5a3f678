"""Deterministic names and labels of the children, so a re-delivered event finds, not repeats."""

from __future__ import annotations

import hashlib
import re

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "mlkube-operator"
LABEL_TRAININGRUN = "mlkube.io/trainingrun"
LABEL_MODELDEPLOYMENT = "mlkube.io/modeldeployment"
ANNOTATION_MODEL_VERSION = "mlkube.io/model-version"
# On a predictor's pods, the one version they serve (the operator finds a version's pods by it).
LABEL_MODEL_VERSION = "mlkube.io/model-version"
# KServe's label on an InferenceService's pods.
LABEL_KSERVE_INFERENCESERVICE = "serving.kserve.io/inferenceservice"
# spec.models: the pinned versions, a JSON object {name: version}.
ANNOTATION_MODEL_VERSIONS = "mlkube.io/model-versions"
ANNOTATION_DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"

# KubeRay names the RayCluster `<rayjob>-<5 chars>` and refuses RayJob names over 47.
RAYJOB_NAME_MAX = 47
# KServe derives `<isvc>-predictor` (and Knative revisions `-00001`) within 63 characters.
ISVC_NAME_MAX = 45


def _fit(name: str, limit: int) -> str:
    """`name` if short enough, else a prefix plus a hash of the whole, still unique."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def rayjob_name(trainingrun_name: str) -> str:
    return _fit(trainingrun_name, RAYJOB_NAME_MAX)


def inferenceservice_name(deployment_name: str) -> str:
    # KServe wants a letter first; our names are DNS labels, which may start with a digit.
    name = deployment_name if re.match(r"^[a-z]", deployment_name) else f"md-{deployment_name}"
    return _fit(name, ISVC_NAME_MAX)
