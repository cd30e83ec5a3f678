"""Fixtures for tests against a real Kubernetes control plane (tests/cluster/).

One control plane per test session; a fresh namespace per test. See tests/cluster/README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster import crds as crd_files
from tests.cluster.controlplane import Binaries, BinariesMissing, ControlPlane, namespace_for_test
from tests.cluster.players import InferenceServicePlayer, RayJobPlayer

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager (GC, namespace, serviceaccount)."""
    try:
        binaries = Binaries.find()
    except BinariesMissing as e:
        # Fail, not skip: a silently skipped e2e suite looks green.
        pytest.fail(str(e), pytrace=False)
    with ControlPlane(binaries=binaries) as cp:
        yield cp


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    """Path of the admin kubeconfig (O=system:masters)."""
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin kubernetes.client.ApiClient."""
    api = control_plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Callable[..., Any]:
    """`kubectl("get", "ns")` -> CompletedProcess; raises CalledProcessError on failure
    unless check=False. Keyword args: kubeconfig, input, check, timeout."""
    return control_plane.kubectl


@pytest.fixture(scope="session")
def foreign_crds(control_plane: ControlPlane) -> list[str]:
    """KubeRay RayJob/RayCluster and KServe InferenceService CRDs, Established."""
    try:
        files = crd_files.foreign_crd_files()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (they live in ../shared/crds beside the checkout)", pytrace=False)
    return crd_files.install(control_plane, files)


@pytest.fixture(scope="session")
def mlkube_crds(control_plane: ControlPlane) -> list[str]:
    """Whatever crds/*.yaml holds, Established; [] when crds/ is empty or absent."""
    return crd_files.install(control_plane, crd_files.mlkube_crd_files())


@pytest.fixture(scope="session")
def crds(foreign_crds: list[str], mlkube_crds: list[str]) -> list[str]:
    """All CRDs (foreign + mlkube) installed; their names."""
    return [*foreign_crds, *mlkube_crds]


@pytest.fixture
def namespace(
    control_plane: ControlPlane, kube_api: client.ApiClient, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards (not waited for)."""
    control_plane.assert_alive()  # a dead apiserver: say so, with its log, not "refused"
    core = client.CoreV1Api(kube_api)
    name = namespace_for_test(request.node.name, "t")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def rayjob_player(
    kube_api: client.ApiClient, namespace: str, foreign_crds: list[str]
) -> Iterator[RayJobPlayer]:
    """Plays KubeRay for RayJobs in this test's namespace (entrypoints run locally)."""
    with RayJobPlayer(kube_api, namespace) as player:
        yield player


@pytest.fixture
def isvc_player(
    kube_api: client.ApiClient, namespace: str, foreign_crds: list[str]
) -> Iterator[InferenceServicePlayer]:
    """Plays KServe for InferenceServices in this test's namespace (predictors run locally)."""
    with InferenceServicePlayer(kube_api, namespace) as player:
        yield player


@pytest.fixture
def operator_env(kubeconfig: Path, crds: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf and the kubernetes client both log in through $KUBECONFIG."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
