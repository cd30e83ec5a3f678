"""mlkube's own CRDs (crds/, generated from mlkube.api) against the real API server: every
example in examples/ is accepted, and broken copies are refused with the field named.

Uses whatever crds/ and examples/ hold at collection time."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ControlPlane
from tests.cluster.crds import (
    MLKUBE_CRDS,
    REPO_ROOT,
    apply_manifest,
    mlkube_crd_files,
    names_unknown_field,
)

EXAMPLES = REPO_ROOT / "examples"


def _our_kinds() -> dict[str, dict[str, Any]]:
    """kind -> {group, plural, shortNames} of the CRDs in crds/."""
    kinds: dict[str, dict[str, Any]] = {}
    for f in mlkube_crd_files():
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                names = doc["spec"]["names"]
                kinds[names["kind"]] = {
                    "group": doc["spec"]["group"],
                    "plural": names["plural"],
                    "shortNames": names.get("shortNames", []),
                }
    return kinds


def _examples() -> list[Any]:
    kinds = _our_kinds()
    found = []
    for f in sorted([*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml")]):
        for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
            if isinstance(doc, dict) and doc.get("kind") in kinds:
                rel = f.relative_to(REPO_ROOT)
                found.append(pytest.param(doc, id=f"{rel}#{i}" if i else str(rel)))
    return found


KINDS = _our_kinds()
EXAMPLE_DOCS = _examples()
SKIP_REASON = (
    f"no CRD YAML in {MLKUBE_CRDS.relative_to(REPO_ROOT)}/ yet (`make crds` generates it)"
    if not KINDS
    else f"no examples of {', '.join(sorted(KINDS))} in examples/ yet"
)
needs_examples = pytest.mark.skipif(not EXAMPLE_DOCS, reason=SKIP_REASON)
examples = pytest.mark.parametrize("doc", EXAMPLE_DOCS or [pytest.param(None, id="none")])


def _apply(cp: ControlPlane, namespace: str, doc: dict[str, Any]) -> Any:
    # Dry run: the server validates fully (schema, strict fields) but stores nothing, so
    # the same example can be checked many times in one namespace.
    return apply_manifest(cp, namespace, doc, check=False, dry_run=True)


@needs_examples
@examples
def test_example_is_accepted(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str, doc: dict[str, Any]
) -> None:
    result = _apply(control_plane, namespace, doc)
    assert result.returncode == 0, result.stderr


@needs_examples
@examples
def test_unknown_spec_field_is_rejected_with_its_name(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str, doc: dict[str, Any]
) -> None:
    broken = copy.deepcopy(doc)
    first = next(iter(broken["spec"]))
    broken["spec"][first + "x"] = broken["spec"].pop(first)  # a typo of a real field
    result = _apply(control_plane, namespace, broken)
    assert result.returncode != 0
    assert names_unknown_field(result.stderr, f"spec.{first}x"), result.stderr


@needs_examples
@examples
def test_wrong_type_is_rejected_with_its_name(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str, doc: dict[str, Any]
) -> None:
    broken = copy.deepcopy(doc)
    scalars = [k for k, v in broken["spec"].items() if isinstance(v, str | int | float | bool)]
    if not scalars:
        pytest.skip("this example's spec has no top-level scalar field to break")
    key = scalars[0]
    broken["spec"][key] = {"not": "a scalar"}
    result = _apply(control_plane, namespace, broken)
    assert result.returncode != 0
    assert f"spec.{key}" in result.stderr, result.stderr


@needs_examples
@examples
def test_missing_spec_is_rejected(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str, doc: dict[str, Any]
) -> None:
    broken = {k: v for k, v in doc.items() if k != "spec"}
    result = _apply(control_plane, namespace, broken)
    assert result.returncode != 0
    assert "spec" in result.stderr, result.stderr


@needs_examples
@examples
def test_listed_by_short_name_with_printer_columns(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str, doc: dict[str, Any]
) -> None:
    names = KINDS[doc["kind"]]
    apply_manifest(control_plane, namespace, doc)
    crd = yaml.safe_load(
        control_plane.kubectl(
            "get", "crd", f"{names['plural']}.{names['group']}", "-o", "yaml"
        ).stdout
    )
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    printer_columns = version.get("additionalPrinterColumns", [])
    # Columns of priority 0 show in `kubectl get`; the others only with `-o wide`.
    plain = [c["name"].upper() for c in printer_columns if not c.get("priority")]
    wide = [c["name"].upper() for c in printer_columns if c.get("priority")]
    for short in names["shortNames"] or [names["plural"]]:
        for args, shown, hidden in (([], plain, wide), (["-o", "wide"], plain + wide, [])):
            out = control_plane.kubectl("get", short, "-n", namespace, *args).stdout
            header, row = out.splitlines()[0], out.splitlines()[1]
            assert row.split()[0] == doc["metadata"]["name"]
            command = " ".join(["kubectl get", short, *args])
            for column in shown:
                assert column in header.split(), f"column {column} missing from `{command}`"
            for column in hidden:
                assert column not in header.split(), f"column {column} shown by `{command}`"


def test_crd_files_are_found_or_the_skip_says_why() -> None:
    # Guards the skip logic above: it must name what is missing, never skip silently.
    if not KINDS:
        assert "make crds" in SKIP_REASON
    else:
        assert all(Path(f).suffix in (".yaml", ".yml") for f in mlkube_crd_files())


def _with_pod_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = (
        {"task": "insurance", "model": {"name": "m"}, "ray": options}
        if kind == "TrainingRun"
        else {"model": {"name": "m"}, **options}
    )
    return {"apiVersion": "mlkube.io/v1alpha1", "kind": kind, "metadata": {"name": "opts"},
            "spec": spec}  # fmt: skip


@pytest.mark.parametrize("kind", ["TrainingRun", "ModelDeployment"])
def test_pod_options_are_checked_by_the_api_server_naming_the_field(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str, kind: str
) -> None:
    from tests.unit.test_pod_options import OPTIONS

    where = "spec.ray" if kind == "TrainingRun" else "spec"
    accepted = _apply(control_plane, namespace, _with_pod_options(kind, OPTIONS))
    assert accepted.returncode == 0, accepted.stderr
    refused = {
        "reserved": ({"env": [{"name": "MLFLOW_TRACKING_URI", "value": "http://evil:5000"}]},
                     f"{where}.env[0].name", "MLFLOW_TRACKING_URI is set by the operator"),
        "telemetry": ({"env": [{"name": "DO_NOT_TRACK", "value": "0"}]},
                      f"{where}.env[0].name", "DO_NOT_TRACK is set by the operator"),
        "both": ({"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]},
                 f"{where}.envFrom[0]", "give secretRef or configMapRef"),
        "effect": ({"tolerations": [{"key": "gpu", "effect": "Sometimes"}]},
                   f"{where}.tolerations[0].effect", "Unsupported value"),
        "account": ({"serviceAccountName": "Admin"}, f"{where}.serviceAccountName", "should match"),
    }  # fmt: skip
    for name, (options, field, words) in refused.items():
        result = _apply(control_plane, namespace, _with_pod_options(kind, options))
        assert result.returncode != 0, name
        assert field in result.stderr and words in result.stderr, (name, result.stderr)


def _deployment(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "mlkube.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "many"}, "spec": spec}  # fmt: skip


def test_several_models_are_checked_by_the_api_server_naming_the_field(
    control_plane: ControlPlane, mlkube_crds: list[str], namespace: str
) -> None:
    two = [{"name": "a"}, {"name": "b", "version": 2}]
    for accepted in (
        {"models": two, "memoryBudget": "1Gi"},
        {"anyModel": {}, "memoryBudget": "3Gi", "resources": {"memory": "4Gi"}},
    ):
        result = _apply(control_plane, namespace, _deployment(accepted))
        assert result.returncode == 0, result.stderr
    refused = {
        "both": ({"model": {"name": "a"}, "models": two}, "spec",
                 "give exactly one of model, models, anyModel"),
        "none": ({"ttlSeconds": 60}, "spec", "give exactly one of model, models, anyModel"),
        "twice": ({"models": [{"name": "a"}, {"name": "a"}]}, "spec.models",
                  'duplicate entries for key [name="a"]'),
        "canary": ({"anyModel": {}, "canary": {"trafficPercent": 10}}, "spec.canary",
                   "it needs spec.model"),
        "budget": ({"models": two, "memoryBudget": "lots"}, "spec.memoryBudget", "should match"),
        "no room": ({"models": two, "memoryBudget": "2Gi"}, "spec.memoryBudget",
                    "must be below resources.memory"),
        "no room either": ({"models": two, "memoryBudget": "3Gi",
                            "resources": {"memory": "3Gi"}}, "spec.memoryBudget",
                           "must be below resources.memory"),
        "empty": ({"models": []}, "spec.models", "should have at least 1 items"),
    }  # fmt: skip
    for name, (spec, field, words) in refused.items():
        result = _apply(control_plane, namespace, _deployment(spec))
        assert result.returncode != 0, name
        assert field in result.stderr and words in result.stderr, (name, result.stderr)
