"""The Helm chart (charts/mlkube) against a real control plane: lint, install, upgrade,
uninstall, bad values, and the operator reconciling under the chart's ServiceAccount and
RBAC, refused what it must not do.

These tests start their own control plane (one for the module) rather than the session's:
the chart ships the mlkube CRDs in its crds/ folder, and Helm installs those only when they
do not exist yet, while the session's `mlkube_crds` fixture applies the same CRDs with its
own field manager. On a plane of their own, "helm install creates the CRDs" is checked for
real and the operator tests' CRDs are left alone. No pods run (no kubelet): the tests check
objects, never readiness.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster import crds as crd_files
from tests.cluster.controlplane import Binaries, BinariesMissing, ControlPlane
from tests.cluster.players import wait_for_object

# A short server-side watch timeout lets KopfRunner stop promptly (as in test_operator.py);
# read once, when kopf first imports the handlers.
os.environ.setdefault("MLKUBE_OPERATOR_WATCH_TIMEOUT_SECONDS", "5")
# The resources below name NO_MLFLOW, on loopback: a host the operator must be allowed to call.
os.environ.setdefault("MLKUBE_OPERATOR_MLFLOW_ALLOWED_HOSTS", '["127.0.0.1"]')

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "mlkube"
RELEASE_NS = "mlkube-system"
MLKUBE_CRDS = ("trainingruns.mlkube.io", "modeldeployments.mlkube.io")
RAYJOBS = ("ray.io", "v1", "rayjobs")
ISVCS = ("serving.kserve.io", "v1beta1", "inferenceservices")
MLKUBE = ("mlkube.io", "v1alpha1")
# Nothing listens here: the TrainingRuns below never make the operator call MLflow (a
# RayJob that has not started), and if they did, it stays on loopback. ModelDeployments
# name the session's real MLflow server (the operator checks who owns a model).
NO_MLFLOW = "http://127.0.0.1:9"
# prometheus-operator's kinds, as stand-in CRDs (any fields): the real ones are not in the
# test plane, and the chart's ServiceMonitor/PodMonitor only need to be accepted and stored.
MONITORING_CRDS = ("servicemonitors", "ServiceMonitor"), ("podmonitors", "PodMonitor")

Obj = dict[str, Any]
_RELEASES = itertools.count(1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def plane() -> Iterator[ControlPlane]:
    try:
        binaries = Binaries.find()
    except BinariesMissing as e:
        pytest.fail(str(e), pytrace=False)
    with ControlPlane(binaries=binaries) as cp:
        crd_files.install(cp, crd_files.foreign_crd_files())
        cp.kubectl("apply", "-f", "-", input=_monitoring_crds())
        crd_files.wait_established(cp, [f"{p}.monitoring.coreos.com" for p, _ in MONITORING_CRDS])
        yield cp


@pytest.fixture(scope="module")
def admin(plane: ControlPlane) -> Iterator[client.ApiClient]:
    api = plane.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def release(plane: ControlPlane) -> Iterator[str]:
    """A release name for this test; uninstalled afterwards if still there."""
    name = f"r{next(_RELEASES)}"
    yield name
    plane.helm("uninstall", name, "-n", RELEASE_NS, "--wait=false", check=False)


def _monitoring_crds() -> str:
    docs = []
    for plural, kind in MONITORING_CRDS:
        docs.append({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {
                "group": "monitoring.coreos.com",
                "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1", "served": True, "storage": True,
                    "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": True,
                    }},
                }],
            },
        })  # fmt: skip
    return yaml.safe_dump_all(docs)


# --------------------------------------------------------------------------- helpers


def helm_install(plane: ControlPlane, release: str, *args: str) -> subprocess.CompletedProcess[str]:
    return plane.helm("install", release, str(CHART), "-n", RELEASE_NS, "--create-namespace", *args)


def manifest(plane: ControlPlane, release: str) -> list[Obj]:
    out = plane.helm("get", "manifest", release, "-n", RELEASE_NS).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def exists(plane: ControlPlane, obj: Obj) -> bool:
    meta = obj["metadata"]
    kind = f"{obj['kind'].lower()}.{obj['apiVersion'].split('/')[0]}"
    if "/" not in obj["apiVersion"]:
        kind = obj["kind"].lower()
    args = ["get", kind, meta["name"], "--ignore-not-found", "-o", "name"]
    if meta.get("namespace"):
        args += ["-n", meta["namespace"]]
    return bool(plane.kubectl(*args).stdout.strip())


def can_i(plane: ControlPlane, user: str, verb: str, resource: str, ns: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    args += ["-n", ns] if ns else ["--all-namespaces"]
    result = plane.kubectl(*args, check=False)
    assert result.stdout.strip() in ("yes", "no"), (args, result.stdout, result.stderr)
    return result.stdout.strip() == "yes"


def create_namespace(admin: client.ApiClient, name: str) -> None:
    with contextlib.suppress(ApiException):
        client.CoreV1Api(admin).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )


def trainingrun(name: str) -> Obj:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "task": "insurance",
            "dataset": {"uri": "file:///data/insurance.csv"},
            "model": {"name": f"{name}-model"},
            "tuning": {"numTrials": 1},
            "ray": {"workers": 0},
            "mlflow": {"trackingUri": NO_MLFLOW},
        },
    }


def modeldeployment(name: str, model: str, tracking_uri: str) -> Obj:
    return {
        "apiVersion": "mlkube.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"name": model, "version": 1}, "mlflow": {"trackingUri": tracking_uri}},
    }


def owned_model(tracking_uri: str, namespace: str) -> str:
    """A registered model of `namespace` (the operator checks who owns what it deploys)."""
    from mlflow import MlflowClient

    from mlkube.training.ownership import TAG_OWNER

    name = f"{namespace}-model-{next(_RELEASES)}"
    MlflowClient(tracking_uri).create_registered_model(name, tags={TAG_OWNER: namespace})
    return name


@contextlib.contextmanager
def operator_as(kubeconfig: Path, scope: list[str]) -> Iterator[KopfRunner]:
    """The operator under KopfRunner, logged in with `kubeconfig` (the chart's SA)."""
    args = ["run", "--standalone", *scope, "-m", "mlkube.operator.handlers"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(kubeconfig))
        with KopfRunner(args, timeout=60) as runner:
            yield runner
    assert runner.exception is None, runner.output[-4000:]
    assert runner.exit_code == 0, runner.output[-4000:]


AUTHORIZATION_ERRORS = (
    "Forbidden", "forbidden", " 403", "Not enough permissions", "Failed to post an event",
    "Traceback",
)  # fmt: skip


def reconcile_both(admin: client.ApiClient, ns: str, tracking_uri: str) -> tuple[Obj, Obj]:
    """Create a TrainingRun and a ModelDeployment (of a model `ns` owns in the MLflow at
    `tracking_uri`); wait for their RayJob, InferenceService and the status the operator
    writes; return the RayJob and the InferenceService."""
    custom = client.CustomObjectsApi(admin)
    tr = custom.create_namespaced_custom_object(*MLKUBE, ns, "trainingruns", trainingrun("tr1"))
    model = owned_model(tracking_uri, ns)
    md = custom.create_namespaced_custom_object(
        *MLKUBE, ns, "modeldeployments", modeldeployment("md1", model, tracking_uri)
    )
    rayjob = wait_for_object(admin, *RAYJOBS, ns, "tr1", lambda o: True, what="created")
    isvc = wait_for_object(admin, *ISVCS, ns, "md1", lambda o: True, what="created")
    # Status goes through the status subresource: patched under the chart's RBAC too.
    wait_for_object(
        admin, *MLKUBE, "trainingruns", ns, "tr1",
        lambda o: (o.get("status") or {}).get("rayJobName") == "tr1", what="status.rayJobName",
    )  # fmt: skip
    wait_for_object(
        admin, *MLKUBE, "modeldeployments", ns, "md1",
        lambda o: bool((o.get("status") or {}).get("phase")), what="a status phase",
    )  # fmt: skip
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == tr["metadata"]["uid"]
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == md["metadata"]["uid"]
    return rayjob, isvc


def events_by(admin: client.ApiClient, ns: str, reason: str) -> list[Any]:
    events = client.CoreV1Api(admin).list_namespaced_event(ns)
    return [e for e in events.items if e.reason == reason]


# --------------------------------------------------------------------------- lint, template


def test_helm_lint_is_clean_with_defaults_and_with_everything_on(plane: ControlPlane) -> None:
    for extra in (
        [],
        ["--set", "mlflow.enabled=true,dashboard.enabled=true",
         "--set", "metrics.serviceMonitor.enabled=true,metrics.predictorPodMonitor.enabled=true",
         "--set", "watchNamespaces={team-a,team-b}",
         "--set", "mlflow.backendStore.existingSecret=mlflow-db",
         "--set", "mlflow.artifacts.destination=s3://bucket/mlflow",
         "--set", "mlflow.secretEnv[0].name=AWS_ACCESS_KEY_ID",
         "--set", "mlflow.secretEnv[0].secretName=mlflow-s3",
         "--set", "mlflow.secretEnv[0].key=id"],
    ):  # fmt: skip
        out = plane.helm("lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in out.stdout, out.stdout
        assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_operator_settings_read_the_chart_env(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env the chart renders is what mlkube/operator/settings.py reads."""
    from mlkube.operator.settings import OperatorSettings

    out = plane.helm(
        "template", "x", str(CHART), "-n", RELEASE_NS, "--show-only", "templates/deployment.yaml",
        "--set", "mlflow.enabled=true", "--set", "watchNamespaces={team-a,team-b}",
        "--set-json", "operator.aliasPollSeconds=12.5",
        "--set", "operator.kserveDeploymentMode=RawDeployment",
        "--set", "operator.predictorImage=registry.local/mlkube/runtime:dev",
        "--set", "operator.allowedImages={registry.local/team,ghcr.io/org/}",
        "--set", "operator.maxRayWorkers=3,operator.maxCpu=2500m,operator.maxMemory=6Gi",
        "--set", "operator.maxReplicas=4,operator.mlflowCredentialsSecret=mlflow-creds",
        "--set", "operator.allowSharedModels=true",
        "--set", "operator.allowedServiceAccounts={ml-reader,team-a/s3-writer}",
    ).stdout  # fmt: skip
    deployment = yaml.safe_load(out)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    for key in list(os.environ):
        if key.startswith("MLKUBE_OPERATOR_") or key == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()
    assert settings.mlflow_tracking_uri == f"http://x-mlkube-mlflow.{RELEASE_NS}.svc:5000"
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.alias_poll_seconds == 12.5
    assert settings.kserve_deployment_mode == "RawDeployment"
    assert settings.predictor_image == "registry.local/mlkube/runtime:dev"
    assert settings.allowed_images == ["registry.local/team", "ghcr.io/org/"]
    assert (settings.max_ray_workers, settings.max_cpu, settings.max_memory) == (3, "2500m", "6Gi")
    assert settings.max_replicas == 4
    assert settings.mlflow_credentials_secret == "mlflow-creds"
    assert settings.allow_shared_models is True
    assert settings.allowed_service_accounts == ["ml-reader", "team-a/s3-writer"]
    assert (settings.metrics_port, settings.health_port) == (9090, 8081)
    fields = {f"MLKUBE_OPERATOR_{name.upper()}" for name in OperatorSettings.model_fields}
    unknown = {k for k in env if k.startswith("MLKUBE_OPERATOR_")} - fields
    assert not unknown, f"the chart sets env vars the operator does not read: {unknown}"
    # Probes and ports follow the settings.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "replicas=-1"], "replicas"),
        (["--set", "replicaCount=2"], "replicaCount"),
        (["--set", "operator.aliasPollSeconds=soon"], "aliasPollSeconds"),
        (["--set", "watchNamespaces=team-a"], "watchNamespaces"),
        (["--set", "mlflow.enabled=yes please"], "enabled"),
        (["--set", "mlflow.backendStore.uri=postgresql://u:p@db/mlflow"], "uri"),
        (["--set", "operator.mlflowTrackingUri=http://user:secret@mlflow:5000"],
         "mlflowTrackingUri"),
        (["--set", "mlflow.env[0].name=AWS_SECRET_ACCESS_KEY,mlflow.env[0].value=x"], "name"),
        (["--set", "operator.maxMemory=lots"], "maxMemory"),
        (["--set", "operator.allowedImages=registry.local/"], "allowedImages"),
        (["--set", "operator.allowedServiceAccounts={team-a/Admin}"], "allowedServiceAccounts"),
    ],
    ids=["negative-replicas", "unknown-key", "wrong-type", "list-as-string", "bool-as-string",
         "inline-database-uri", "credentials-in-uri", "secret-as-plain-env", "bound-no-quantity",
         "images-as-string", "service-account-not-a-name"],
)  # fmt: skip
def test_bad_values_are_refused_at_install_with_the_field_named(
    plane: ControlPlane, release: str, args: list[str], named: str
) -> None:
    # --skip-crds: Helm installs a chart's crds/ before it checks the values, so a refused
    # install still leaves the CRDs behind; this plane's install test wants them absent.
    result = plane.helm(
        "install", release, str(CHART), "-n", RELEASE_NS, "--create-namespace", "--skip-crds",
        *args, check=False,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert named in result.stderr, result.stderr
    listed = plane.helm("list", "-n", RELEASE_NS, "-a", "-q").stdout.split()
    assert release not in listed


# --------------------------------------------------------------------------- install


def test_install_creates_every_object_then_upgrade_and_uninstall(
    plane: ControlPlane, admin: client.ApiClient, release: str
) -> None:
    ext = client.ApiextensionsV1Api(admin)
    # Start without the mlkube CRDs (another test of this module may have installed the
    # chart before), so that Helm creating them is seen.
    plane.kubectl("delete", "crd", *MLKUBE_CRDS, "--ignore-not-found", "--wait=true")
    before = {crd.metadata.name for crd in ext.list_custom_resource_definition().items}
    assert not set(MLKUBE_CRDS) & before
    helm_install(
        plane, release,
        "--set", "mlflow.enabled=true,dashboard.enabled=true",
        "--set", "metrics.serviceMonitor.enabled=true,metrics.predictorPodMonitor.enabled=true",
    )  # fmt: skip

    # The CRDs: created by Helm from the chart's crds/, identical to the repo's crds/.
    crd_files.wait_established(plane, list(MLKUBE_CRDS))
    for path in sorted((CHART / "crds").glob("*.yaml")):
        shipped = yaml.safe_load(path.read_text())
        live = ext.read_custom_resource_definition(shipped["metadata"]["name"])
        live_spec = admin.sanitize_for_serialization(live.spec)
        assert live_spec["names"] == shipped["spec"]["names"]
        assert [v["name"] for v in live_spec["versions"]] == [
            v["name"] for v in shipped["spec"]["versions"]
        ]

    # Every templated object exists.
    objects = manifest(plane, release)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted([
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "NetworkPolicy",
        "PodMonitor", "Service", "ServiceAccount", "ServiceMonitor",
    ]), kinds  # fmt: skip
    missing = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if not exists(plane, o)]
    assert not missing, missing
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {f"{release}-mlkube-operator", f"{release}-mlkube-mlflow"}
    dashboard = next(o for o in objects if o["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["mlkube.json"])["panels"]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == release
        assert labels["app.kubernetes.io/name"] == "mlkube"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"

    # Upgrade: a changed setting lands in the operator's env, revision 2, same objects.
    apps = client.AppsV1Api(admin)
    operator_name = f"{release}-mlkube-operator"
    plane.helm(
        "upgrade", release, str(CHART), "-n", RELEASE_NS, "--reuse-values",
        "--set", "operator.aliasPollSeconds=7,replicas=0",
    )  # fmt: skip
    deployment = apps.read_namespaced_deployment(operator_name, RELEASE_NS)
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert env["MLKUBE_OPERATOR_ALIAS_POLL_SECONDS"] == "7"
    assert deployment.spec.replicas == 0
    status = json.loads(plane.helm("status", release, "-n", RELEASE_NS, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"

    # Uninstall: every templated object goes; the CRDs stay (Helm never deletes crds/, so
    # users' TrainingRuns and ModelDeployments survive an uninstall).
    plane.helm("uninstall", release, "-n", RELEASE_NS, "--wait")
    left = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if exists(plane, o)]
    assert not left, left
    for name in MLKUBE_CRDS:
        ext.read_custom_resource_definition(name)


# --------------------------------------------------------------------------- RBAC


def test_operator_reconciles_under_the_chart_rbac_cluster_wide(
    plane: ControlPlane, admin: client.ApiClient, release: str, mlflow_server: Any
) -> None:
    helm_install(plane, release)
    sa = f"{release}-mlkube-operator"
    user = f"system:serviceaccount:{RELEASE_NS}:{sa}"
    ns = "team-cluster"
    create_namespace(admin, ns)
    kubeconfig = plane.kubeconfig_for_service_account(RELEASE_NS, sa)

    with operator_as(kubeconfig, ["--all-namespaces"]) as runner:
        rayjob, isvc = reconcile_both(admin, ns, mlflow_server.tracking_uri)
    output = runner.output
    denied = [line for line in output.splitlines() if any(e in line for e in AUTHORIZATION_ERRORS)]
    assert not denied, "\n".join(denied[:20])
    assert events_by(admin, ns, "RayJobCreated"), "the operator's Event was not posted"
    assert rayjob["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mlkube-operator"
    assert isvc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mlkube-operator"

    # What it uses, it may; the rest it may not.
    allowed = [
        ("list", "trainingruns.mlkube.io"), ("watch", "modeldeployments.mlkube.io"),
        ("patch", "trainingruns.mlkube.io/status"), ("create", "rayjobs.ray.io"),
        ("patch", "inferenceservices.serving.kserve.io"), ("create", "events"),
        ("list", "pods"),
    ]  # fmt: skip
    refused = [
        ("get", "secrets"), ("list", "secrets"), ("delete", "pods"), ("create", "pods"),
        ("get", "pods"), ("watch", "pods"), ("get", "pods/log"),
        ("get", "configmaps"), ("delete", "rayjobs.ray.io"),
        ("delete", "inferenceservices.serving.kserve.io"),
        ("list", "inferenceservices.serving.kserve.io"),
        ("create", "trainingruns.mlkube.io"), ("delete", "modeldeployments.mlkube.io"),
        ("update", "deployments.apps"), ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("impersonate", "serviceaccounts"), ("create", "serviceaccounts/token"),
        ("list", "namespaces"),
    ]  # fmt: skip
    for verb, resource in allowed:
        assert can_i(plane, user, verb, resource, ns), f"{user} may not {verb} {resource}"
    for verb, resource in refused:
        assert not can_i(plane, user, verb, resource, ns), f"{user} may {verb} {resource}"
    # And by trying, with the ServiceAccount's own token.
    with plane.api_client(kubeconfig) as as_operator:
        core = client.CoreV1Api(as_operator)
        with pytest.raises(ApiException) as refused_secret:
            core.list_namespaced_secret(RELEASE_NS)
        assert refused_secret.value.status == 403
        with pytest.raises(ApiException) as refused_delete:
            core.delete_collection_namespaced_pod(ns)
        assert refused_delete.value.status == 403


def test_operator_reconciles_under_the_chart_rbac_in_listed_namespaces(
    plane: ControlPlane, admin: client.ApiClient, release: str, mlflow_server: Any
) -> None:
    served, other = "team-a", "team-b"
    for ns in (served, other):
        create_namespace(admin, ns)
    helm_install(plane, release, "--set", f"watchNamespaces={{{served}}}")
    objects = manifest(plane, release)
    roles = [(o["kind"], o["metadata"].get("namespace")) for o in objects if "Role" in o["kind"]]
    assert sorted(roles) == sorted([
        ("ClusterRole", None), ("ClusterRoleBinding", None),  # kopf's observation
        ("ClusterRole", None), ("ClusterRole", None),  # users' view and edit
        ("Role", served), ("RoleBinding", served),
    ]), roles  # fmt: skip
    sa = f"{release}-mlkube-operator"
    user = f"system:serviceaccount:{RELEASE_NS}:{sa}"
    kubeconfig = plane.kubeconfig_for_service_account(RELEASE_NS, sa)

    with operator_as(kubeconfig, ["--namespace", served]) as runner:
        reconcile_both(admin, served, mlflow_server.tracking_uri)
    denied = [
        line for line in runner.output.splitlines() if any(e in line for e in AUTHORIZATION_ERRORS)
    ]
    assert not denied, "\n".join(denied[:20])

    assert can_i(plane, user, "create", "rayjobs.ray.io", served)
    assert can_i(plane, user, "list", "namespaces", None)  # kopf's namespace observation
    for verb, resource in [
        ("create", "rayjobs.ray.io"), ("list", "trainingruns.mlkube.io"),
        ("create", "inferenceservices.serving.kserve.io"), ("create", "events"),
    ]:  # fmt: skip
        assert not can_i(plane, user, verb, resource, other), f"{verb} {resource} in {other}"
    assert not can_i(plane, user, "list", "trainingruns.mlkube.io", None)  # not cluster-wide


# --------------------------------------------------------------------------- users' access


def test_namespace_edit_and_view_roles_cover_mlkube_kinds(
    plane: ControlPlane, admin: client.ApiClient, release: str
) -> None:
    """Finding 6: the chart's roles join Kubernetes' own view, edit and admin, so a namespace
    admin hands out TrainingRuns and ModelDeployments with the usual RoleBindings; status
    stays the operator's to write."""
    helm_install(plane, release)
    ns = "team-users"
    create_namespace(admin, ns)
    rbac = client.RbacAuthorizationV1Api(admin)
    for user, role in (("alice", "edit"), ("bob", "view"), ("carol", "admin")):
        rbac.create_namespaced_role_binding(ns, {
            "metadata": {"name": f"{user}-{role}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": user}],
        })  # fmt: skip
    kinds = ("trainingruns.mlkube.io", "modeldeployments.mlkube.io")

    def may(user: str, verb: str, resource: str) -> bool:
        # The aggregation controller fills the roles in shortly after the install.
        deadline = time.monotonic() + 60
        while True:
            answer = can_i(plane, user, verb, resource, ns)
            if answer or time.monotonic() > deadline:
                return answer
            time.sleep(0.5)

    for resource in kinds:
        for verb in ("create", "delete", "patch", "get", "list", "watch"):
            assert may("alice", verb, resource), f"edit: {verb} {resource}"
            assert may("carol", verb, resource), f"admin: {verb} {resource}"
        for verb in ("get", "list", "watch"):
            assert may("bob", verb, resource), f"view: {verb} {resource}"
    for resource in kinds:
        assert not can_i(plane, "bob", "create", resource, ns)
        assert not can_i(plane, "bob", "delete", resource, ns)
        status = plane.kubectl("auth", "can-i", "patch", resource, "--subresource=status",
                               "--as=alice", "-n", ns, check=False).stdout.strip()  # fmt: skip
        assert status == "no", f"edit may patch {resource} status"
        assert not can_i(plane, "alice", "create", resource, "default")  # only where bound
    roles = plane.kubectl("get", "clusterroles", "-l", f"app.kubernetes.io/instance={release}",
                          "-o", "name").stdout.split()  # fmt: skip
    prefix = f"clusterrole.rbac.authorization.k8s.io/{release}-mlkube"
    assert {f"{prefix}-view", f"{prefix}-edit"} <= set(roles)


def test_mlflow_is_reachable_only_by_the_operator_and_the_pods_it_makes(
    plane: ControlPlane,
) -> None:
    """Finding 5: the chart's MLflow server (no auth of its own) gets a NetworkPolicy: in,
    only from the operator's pods and from pods with the label the operator puts on Ray and
    predictor pods, in the namespaces the admin selects; nothing else, on its port only.
    (The policy is checked as objects here: the test plane runs no pods, and the real node's
    bridge network plugin does not enforce NetworkPolicies.)"""
    from mlkube.operator.pods import MLFLOW_CLIENT_LABELS

    out = plane.helm(
        "template", "x", str(CHART), "-n", RELEASE_NS,
        "--show-only", "templates/mlflow-networkpolicy.yaml", "--set", "mlflow.enabled=true",
        "--set-json", 'mlflow.networkPolicy.namespaceSelector={"matchLabels":{"tenant":"yes"}}',
    ).stdout  # fmt: skip
    policy = yaml.safe_load(out)
    assert policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    operator, pods = rule["from"]
    assert operator == {"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "mlkube", "app.kubernetes.io/instance": "x",
        "app.kubernetes.io/component": "operator",
    }}}  # fmt: skip
    assert pods == {"namespaceSelector": {"matchLabels": {"tenant": "yes"}},
                    "podSelector": {"matchLabels": MLFLOW_CLIENT_LABELS}}  # fmt: skip
    # Off with the server, and when the admin turns it off.
    for args in (["--set", "mlflow.enabled=false"],
                 ["--set", "mlflow.enabled=true,mlflow.networkPolicy.enabled=false"]):  # fmt: skip
        rendered = plane.helm("template", "x", str(CHART), *args).stdout
        assert "kind: NetworkPolicy" not in rendered


