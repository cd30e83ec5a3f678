"""Installing CRDs into the test control plane: the real KubeRay/KServe ones and mlkube's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import subprocess

    from tests.cluster.controlplane import ControlPlane

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
# The foreign CRDs live beside the repo (../shared/crds) and are never copied into it.
SHARED_CRDS = REPO_ROOT.parent / "shared" / "crds"
FOREIGN_CRDS = (
    "kuberay/ray.io_rayjobs.yaml",
    "kuberay/ray.io_rayclusters.yaml",
    "kserve/serving.kserve.io_inferenceservices.yaml",
)
MLKUBE_CRDS = REPO_ROOT / "crds"
FIELD_MANAGER = "mlkube-tests"


def foreign_crd_files() -> list[Path]:
    """KubeRay RayJob/RayCluster and KServe InferenceService CRDs from ../shared/crds/."""
    files = [SHARED_CRDS / rel for rel in FOREIGN_CRDS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"foreign CRDs missing: {', '.join(missing)}")
    return files


def mlkube_crd_files() -> list[Path]:
    """Whatever crds/ holds now (generated from mlkube.api); empty if nothing yet."""
    if not MLKUBE_CRDS.is_dir():
        return []
    return sorted([*MLKUBE_CRDS.glob("*.yaml"), *MLKUBE_CRDS.glob("*.yml")])


def install(cp: ControlPlane, files: list[Path], timeout: float = 120.0) -> list[str]:
    """Server-side apply the CRD files and wait until each is Established.

    Server-side, because the foreign CRDs are 1-2 MB and client-side apply would put the
    whole object into the last-applied annotation, which exceeds its 256 KiB limit.
    Returns the CRD names (e.g. `rayjobs.ray.io`).
    """
    if not files:
        return []
    args = [
        "apply",
        "--server-side",
        "--force-conflicts",
        f"--field-manager={FIELD_MANAGER}",
        "-o",
        "name",
    ]
    for f in files:
        args += ["-f", str(f)]
    out = cp.kubectl(*args, timeout=timeout).stdout
    names = [
        line.split("/", 1)[1]
        for line in out.split()
        if line.startswith("customresourcedefinition.apiextensions.k8s.io/")
    ]
    wait_established(cp, names, timeout)
    return names


def wait_established(cp: ControlPlane, names: list[str], timeout: float = 120.0) -> None:
    """Poll until every CRD has Established=True. (`kubectl wait` errors out on a CRD
    whose status.conditions is still null, which it is for a moment after creation.)"""
    from kubernetes import client

    pending = set(names)
    deadline = time.monotonic() + timeout
    with cp.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        while pending:
            for name in sorted(pending):
                crd = ext.read_custom_resource_definition(name)
                conditions = (crd.status.conditions if crd.status else None) or []
                if any(c.type == "Established" and c.status == "True" for c in conditions):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"CRDs not Established after {timeout}s: {sorted(pending)}")
            if pending:
                time.sleep(0.1)


def install_all(cp: ControlPlane) -> list[str]:
    """Foreign CRDs plus whatever mlkube CRDs exist."""
    return install(cp, foreign_crd_files()) + install(cp, mlkube_crd_files())


def apply_manifest(
    cp: ControlPlane,
    namespace: str,
    manifest: dict[str, Any],
    *,
    check: bool = True,
    server_side: bool = True,
    dry_run: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`kubectl apply [--server-side] [--dry-run=server] --validate=strict -n NS -f -` with
    the manifest as YAML on stdin. A server dry run validates fully (schema, strict fields)
    but stores nothing."""
    mode = ["--server-side"] if server_side else []
    if dry_run:
        mode.append("--dry-run=server")
    return cp.kubectl(
        "apply",
        *mode,
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
        check=check,
    )


def names_unknown_field(message: str, field: str) -> bool:
    """Does a server error name the unknown field `field` (e.g. `spec.foo`)? Field
    validation says `unknown field "spec.foo"`; server-side apply says
    `.spec.foo: field not declared in schema`."""
    return (
        f'unknown field "{field}"' in message
        or f".{field}: field not declared in schema" in message
    )
