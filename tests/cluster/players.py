"""Stand-ins for the controllers that cannot run here (no kubelet, no images).

The test control plane stores and validates RayJobs and InferenceServices, but nothing
runs them. These players watch those objects in one namespace, run their commands as
local processes (cwd: the repo root, `python` meaning this venv's python) and write the
status the real controller would write, through the status subresource, with
fieldValidation=Strict so every status they write is checked against the real CRD schema.

    with RayJobPlayer(api_client, namespace):
        ... create a RayJob; it ends Complete/SUCCEEDED or Failed/FAILED

    with InferenceServicePlayer(api_client, namespace):
        ... create an InferenceService; it gets Ready with a loopback url

What they play (checked against KubeRay's rayjob_controller.go and KServe's
inference_service_status.go; see tests/cluster/README.md for the full list):

- RayJob (ray.io/v1): jobDeploymentStatus Initializing (jobId, rayClusterName,
  startTime) -> Running (jobStatus PENDING -> RUNNING, dashboardURL, rayJobInfo) ->
  Complete with jobStatus SUCCEEDED, or Failed with jobStatus FAILED, reason AppFailed and
  Ray's message with the tail of stderr; endTime, succeeded/failed counters. A RayCluster
  owned by the RayJob is created from spec.rayClusterSpec (so that spec is validated by
  the real RayCluster schema too) and deleted after the job when
  shutdownAfterJobFinishes (after ttlSecondsAfterFinished). activeDeadlineSeconds ends it
  Failed/DeadlineExceeded. Deleting the RayJob kills the process. Not played: suspend,
  backoffLimit retries, deletionStrategy, clusterSelector clusters' lifecycle.
- InferenceService (serving.kserve.io/v1beta1): spec.predictor.containers
  (kserve-container, else the first) is started with `--http_port=<free port>
  --grpc_port=<free port>` appended (replacing any given) and env PORT=<http port>, and
  is Ready once GET /v2/health/ready or /v1/models answers 200. Knative mode (default, or
  annotation serving.kserve.io/deploymentMode: Knative|Serverless): each change of the
  predictor template (anything but canaryTrafficPercent) is a new revision
  `<name>-predictor-0000N`; traffic, latestReadyRevision, latestRolledoutRevision and
  previousRolledoutRevision follow KServe's PropagateStatus, canaryTrafficPercent splits
  traffic between tags `latest` and `prev`, and each traffic entry's url points at that
  revision's process. Standard mode (annotation Standard|RawDeployment): one process,
  restarted on spec change, no revisions or traffic.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from mlkube.local import free_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
FIELD_MANAGER = "mlkube-test-player"

Obj = dict[str, Any]
EventHandler = Callable[[str, Obj], None]


def now() -> str:
    """RFC 3339 UTC, second precision, as Kubernetes metav1.Time serializes."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rand5() -> str:
    # KubeRay's rand.String(5): lowercase letters and digits.
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def _local_env(extra: Mapping[str, str]) -> dict[str, str]:
    """os.environ + extra, with this venv's bin first so `python` is the venv's python."""
    env = dict(os.environ)
    env.update(extra)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    return env


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-chars:].decode(errors="replace")


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL after `grace`: entrypoints are shell commands
    whose children (python, ray workers) must go too."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class _Watcher:
    """List + watch one custom resource in one namespace on a daemon thread.

    Calls `handler(type, obj)` for ADDED / MODIFIED / DELETED, in order. Re-lists after
    a 410 Gone (and synthesizes DELETED for objects that vanished meanwhile). Short
    server-side watch timeouts keep stop() prompt.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        handler: EventHandler,
    ) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self._args = (group, version, namespace, plural)
        self._handler = handler
        self._stop = threading.Event()
        self._known: dict[str, Obj] = {}
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{plural}-{namespace}", daemon=True
        )
        self.synced = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _emit(self, kind: str, obj: Obj) -> None:
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self._known.pop(uid, None)
        else:
            self._known[uid] = obj
        try:
            self._handler(kind, obj)
        except Exception:
            log.exception("player handler failed on %s %s", kind, obj["metadata"].get("name"))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listing = cast(Obj, self._api.list_namespaced_custom_object(*self._args))
                rv = listing["metadata"]["resourceVersion"]
                present = {o["metadata"]["uid"]: o for o in listing.get("items", [])}
                for uid, gone in list(self._known.items()):
                    if uid not in present:
                        self._emit("DELETED", gone)
                for obj in present.values():
                    self._emit("ADDED", obj)
                self.synced.set()
                while not self._stop.is_set():
                    w = watch.Watch()
                    for event in w.stream(
                        self._api.list_namespaced_custom_object,
                        *self._args,
                        resource_version=rv,
                        timeout_seconds=1,
                        allow_watch_bookmarks=True,
                    ):
                        obj = event["raw_object"]
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._emit(event["type"], obj)
                        if self._stop.is_set():
                            w.stop()
                            break
            except ApiException as e:
                if e.status != 410:
                    log.warning("watch %s failed: %s", self._args, e)
                    self._stop.wait(0.5)
            except Exception as e:  # connection reset while the server stops, etc.
                if not self._stop.is_set():
                    log.warning("watch %s failed: %r", self._args, e)
                    self._stop.wait(0.5)


class _Player:
    group = ""
    version = ""
    plural = ""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self._stopping = threading.Event()
        self._watcher = _Watcher(
            api_client, self.group, self.version, self.plural, namespace, self._on_event
        )
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"mlkube-{self.plural}-"))

    def __enter__(self) -> _Player:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._watcher.start()
        if not self._watcher.synced.wait(30):
            self.stop()
            raise TimeoutError(f"{type(self).__name__}: could not list {self.plural}")

    def stop(self) -> None:
        self._stopping.set()
        self._watcher.stop()
        self._shutdown()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def _on_event(self, kind: str, obj: Obj) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    def patch_status(self, name: str, status: Obj) -> bool:
        """Merge-patch .status; False when the object is gone. Strict validation makes a
        status that the real CRD schema would prune fail loudly instead."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                self.group,
                self.version,
                self.namespace,
                self.plural,
                name,
                {"status": status},
                field_manager=FIELD_MANAGER,
                field_validation="Strict",
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise


