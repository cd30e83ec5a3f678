"""How mlkube names a registered model in MLflow, its aliases and its versions: the names
both custom resources accept, the aliases the promotion gate moves, and the `models:/` URIs
MLflow loads from."""

from __future__ import annotations

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
# The alias a promoted version gets (TrainingRun spec.promotion.alias) and the one a
# ModelDeployment follows, unless they name another.
DEFAULT_ALIAS = "champion"
# The alias a registered version gets when the gate does not promote it.
CHALLENGER_ALIAS = "challenger"


def model_uri(name: str, *, version: int | str | None = None, alias: str | None = None) -> str:
    """`models:/name/version` or `models:/name@alias`: one of the two, never both."""
    if (version is None) == (alias is None):
        raise ValueError("a model URI names a version or an alias")
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"