def test_mlflow_for_a_team_renders_replicas_a_database_and_a_schema_job(
    plane: ControlPlane,
) -> None:
    """The chart's MLflow with a database: several replicas, the URI and the store's keys
    from Secrets, artifacts straight to the store, and a hook Job migrating the schema
    before the servers start; SQLite refuses a second replica."""
    out = plane.helm(
        "template", "x", str(CHART), "-n", RELEASE_NS, "--set", "mlflow.enabled=true",
        "--set", "mlflow.replicas=2", "--set", "mlflow.backendStore.existingSecret=mlflow-db",
        "--set", "mlflow.artifacts.destination=s3://mlflow/artifacts",
        "--set", "mlflow.artifacts.proxied=false", "--set", "mlflow.envFromSecrets={mlflow-s3}",
        "--show-only", "templates/mlflow.yaml", "--show-only", "templates/mlflow-db-job.yaml",
    ).stdout  # fmt: skip
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    deployment, job = docs["Deployment"], docs["Job"]
    assert deployment["spec"]["replicas"] == 2 and "strategy" not in deployment["spec"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--no-serve-artifacts" in server["args"]
    assert "--default-artifact-root=s3://mlflow/artifacts" in server["args"]
    assert server["envFrom"] == [{"secretRef": {"name": "mlflow-s3"}}]
    uri = {"name": "MLFLOW_BACKEND_STORE_URI",
           "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "uri"}}}  # fmt: skip
    assert uri in server["env"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    (upgrade,) = job["spec"]["template"]["spec"]["containers"]
    assert "mlflow db upgrade" in upgrade["command"][-1] and uri in upgrade["env"]
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    # SQLite: one replica, no schema job.
    refused = plane.helm("template", "x", str(CHART), "--set", "mlflow.enabled=true",
                         "--set", "mlflow.replicas=2", check=False)  # fmt: skip
    assert refused.returncode != 0 and "mlflow.replicas" in refused.stderr
    default = plane.helm("template", "x", str(CHART), "--set", "mlflow.enabled=true").stdout
    assert "db-upgrade" not in default and "--serve-artifacts" in default


# --------------------------------------------------------------------------- uninstall


def test_after_uninstall_deleting_resources_and_their_namespace_does_not_hang(
    plane: ControlPlane, admin: client.ApiClient, release: str, mlflow_server: Any
) -> None:
    """Finding 13: the operator (under the chart's RBAC) reconciles a TrainingRun and a
    ModelDeployment and leaves no finalizer on them; after `helm uninstall` (the CRDs and
    the objects stay), `kubectl delete` of both and of their namespace completes."""
    helm_install(plane, release)
    sa = f"{release}-mlkube-operator"
    ns = "team-leaving"
    create_namespace(admin, ns)
    kubeconfig = plane.kubeconfig_for_service_account(RELEASE_NS, sa)
    with operator_as(kubeconfig, ["--namespace", ns]):
        reconcile_both(admin, ns, mlflow_server.tracking_uri)
    custom = client.CustomObjectsApi(admin)
    for plural, name in (("trainingruns", "tr1"), ("modeldeployments", "md1")):
        live = custom.get_namespaced_custom_object(*MLKUBE, ns, plural, name)
        assert not live["metadata"].get("finalizers"), live["metadata"]
    plane.helm("uninstall", release, "-n", RELEASE_NS, "--wait")
    plane.kubectl("delete", "md,tr", "--all", "-n", ns, "--timeout=60s", timeout=70)
    assert plane.kubectl("get", "md,tr", "-n", ns, "-o", "name").stdout == ""
    # And a namespace whose objects are left to the namespace controller.
    custom.create_namespaced_custom_object(*MLKUBE, ns, "trainingruns", trainingrun("tr2"))
    plane.kubectl("delete", "namespace", ns, "--timeout=120s", timeout=130)
    assert not plane.kubectl("get", "namespace", ns, "--ignore-not-found", "-o", "name").stdout