# --------------------------------------------------------------------------- RayJob


@dataclass
class _RayJobRun:
    name: str
    uid: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    proc: subprocess.Popen[bytes] | None = None
    stdout: Path | None = None
    stderr: Path | None = None


class RayJobPlayer(_Player):
    """Plays KubeRay for RayJobs (ray.io/v1) in `namespace`; see the module docstring."""

    group, version, plural = "ray.io", "v1", "rayjobs"

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        *,
        cwd: Path = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        create_ray_cluster: bool = True,
    ) -> None:
        super().__init__(api_client, namespace)
        self.cwd = cwd
        self.env = dict(env or {})
        self.create_ray_cluster = create_ray_cluster
        self._runs: dict[str, _RayJobRun] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RayJobPlayer:
        self.start()
        return self

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        """The entrypoint process of RayJob `name` (the newest, if several), or None."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.name == name]
        return runs[-1].proc if runs else None

    def logs(self, name: str) -> tuple[str, str]:
        """(stdout, stderr) of the RayJob's entrypoint so far."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.name == name]
        if not runs or runs[-1].stdout is None or runs[-1].stderr is None:
            return "", ""
        run = runs[-1]
        assert run.stdout is not None and run.stderr is not None
        return _tail(run.stdout, 1 << 20), _tail(run.stderr, 1 << 20)

    def _on_event(self, kind: str, obj: Obj) -> None:
        meta = obj["metadata"]
        uid = meta["uid"]
        with self._lock:
            run = self._runs.get(uid)
            if kind == "DELETED":
                if run:
                    run.cancelled.set()
                return
            if run is not None or self._stopping.is_set():
                return
            status = obj.get("status") or {}
            # Only new RayJobs: one already initialized belongs to an earlier player.
            if status.get("jobDeploymentStatus"):
                return
            run = _RayJobRun(meta["name"], uid)
            run.thread = threading.Thread(
                target=self._play, args=(run, obj), name=f"rayjob-{meta['name']}", daemon=True
            )
            self._runs[uid] = run
        run.thread.start()

    def _shutdown(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.cancelled.set()
        for run in runs:
            if run.thread:
                run.thread.join(timeout=15)

    def _play(self, run: _RayJobRun, obj: Obj) -> None:
        try:
            self._play_inner(run, obj)
        except Exception:
            log.exception("RayJob player failed on %s", run.name)
        finally:
            if run.proc is not None:
                _kill_group(run.proc)

    def _play_inner(self, run: _RayJobRun, obj: Obj) -> None:
        spec = obj.get("spec") or {}
        name, ns = run.name, self.namespace
        generation = obj["metadata"].get("generation", 1)
        job_id = spec.get("jobId") or f"{name}-{_rand5()}"
        selected = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
        cluster = selected or f"{name}-{_rand5()}"
        started = now()
        started_mono = time.monotonic()
        if not self.patch_status(
            name,
            {
                "jobId": job_id,
                "rayClusterName": cluster,
                "jobDeploymentStatus": "Initializing",
                "startTime": started,
                "observedGeneration": generation,
            },
        ):
            return

        cluster_status: Obj = {}
        created_cluster = False
        if self.create_ray_cluster and not selected and spec.get("rayClusterSpec"):
            try:
                cluster_status = self._create_cluster(obj, cluster)
                created_cluster = True
            except ApiException as e:
                # KubeRay keeps retrying and stays Initializing; say why in the message.
                self.patch_status(name, {"message": f"Failed to create RayCluster: {e.body}"})
                return

        dashboard = f"{cluster}-head-svc.{ns}.svc.cluster.local:8265"
        running: Obj = {
            "jobDeploymentStatus": "Running",
            "jobStatus": "PENDING",
            "dashboardURL": dashboard,
        }
        if cluster_status:
            running["rayClusterStatus"] = cluster_status
        if not self.patch_status(name, running) or run.cancelled.is_set():
            return

        env = dict(self.env)
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        for k, v in (runtime_env.get("env_vars") or {}).items():
            env[str(k)] = str(v)
        env.setdefault("RAY_JOB_SUBMISSION_ID", job_id)
        run.stdout = self.log_dir / f"{name}.stdout"
        run.stderr = self.log_dir / f"{name}.stderr"
        with run.stdout.open("wb") as out, run.stderr.open("wb") as err:
            run.proc = subprocess.Popen(
                ["/bin/sh", "-c", spec.get("entrypoint") or "true"],
                cwd=self.cwd,
                env=_local_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        job_started = now()
        if not self.patch_status(
            name,
            {
                "jobStatus": "RUNNING",
                "rayJobInfo": {"startTime": job_started},
            },
        ):
            return

        deadline = spec.get("activeDeadlineSeconds")
        while run.proc.poll() is None:
            if run.cancelled.wait(0.1):
                return  # deleted, or the player stops: _play kills the process
            if deadline and time.monotonic() - started_mono > float(deadline):
                _kill_group(run.proc)
                self.patch_status(
                    name,
                    {
                        "jobDeploymentStatus": "Failed",
                        "reason": "DeadlineExceeded",
                        "message": (
                            f"The RayJob has passed the activeDeadlineSeconds. StartTime: "
                            f"{started}. ActiveDeadlineSeconds: {deadline}"
                        ),
                        "endTime": now(),
                        "failed": 1,
                        "succeeded": 0,
                    },
                )
                self._finish_cluster(run, spec, cluster, created_cluster)
                return

        code = run.proc.returncode
        ended = now()
        final: Obj = {"endTime": ended, "rayJobInfo": {"startTime": job_started, "endTime": ended}}
        if code == 0:
            final.update(
                {
                    "jobStatus": "SUCCEEDED",
                    "jobDeploymentStatus": "Complete",
                    "message": "Job finished successfully.",
                    "succeeded": 1,
                    "failed": 0,
                }
            )
        else:
            final.update(
                {
                    "jobStatus": "FAILED",
                    "jobDeploymentStatus": "Failed",
                    "reason": "AppFailed",
                    # Ray's own wording, with the log tail it appends.
                    "message": (
                        f"Job entrypoint command failed with exit code {code}, last available "
                        f"logs (truncated to 20,000 chars):\n{_tail(run.stderr)}"
                    ),
                    "succeeded": 0,
                    "failed": 1,
                }
            )
        self.patch_status(name, final)
        self._finish_cluster(run, spec, cluster, created_cluster)

    def _create_cluster(self, rayjob: Obj, cluster: str) -> Obj:
        meta = rayjob["metadata"]
        spec = copy.deepcopy(rayjob["spec"]["rayClusterSpec"])
        body = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {
                "name": cluster,
                "namespace": self.namespace,
                "labels": {
                    **(meta.get("labels") or {}),
                    "ray.io/originated-from-cr-name": meta["name"],
                    "ray.io/originated-from-crd": "RayJob",
                },
                "ownerReferences": [
                    {
                        "apiVersion": "ray.io/v1",
                        "kind": "RayJob",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(
            "ray.io",
            "v1",
            self.namespace,
            "rayclusters",
            body,
            field_manager=FIELD_MANAGER,
            field_validation="Strict",
        )
        workers = sum(
            int(g.get("replicas", g.get("minReplicas", 0)) or 0)
            for g in spec.get("workerGroupSpecs") or []
        )
        status = {
            "state": "ready",
            "desiredWorkerReplicas": workers,
            "readyWorkerReplicas": workers,
            "availableWorkerReplicas": workers,
            "head": {"serviceName": f"{cluster}-head-svc"},
            "lastUpdateTime": now(),
            "observedGeneration": 1,
        }
        self.custom.patch_namespaced_custom_object_status(
            "ray.io",
            "v1",
            self.namespace,
            "rayclusters",
            cluster,
            {"status": status},
            field_manager=FIELD_MANAGER,
            field_validation="Strict",
        )
        return status

    def _finish_cluster(self, run: _RayJobRun, spec: Obj, cluster: str, created: bool) -> None:
        # KubeRay deletes the RayCluster ttlSecondsAfterFinished after the end, and only
        # with shutdownAfterJobFinishes (default false: clusters linger).
        if not (created and spec.get("shutdownAfterJobFinishes")):
            return
        if run.cancelled.wait(float(spec.get("ttlSecondsAfterFinished") or 0)):
            return
        with contextlib.suppress(ApiException):
            self.custom.delete_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayclusters", cluster
            )


# --------------------------------------------------------------------------- InferenceService


@dataclass
class _Revision:
    name: str
    template_hash: str
    proc: subprocess.Popen[bytes]
    port: int
    grpc_port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class _Isvc:
    name: str
    uid: str
    inbox: queue.Queue[Obj | None] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    handled_generation: int = 0
    counter: int = 0
    revisions: dict[str, _Revision] = field(default_factory=dict)
    latest_created: str = ""
    latest_ready: str = ""
    latest_rolled: str = ""
    previous_rolled: str = ""
    traffic: list[Obj] = field(default_factory=list)
    conditions: dict[str, Obj] = field(default_factory=dict)
    last_status: Obj = field(default_factory=dict)


def _deployment_mode(obj: Obj, default: str) -> str:
    mode = (obj["metadata"].get("annotations") or {}).get(
        "serving.kserve.io/deploymentMode", default
    )
    # KServe 0.16 renamed the modes; the old names still work.
    return {"Serverless": "Knative", "RawDeployment": "Standard"}.get(mode, mode)


def _without_port_args(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--http_port", "--grpc_port"):
            skip = True
            continue
        if a.startswith(("--http_port=", "--grpc_port=")):
            continue
        out.append(a)
    return out


class InferenceServicePlayer(_Player):
    """Plays KServe for InferenceServices (serving.kserve.io/v1beta1) in `namespace`."""

    group, version, plural = "serving.kserve.io", "v1beta1", "inferenceservices"

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        *,
        cwd: Path = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        default_mode: str = "Knative",
        ready_timeout: float = 120.0,
    ) -> None:
        super().__init__(api_client, namespace)
        self.cwd = cwd
        self.env = dict(env or {})
        self.default_mode = default_mode
        self.ready_timeout = ready_timeout
        self._isvcs: dict[str, _Isvc] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> InferenceServicePlayer:
        self.start()
        return self

    def logs(self, name: str) -> dict[str, tuple[str, str]]:
        """{revision: (stdout, stderr)} of the InferenceService's predictor processes."""
        with self._lock:
            states = [s for s in self._isvcs.values() if s.name == name]
        if not states:
            return {}
        return {
            r.name: (_tail(r.stdout, 1 << 20), _tail(r.stderr, 1 << 20))
            for r in list(states[-1].revisions.values())
        }

    def _on_event(self, kind: str, obj: Obj) -> None:
        meta = obj["metadata"]
        with self._lock:
            state = self._isvcs.get(meta["uid"])
            if kind == "DELETED":
                if state:
                    state.inbox.put(None)
                return
            if self._stopping.is_set():
                return
            if state is None:
                state = _Isvc(meta["name"], meta["uid"])
                state.thread = threading.Thread(
                    target=self._worker, args=(state,), name=f"isvc-{meta['name']}", daemon=True
                )
                self._isvcs[meta["uid"]] = state
                state.inbox.put(obj)
                state.thread.start()
                return
        state.inbox.put(obj)

    def _shutdown(self) -> None:
        with self._lock:
            states = list(self._isvcs.values())
        for s in states:
            s.inbox.put(None)
        for s in states:
            if s.thread:
                s.thread.join(timeout=20)

    # ---- per-InferenceService worker

    def _worker(self, state: _Isvc) -> None:
        try:
            while True:
                try:
                    obj = state.inbox.get(timeout=0.5)
                except queue.Empty:
                    self._check_alive(state)
                    continue
                # Only the newest spec matters; a None (delete/stop) wins.
                while obj is not None:
                    try:
                        newer = state.inbox.get_nowait()
                    except queue.Empty:
                        break
                    obj = newer
                if obj is None or self._stopping.is_set():
                    return
                generation = int(obj["metadata"].get("generation", 1))
                if generation <= state.handled_generation:
                    continue
                try:
                    self._reconcile(state, obj)
                except Exception:
                    log.exception("InferenceService player failed on %s", state.name)
                state.handled_generation = generation
        finally:
            for rev in list(state.revisions.values()):
                _kill_group(rev.proc)

    def _container(self, obj: Obj) -> Obj | None:
        containers = ((obj.get("spec") or {}).get("predictor") or {}).get("containers") or []
        for c in containers:
            if c.get("name") == "kserve-container":
                return dict(c)
        return dict(containers[0]) if containers else None

    def _template_hash(self, obj: Obj, mode: str) -> str:
        predictor = dict((obj.get("spec") or {}).get("predictor") or {})
        predictor.pop("canaryTrafficPercent", None)  # traffic, not a new revision
        blob = json.dumps([mode, predictor], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _reconcile(self, state: _Isvc, obj: Obj) -> None:
        generation = int(obj["metadata"].get("generation", 1))
        mode = _deployment_mode(obj, self.default_mode)
        container = self._container(obj)
        if container is None or not (container.get("command") or container.get("args")):
            self._publish(
                state,
                obj,
                mode,
                failure={
                    "reason": "InvalidPredictorSpec",
                    "message": "the test player runs only spec.predictor.containers "
                    "(kserve-container) with a command; model formats need KServe",
                },
            )
            return
        template = self._template_hash(obj, mode)
        current = state.revisions.get(state.latest_created)
        if current is None or current.template_hash != template:
            state.counter += 1
            rev_name = f"{state.name}-predictor-{state.counter:05d}"
            state.latest_created = rev_name
            self._publish(state, obj, mode, progressing=True)
            rev, failure = self._start_revision(state, rev_name, template, container)
            if rev is None:
                self._publish(state, obj, mode, failure=failure)
                return
            state.revisions[rev_name] = rev
            state.latest_ready = rev_name
        elif state.latest_ready != state.latest_created:
            # Same template as a revision that failed: KServe would not retry either.
            return
        self._route(state, obj, mode)
        self._publish(state, obj, mode)
        log.debug("isvc %s generation %s ready", state.name, generation)

    def _start_revision(
        self, state: _Isvc, rev_name: str, template: str, container: Obj
    ) -> tuple[_Revision | None, Obj]:
        port, grpc_port = free_port(), free_port()
        argv = [
            *(container.get("command") or []),
            *_without_port_args(list(container.get("args") or [])),
        ]
        argv += [f"--http_port={port}", f"--grpc_port={grpc_port}"]
        env = dict(self.env)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "valueFrom" not in item:
                env[item["name"]] = ""
        env["PORT"] = str(port)  # Knative's convention for the serving port
        stdout = self.log_dir / f"{rev_name}.stdout"
        stderr = self.log_dir / f"{rev_name}.stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                cwd=self.cwd,
                env=_local_env(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        rev = _Revision(rev_name, template, proc, port, grpc_port, stdout, stderr)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None, {
                    "reason": "ModelLoadFailed",
                    "message": f"predictor exited with {proc.returncode}: {_tail(stderr)}",
                    "exitCode": proc.returncode,
                    "modelRevisionName": rev_name,
                }
            if self._stopping.is_set() or not state.inbox.empty() and self._deleted(state):
                _kill_group(proc)
                return None, {"reason": "ModelLoadFailed", "message": "stopped"}
            if _http_ready(rev.url):
                return rev, {}
            time.sleep(0.2)
        _kill_group(proc)
        return None, {
            "reason": "ModelLoadFailed",
            "message": f"predictor not ready after {self.ready_timeout}s: {_tail(stderr)}",
            "modelRevisionName": rev_name,
        }

    def _deleted(self, state: _Isvc) -> bool:
        # Peek for a queued delete without losing newer specs.
        items: list[Obj | None] = []
        while True:
            try:
                items.append(state.inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            state.inbox.put(item)
        return any(item is None for item in items)

    def _route(self, state: _Isvc, obj: Obj, mode: str) -> None:
        """Traffic as KServe's ksvc reconciler asks Knative for it, and the rolled-out
        bookkeeping of its PropagateStatus; then stop revisions that get no traffic."""
        latest = state.latest_ready
        if mode != "Knative":
            state.traffic = []
            keep = {latest}
        else:
            canary = ((obj.get("spec") or {}).get("predictor") or {}).get("canaryTrafficPercent")
            prev = state.latest_rolled
            traffic: list[Obj]
            if canary is not None and prev and prev != latest and int(canary) < 100:
                traffic = [
                    {
                        "tag": "latest",
                        "revisionName": latest,
                        "latestRevision": True,
                        "percent": int(canary),
                    }
                ]
                if int(canary) < 100:
                    traffic.append(
                        {
                            "tag": "prev",
                            "revisionName": prev,
                            "latestRevision": False,
                            "percent": 100 - int(canary),
                        }
                    )
            else:
                traffic = [
                    {
                        "tag": "latest",
                        "revisionName": latest,
                        "latestRevision": True,
                        "percent": 100,
                    }
                ]
            for t in traffic:
                t["url"] = state.revisions[t["revisionName"]].url
            state.traffic = traffic
            if traffic[0]["percent"] == 100 and state.latest_rolled != latest:
                state.previous_rolled = state.latest_rolled
                state.latest_rolled = latest
            keep = {t["revisionName"] for t in traffic}
        for name in list(state.revisions):
            if name not in keep:
                _kill_group(state.revisions.pop(name).proc)

    def _serving_url(self, state: _Isvc) -> str:
        # Knative splits the one URL by percent; locally it points at the revision with
        # the most traffic (ties: the latest). Each traffic entry has its own url too.
        if state.traffic:
            best = max(state.traffic, key=lambda t: (t["percent"], t["latestRevision"]))
            return str(best["url"])
        rev = state.revisions.get(state.latest_ready)
        return rev.url if rev else ""

    def _condition(
        self, state: _Isvc, ctype: str, status: str, reason: str = "", message: str = ""
    ) -> Obj:
        old = state.conditions.get(ctype)
        cond: Obj = {"type": ctype, "status": status}
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message[-2000:]
        if old is not None and old.get("status") == status:
            cond["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            cond["lastTransitionTime"] = now()
        state.conditions[ctype] = cond
        return cond

    def _publish(
        self,
        state: _Isvc,
        obj: Obj,
        mode: str,
        *,
        progressing: bool = False,
        failure: Obj | None = None,
    ) -> None:
        generation = int(obj["metadata"].get("generation", 1))
        serving = bool(state.latest_ready) and state.latest_ready in state.revisions
        url = self._serving_url(state) if serving else ""
        if failure:
            pred = ("False", "RevisionFailed", failure.get("message", ""))
        elif progressing:
            pred = ("Unknown", "RevisionMissing", f"Revision {state.latest_created} is starting")
        elif mode == "Knative":
            pred = ("True", "", "")
        else:
            # Raw mode copies the Deployment's reason; this one says the new pods serve.
            pred = ("True", "NewReplicaSetAvailable", "")
        ingress = (
            ("True", "", "") if serving else ("Unknown", "RevisionMissing", "no ready revision")
        )
        conds = [
            self._condition(state, "IngressReady", *ingress),
            self._condition(state, "PredictorReady", *pred),
        ]
        if mode == "Knative":
            conds += [
                self._condition(state, "LatestDeploymentReady", *pred),
                self._condition(state, "PredictorConfigurationReady", *pred),
                self._condition(state, "PredictorRouteReady", *ingress),
                self._condition(state, "RoutesReady", *ingress),
            ]
        ready = (
            "True"
            if pred[0] == "True" and ingress[0] == "True"
            else ("False" if "False" in (pred[0], ingress[0]) else "Unknown")
        )
        ready_reason = "" if ready == "True" else (pred[1] or ingress[1])
        conds.append(self._condition(state, "Ready", ready, ready_reason, pred[2] or ingress[2]))
        conds.sort(key=lambda c: c["type"])

        component: Obj = {}
        if mode == "Knative":
            component.update(
                {
                    "latestCreatedRevision": state.latest_created or None,
                    "latestReadyRevision": state.latest_ready or None,
                    "latestRolledoutRevision": state.latest_rolled or None,
                    "previousRolledoutRevision": state.previous_rolled or None,
                    "traffic": state.traffic or None,
                }
            )
        if url:
            component.update({"url": url, "restUrl": url, "address": {"url": url}})

        copies = sum(1 for r in state.revisions.values() if r.proc.poll() is None)
        active = "Loaded" if serving else "Pending"
        if failure:
            model_status: Obj = {
                "transitionStatus": "InvalidSpec"
                if failure.get("reason") == "InvalidPredictorSpec"
                else "BlockedByFailedLoad",
                "states": {"activeModelState": active, "targetModelState": "FailedToLoad"},
                "copies": {"failedCopies": 1, "totalCopies": copies},
                "lastFailureInfo": {
                    **{k: v for k, v in failure.items() if k != "message"},
                    "message": str(failure.get("message", ""))[-2000:],
                    "time": now(),
                },
            }
        elif progressing:
            model_status = {
                "transitionStatus": "InProgress",
                "states": {"activeModelState": active, "targetModelState": "Pending"},
                "copies": {"failedCopies": 0, "totalCopies": copies},
                "lastFailureInfo": None,
            }
        else:
            model_status = {
                "transitionStatus": "UpToDate",
                "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                "copies": {"failedCopies": 0, "totalCopies": copies},
                "lastFailureInfo": None,
            }
        status: Obj = {
            "observedGeneration": generation,
            "deploymentMode": mode,
            "url": url or None,
            "address": {"url": url} if url else None,
            "conditions": conds,
            "components": {"predictor": component},
            "modelStatus": model_status,
        }
        state.last_status = status
        self.patch_status(state.name, status)

    def _check_alive(self, state: _Isvc) -> None:
        """A serving process that died makes the predictor not ready (as a crashed pod)."""
        dead = [r for r in state.revisions.values() if r.proc.poll() is not None]
        if not dead or not state.last_status:
            return
        for rev in dead:
            state.revisions.pop(rev.name, None)
            message = f"revision {rev.name} exited with {rev.proc.returncode}: {_tail(rev.stderr)}"
            log.warning("isvc %s: %s", state.name, message)
            try:
                obj = cast(
                    Obj,
                    self.custom.get_namespaced_custom_object(
                        self.group, self.version, self.namespace, self.plural, state.name
                    ),
                )
            except ApiException:
                return
            mode = _deployment_mode(obj, self.default_mode)
            if rev.name == state.latest_ready:
                state.latest_ready = ""
            self._publish(
                state,
                obj,
                mode,
                failure={
                    "reason": "ModelLoadFailed",
                    "message": message,
                    "exitCode": rev.proc.returncode,
                    "modelRevisionName": rev.name,
                },
            )


def _http_ready(base: str) -> bool:
    for path in ("/v2/health/ready", "/v1/models"):
        try:
            with urllib.request.urlopen(base + path, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            continue
    return False


# --------------------------------------------------------------------------- waiting


def wait_for_object(
    api_client: client.ApiClient,
    group: str,
    version: str,
    plural: str,
    namespace: str,
    name: str,
    predicate: Callable[[Obj], bool],
    timeout: float = 120.0,
    what: str = "",
) -> Obj:
    """Poll a custom object until `predicate(obj)`; on timeout fail with its last status.

    Note the argument order: (group, version, plural) as one tuple, then namespace, name
    (CustomObjectsApi takes namespace before plural)."""
    api = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    last: Obj = {}
    while True:
        try:
            last = cast(
                Obj, api.get_namespaced_custom_object(group, version, namespace, plural, name)
            )
            if predicate(last):
                return last
        except ApiException as e:
            if e.status != 404:
                raise
        if time.monotonic() > deadline:
            if not last:
                path = f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"
                raise AssertionError(f"{path} was never found in {timeout}s")
            raise AssertionError(
                f"{namespace}/{plural}/{name} did not reach {what or 'the expected state'} "
                f"in {timeout}s; status: {json.dumps(last.get('status'), indent=1)[:4000]}"
            )
        time.sleep(0.2)


def wait_gone(read: Callable[..., object], *args: str, timeout: float = 120.0) -> bool:
    """Poll `read(*args)` until it raises ApiException 404 (True) or `timeout` passes
    (False); any other ApiException is re-raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            read(*args)
        except ApiException as e:
            if e.status == 404:
                return True
            raise
        time.sleep(0.2)
    return False


def condition(obj: Obj, ctype: str) -> str | None:
    """The status ('True'/'False'/'Unknown') of condition `ctype`, or None."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return str(c.get("status"))
    return None
