"""The api models: defaults, errors that name the field, and CRDs that match them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlkube.api import ManifestError, ModelDeployment, TrainingRun, parse_resource
from mlkube.api.crd import render_crds
from mlkube.api.registered_model import DEFAULT_ALIAS, model_uri

REPO = Path(__file__).resolve().parents[2]


def trainingrun(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "run"},
        "spec": {"task": "insurance", "model": {"name": "insurance"}, **spec},
    }


def modeldeployment(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "md"},
        "spec": {"model": {"name": "insurance"}, **spec},
    }


def test_trainingrun_defaults() -> None:
    run = parse_resource(trainingrun())
    assert isinstance(run, TrainingRun)
    assert run.spec.tuning.num_trials == 8 and run.spec.tuning.scheduler == "fifo"
    assert run.spec.promotion.alias == "champion" and run.spec.promotion.enabled
    assert run.spec.ray.workers == 1


def test_modeldeployment_follows_champion_unless_pinned() -> None:
    following = parse_resource(modeldeployment())
    pinned = parse_resource(modeldeployment(model={"name": "insurance", "version": 3}))
    assert isinstance(following, ModelDeployment) and isinstance(pinned, ModelDeployment)
    assert following.spec.model.followed_alias == "champion"
    assert pinned.spec.model.followed_alias is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (trainingrun(tuning={"numTrials": 0}), "spec.tuning.numTrials: Input should be greater"),
        (
            trainingrun(tuning={"mode": "lowest"}),
            "spec.tuning.mode: Input should be 'min' or 'max'",
        ),
        (trainingrun(task="forecast"), "spec.task: unknown task 'forecast'"),
        (trainingrun(modle={"name": "x"}), "spec.modle: unknown field"),
        (
            trainingrun(tuning={"searchSpace": {"lr": {"loguniform": [0, 1]}}}),
            "spec.tuning.searchSpace.lr: loguniform: bounds must be positive",
        ),
        (
            trainingrun(tuning={"searchSpace": {"lr": {"uniform": [0, 1], "choice": [1]}}}),
            "give exactly one of uniform, loguniform, randint, choice",
        ),
        (modeldeployment(canary={"trafficPercent": 101}), "spec.canary.trafficPercent"),
        (modeldeployment(replicas={"min": 3, "max": 2}), "spec.replicas: min must not exceed max"),
        (
            modeldeployment(model={"name": "m", "alias": "champion", "version": 2}),
            "spec.model: give alias or version, not both",
        ),
        ({**trainingrun(), "apiVersion": "v1"}, "apiVersion must be mlkube.io/v1alpha1"),
        ({**trainingrun(), "kind": "Job"}, "kind must be one of TrainingRun, ModelDeployment"),
        ({**trainingrun(), "metadata": {"name": "Bad_Name"}}, "metadata.name: String should match"),
    ],
)
def test_errors_name_the_field(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_resource(document, "run.yaml")
    text = str(raised.value)
    assert text.startswith("run.yaml: ") and message in text and "\n" not in text


def test_crds_in_the_repo_match_the_models() -> None:
    for name, text in render_crds().items():
        path = REPO / "crds" / name
        assert path.exists(), f"{path} missing: run `mlkube crds`"
        assert path.read_text() == text, f"{path} is out of date: run `mlkube crds`"


def test_crd_schema_has_bounds_columns_and_short_names() -> None:
    import yaml

    crds = {name: yaml.safe_load(text) for name, text in render_crds().items()}
    tr = crds["mlkube.io_trainingruns.yaml"]["spec"]
    version = tr["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["tuning"]["properties"]["numTrials"]["minimum"] == 1
    assert version["subresources"] == {"status": {}}
    assert tr["names"]["shortNames"] == ["tr"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Task", "Trials", "Best", "Version", "Promoted", "Age",
    ]  # fmt: skip
    md = crds["mlkube.io_modeldeployments.yaml"]["spec"]
    md_spec = md["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    percent = md_spec["properties"]["canary"]["properties"]["trafficPercent"]
    assert (percent["minimum"], percent["maximum"]) == (0, 100)
    assert md["names"]["shortNames"] == ["md"]
    columns = md["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Model", "Alias", "Models", "Version", "Ready", "URL", "Age",
    ]  # fmt: skip
    # `kubectl get md -o wide` adds where to call the model, in its protocol.
    assert [c["name"] for c in columns if c.get("priority")] == ["Protocol", "Predict"]


def test_model_uris_name_a_version_or_an_alias() -> None:
    assert model_uri("insurance", version=3) == "models:/insurance/3"
    assert model_uri("insurance", alias=DEFAULT_ALIAS) == "models:/insurance@champion"
    for neither_or_both in ({}, {"version": 3, "alias": "champion"}):
        with pytest.raises(ValueError, match="a version or an alias"):
            model_uri("insurance", **neither_or_both)  # type: ignore[arg-type]
