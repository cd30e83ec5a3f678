"""Who a registered model belongs to: the namespace that first registered a version of it,
recorded in a tag on the registered model. Pure: no MLflow import, so that the operator
(deploying) and the train flow (registering, promoting) decide the same way.

What this stops is one namespace's TrainingRun moving another team's champion, and one
namespace serving another's model (a pickle: code that runs in the serving pod). It is as
strong as MLflow's own access control: whoever can write to MLflow directly can change the
tag too (docs/security.md: a shared MLflow needs authentication).
"""

from __future__ import annotations

from mlkube.api.errors import UserError

TAG_OWNER = "mlkube.owner.namespace"
# The condition/event reason of a ModelDeployment refused for ownership.
NOT_OWNER = "ModelNotOwned"
# The namespace of a TrainingRun run without one (local mode), as kubectl would default it.
DEFAULT_NAMESPACE = "default"
FIELD = "spec.model.name"


class ModelNotOwned(UserError):
    """The namespace may not use the registered model; the message is one line naming the
    owner namespace (exit 2)."""


def owner_namespace(namespace: str | None) -> str:
    return namespace or DEFAULT_NAMESPACE


def ownership_refusal(
    model: str,
    owner: str | None,
    namespace: str,
    *,
    shared: bool,
    registered: bool = True,
    field: str = FIELD,
) -> str | None:
    """None when `namespace` may register, promote or serve versions of `model`, else why
    not (one line). `owner` is the model's owner tag, None when it has none; a model that is
    not registered (`registered` False) is free: the first to register it owns it."""
    if shared or not registered or owner == namespace:
        return None
    if owner is None:
        return (
            f"{field}: registered model {model!r} has no owner namespace (tag {TAG_OWNER}); "
            "it belongs to whoever registers a version of it with mlkube first"
        )
    return (
        f"{field}: registered model {model!r} belongs to namespace {owner!r}, not "
        f"{namespace!r} (operator.allowSharedModels is off)"
    )
