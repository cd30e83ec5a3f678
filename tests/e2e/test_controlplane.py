"""The test control plane itself: a real API server, as a user of kubectl sees it."""

from __future__ import annotations

import json
import subprocess
import time

from kubernetes import client

from tests.cluster.controlplane import ControlPlane, k8s_version
from tests.cluster.players import wait_gone


def test_server_reports_its_version(control_plane: ControlPlane) -> None:
    assert control_plane.version()["gitVersion"] == k8s_version()
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == k8s_version()


def test_namespaces_are_created_and_deleted(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="e2e-ns-life")))
    status = core.read_namespace("e2e-ns-life").status
    assert status is not None and status.phase == "Active"
    core.delete_namespace("e2e-ns-life")
    # The namespace controller empties and finalizes it; only then is it gone.
    assert wait_gone(core.read_namespace, "e2e-ns-life")


def test_namespace_gets_default_service_account(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        items = core.list_namespaced_service_account(namespace).items
        names = [sa.metadata.name for sa in items if sa.metadata]
        if "default" in names:
            return
        time.sleep(0.2)
    raise AssertionError("the serviceaccount controller made no `default` ServiceAccount")


def test_deleting_an_owner_deletes_its_children(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    parent = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="parent"))
    )
    assert parent.metadata is not None and parent.metadata.uid
    owner = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="parent", uid=parent.metadata.uid
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="child", owner_references=[owner]),
            data={"k": "v"},
        ),
    )
    core.delete_namespaced_config_map("parent", namespace)
    assert wait_gone(core.read_namespaced_config_map, "child", namespace), (
        "the garbage collector did not delete the child"
    )


def test_kubeconfig_for_a_user_is_subject_to_rbac(
    control_plane: ControlPlane, kube_api: client.ApiClient, namespace: str
) -> None:
    alice = control_plane.kubeconfig_for_user("alice", ["mlkube-testers"])
    who = json.loads(control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=alice).stdout)
    assert who["status"]["userInfo"]["username"] == "alice"
    assert "mlkube-testers" in who["status"]["userInfo"]["groups"]

    denied = control_plane.kubectl(
        "get", "configmaps", "-n", namespace, kubeconfig=alice, check=False
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    control_plane.kubectl(
        "create", "role", "cm-reader", "--verb=get,list", "--resource=configmaps", "-n", namespace
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "cm-reader",
        "--role=cm-reader",
        "--group=mlkube-testers",
        "-n",
        namespace,
    )
    deadline = time.monotonic() + 30
    while True:  # RBAC is read from an informer cache: allow it a moment
        allowed = control_plane.kubectl(
            "get", "configmaps", "-n", namespace, kubeconfig=alice, check=False
        )
        if allowed.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert allowed.returncode == 0, allowed.stderr


def test_kubeconfig_for_a_service_account(
    control_plane: ControlPlane, kube_api: client.ApiClient, namespace: str
) -> None:
    client.CoreV1Api(kube_api).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="operator"))
    )
    path = control_plane.kubeconfig_for_service_account(namespace, "operator")
    who = json.loads(control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=path).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:operator"
    can = control_plane.kubectl(
        "auth", "can-i", "list", "pods", "-n", namespace, kubeconfig=path, check=False
    )
    assert can.stdout.strip() == "no"


def test_kubectl_errors_surface(control_plane: ControlPlane) -> None:
    try:
        control_plane.kubectl("get", "nosuchkind")
    except subprocess.CalledProcessError as e:
        assert "nosuchkind" in e.stderr
    else:
        raise AssertionError("kubectl get nosuchkind succeeded")


def test_helm_reaches_the_server(control_plane: ControlPlane, namespace: str) -> None:
    assert "v3." in control_plane.helm("version", "--short").stdout
    # An empty release list from the real server (helm reads its Secrets through RBAC).
    assert control_plane.helm("list", "-n", namespace, "-q").stdout.strip() == ""
