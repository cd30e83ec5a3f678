"""A real one-node Kubernetes for tests: the control plane of controlplane.py plus
containerd, runc and CNI bridge networking, kubelet, kube-proxy (nftables), the scheduler and
CoreDNS, all on this machine.

    with Node() as node:
        node.control_plane.kubectl("run", ...)     # pods really run
        node.escaped()                            # traffic stopped on its way out: []

Every binary comes from tests/cluster/build.sh (Go modules) or Debian packages
(tests/cluster/node-deps.sh); images are imported from docker archives. Nothing leaves the
machine: pods sit on a bridge of our own whose traffic may not be forwarded to any other
interface, CoreDNS answers cluster names only, and the node's daemons run in a cgroup whose
packets to anything but loopback and the cluster's ranges are dropped and recorded.
Stopping leaves nothing behind: no process, mount, network namespace, bridge, nftables table
or cgroup, and the kernel settings kubelet and kube-proxy change are put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlkube.local import free_port
from tests.cluster.addresses import BRIDGE, HOST_IP, POD_CIDR, SERVICE_CIDR, SERVICE_IP
from tests.cluster.controlplane import (
    Binaries,
    BinariesMissing,
    ControlPlane,
    ManagedProcess,
    NodeNetwork,
    binaries_dir,
    spawn,
)
from tests.cluster.images import single_binary_image

NODE_NAME = "mlkube-node"
CLUSTER_DOMAIN = "cluster.local"
NETWORK = NodeNetwork(host_ip=HOST_IP, service_cidr=SERVICE_CIDR, service_ip=SERVICE_IP)

GUARD_TABLE = "mlkube_guard"  # nftables table (family inet)
CGROUP_NAME = "mlkube-node"  # kubelet's cgroupRoot in every v1 hierarchy; the daemons' v2 cgroup
PAUSE_IMAGE = "docker.io/mlkube/pause:1"

# Kernel settings the node's daemons are known to change (kubelet: overcommit and panic;
# kube-proxy: conntrack and route_localnet), saved at start and put back at stop.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
# Paths the CNI plugins and kubelet use whatever their configuration says.
FIXED_PATHS = (
    Path("/var/lib/cni"),
    Path("/var/lib/kubelet"),
    Path("/run/containerd"),
    Path("/var/run/netns"),
)
DEBIAN_TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "nft": "nftables",
    "ip": "iproute2",
    "conntrack": "conntrack",
}
CNI_DIR = Path("/usr/lib/cni")


def cache_root() -> Path:
    return Path(os.environ.get("MLKUBE_K8S_CACHE") or Path.home() / ".cache" / "mlkube")


@dataclass(frozen=True)
class NodeBinaries:
    control_plane: Binaries
    kubelet: Path
    kube_proxy: Path
    kube_scheduler: Path
    coredns: Path
    pause: Path

    @classmethod
    def find(cls) -> NodeBinaries:
        where = binaries_dir()
        names = ["kubelet", "kube-proxy", "kube-scheduler", "coredns", "pause"]
        missing = [n for n in names if not os.access(where / n, os.X_OK)]
        if missing:
            raise BinariesMissing(
                f"missing {', '.join(missing)} in {where}: run `make k8s-binaries`"
            )
        tools = [t for t in DEBIAN_TOOLS if not shutil.which(t)]
        if tools or not (CNI_DIR / "bridge").exists():
            packages = sorted({DEBIAN_TOOLS[t] for t in tools} | {"containernetworking-plugins"})
            raise BinariesMissing(
                f"missing {', '.join(tools) or 'CNI plugins'}: run `make node-deps` "
                f"(apt-get install {' '.join(packages)})"
            )
        return cls(
            control_plane=Binaries.find(),
            kubelet=where / "kubelet",
            kube_proxy=where / "kube-proxy",
            kube_scheduler=where / "kube-scheduler",
            coredns=where / "coredns",
            pause=where / "pause",
        )


def _sh(*argv: str | Path, check: bool = True, input: str | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, input=input, timeout=120
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {result.stderr.strip()}")
    return result.stdout


def _read_sysctl(name: str) -> str | None:
    with contextlib.suppress(OSError):
        return (Path("/proc/sys") / name).read_text().strip()
    return None


def _write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / name).write_text(value + "\n")


def cgroup_v1_hierarchies() -> list[Path]:
    """Mount points of the cgroup v1 hierarchies (one per controller here)."""
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup":
            roots.append(Path(fields[1]))
    return roots


def cgroup_v2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def mounts_under(paths: Iterable[Path]) -> list[str]:
    """Mount points at or below any of `paths`, deepest first."""
    prefixes = [str(p.resolve()) for p in paths]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def netns_names() -> set[str]:
    with contextlib.suppress(OSError):
        return set(os.listdir("/var/run/netns"))
    return set()


class Node:
    """One real node and its control plane. Needs root."""

    def __init__(
        self,
        *,
        binaries: NodeBinaries | None = None,
        images: Sequence[Path] = (),
        start_timeout: float = 180.0,
    ) -> None:
        if os.geteuid() != 0:
            raise BinariesMissing("a real node needs root (network, cgroups, mounts)")
        self.binaries = binaries or NodeBinaries.find()
        self.images = list(images)
        self.start_timeout = start_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="mlkube-node-"))
        self.logs = self.workdir / "logs"
        # Images survive the node: importing a runtime image takes longer than a start.
        self.containerd_root = cache_root() / "node" / "containerd"
        self.control_plane = ControlPlane(
            binaries=self.binaries.control_plane,
            workdir=self.workdir / "control-plane",
            node=NETWORK,
            start_timeout=start_timeout,
        )
        self._procs: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self._started_kubelet = False
        self.socket = self.workdir / "containerd" / "containerd.sock"

    # ---- public surface

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def start(self) -> Node:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, **kwargs)

    def ctr(self, *args: str, check: bool = True) -> str:
        return _sh("ctr", f"--address={self.socket}", "-n", "k8s.io", *args, check=check)

    def import_image(self, archive: Path) -> None:
        """Import a docker archive into the node's image store (a no-op for an image whose
        layers are already there, apart from reading the archive)."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def escaped(self) -> list[str]:
        """Destinations (address, protocol, port) that a pod or a node daemon tried to reach
        beyond the machine and the cluster's ranges; each was dropped."""
        out = _sh("nft", "-j", "list", "set", "inet", GUARD_TABLE, "escaped", check=False)
        if not out:
            return []
        found = []
        for item in json.loads(out).get("nftables", []):
            for element in item.get("set", {}).get("elem", []):
                value = element.get("elem", {}).get("val", element)
                if isinstance(value, dict) and "concat" in value:
                    found.append(" ".join(str(v) for v in value["concat"]))
                else:
                    found.append(str(value))
        return found

    def forget_escapes(self) -> None:
        """Clear the guard's record (after a test that tried to escape on purpose)."""
        for name in ("escaped", "escaped6"):
            _sh("nft", "flush", "set", "inet", GUARD_TABLE, name, check=False)

    def dead(self) -> list[ManagedProcess]:
        return [p for p in self._procs if not p.alive()] + self.control_plane.dead()

    def assert_alive(self) -> None:
        died = self.dead()
        if died:
            raise RuntimeError(
                "node component died: "
                + "; ".join(f"{p.name} exited {p.popen.returncode}:\n{p.log_tail()}" for p in died)
            )

    # ---- start

    def _start(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        self.logs.mkdir(parents=True, exist_ok=True)
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            raise RuntimeError(
                f"bridge {BRIDGE} exists: another node runs, or one was killed; "
                "`python -m tests.cluster.node clean` removes what a killed one left"
            )
        MachineRecord.save()
        self._make_cgroups()
        self._make_network()
        self.control_plane.start()
        self._start_containerd(deadline)
        self.import_image(self._pause_archive())
        for archive in self.images:
            self.import_image(archive)
        self._start_kubelet()
        self._start_kube_proxy()
        self._start_scheduler()
        self._start_coredns(deadline)
        self._wait_node_ready(deadline)
        self._wait_default_service_account(deadline)

    def _make_cgroups(self) -> None:
        for root in cgroup_v1_hierarchies():
            path = root / CGROUP_NAME
            path.mkdir(exist_ok=True)
            if (root / "cpuset.cpus").exists():
                # A new cpuset cgroup has no CPUs or memory nodes until given its parent's.
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (path / knob).write_text((root / knob).read_text())
        v2 = cgroup_v2_root()
        if v2 is None:
            raise BinariesMissing("no cgroup2 mount: the node guard matches its daemons by cgroup")
        (v2 / CGROUP_NAME).mkdir(exist_ok=True)

    def _make_network(self) -> None:
        prefix = POD_CIDR.split("/")[1]
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{HOST_IP}/{prefix}", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        # Forwarding for the bridge only: pods reach services (DNAT back onto the bridge),
        # and nothing else on the machine starts routing.
        _write_sysctl(f"net/ipv4/conf/{BRIDGE}/forwarding", "1")
        _sh("nft", "-f", "-", input=self._guard_rules())

    def _guard_rules(self) -> str:
        v2 = cgroup_v2_root()
        assert v2 is not None
        # nft resolves a cgroupv2 path below /sys/fs/cgroup.
        cgroup_path = str((v2 / CGROUP_NAME).relative_to("/sys/fs/cgroup"))
        daemons = f'socket cgroupv2 level 1 "{cgroup_path}"'
        local = f"{{ 127.0.0.0/8, {POD_CIDR}, {SERVICE_CIDR} }}"
        cluster = f"{{ {POD_CIDR}, {SERVICE_CIDR} }}"
        record = "update @escaped { ip daddr . meta l4proto . th dport } counter drop"
        # Neighbour discovery and router solicitations stay on the link.
        beyond6 = "ip6 daddr != { fe80::/10, ff02::/16 }"
        record6 = "update @escaped6 { ip6 daddr . meta l4proto } counter drop"
        return f"""
table inet {GUARD_TABLE} {{
  set escaped {{
    type ipv4_addr . inet_proto . inet_service
    flags dynamic
    size 4096
  }}
  set escaped6 {{
    type ipv6_addr . inet_proto
    flags dynamic
    size 4096
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    # A Service kube-proxy has not programmed yet: its address is ours, so no escape, but
    # the packet would follow the default route out.
    iifname "{BRIDGE}" ip daddr {SERVICE_CIDR} counter drop
    iifname "{BRIDGE}" oifname != "{BRIDGE}" meta nfproto ipv4 {record}
    iifname "{BRIDGE}" meta nfproto ipv6 {beyond6} {record6}
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    ip daddr {cluster} oifname != {{ "{BRIDGE}", "lo" }} counter drop
    {daemons} ip daddr != {local} {record}
    {daemons} meta nfproto ipv6 oifname != "lo" {beyond6} {record6}
  }}
}}
"""

    def spawn(self, name: str, argv: Sequence[str | Path], **kwargs: Any) -> ManagedProcess:
        """Start a node daemon inside the node's cgroup (so the guard sees its packets)."""
        proc = spawn(name, argv, self.logs / f"{name}.log", **kwargs)
        self._procs.append(proc)
        v2 = cgroup_v2_root()
        assert v2 is not None
        (v2 / CGROUP_NAME / "cgroup.procs").write_text(f"{proc.popen.pid}\n")
        return proc

    def _start_containerd(self, deadline: float) -> None:
        base = self.workdir / "containerd"
        (base / "state").mkdir(parents=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        cni_conf = self.workdir / "cni" / "net.d"
        cni_conf.mkdir(parents=True)
        (cni_conf / "10-mlkube.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        config = base / "config.toml"
        config.write_text(
            f"""version = 2
root = "{self.containerd_root}"
state = "{base / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{base / "containerd.sock.ttrpc"}"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The CRI asks for oom_score_adj -998 for sandboxes, which this container may not set.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{cni_conf}"
"""
        )
        # No registry is reachable: a pull must fail here, at a closed loopback port, not
        # after a name lookup that leaves the machine.
        env = {
            **os.environ,
            "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "",
        }
        proc = self.spawn("containerd", ["containerd", f"--config={config}"], env=env)
        self._wait(proc, deadline, lambda: self.socket.exists() and self._ctr_ok())

    def _ctr_ok(self) -> bool:
        try:
            self.ctr("version")
            return True
        except RuntimeError:
            return False

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "mlkube",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    # The gateway address is on the bridge already; isGateway would also turn
                    # on forwarding for the whole machine.
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": HOST_IP}]],
                        "routes": [{"dst": "0.0.0.0/0", "gw": HOST_IP}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                }
            ],
        }

    def _pause_archive(self) -> Path:
        return single_binary_image(
            self.binaries.pause, PAUSE_IMAGE, cache_root() / "images", entrypoint="/pause"
        )

    def _node_kubeconfig(self, name: str, user: str, groups: Sequence[str]) -> Path:
        return self.control_plane.kubeconfig_for_user(
            user, groups, path=self.workdir / f"{name}.kubeconfig"
        )

    def _start_kubelet(self) -> None:
        cp = self.control_plane
        pki = self.workdir / "kubelet-pki"
        pki.mkdir()
        serving = cp.ca.issue(NODE_NAME, server=True, dns=[NODE_NAME], ips=[HOST_IP])
        (pki / "kubelet.crt").write_bytes(serving.cert_pem)
        (pki / "kubelet.key").write_bytes(serving.key_pem)
        (pki / "kubelet.key").chmod(0o600)
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": HOST_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(cp.ca_file)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_NAME}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [HOST_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            # Pods never get the machine's resolver: cluster names only.
            "resolvConf": "",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            # The imported images can't be pulled again: never collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "protectKernelDefaults": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "staticPodPath": "",
            "podPidsLimit": -1,
            "maxPods": 110,
        }
        path = self.workdir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        kubeconfig = self._node_kubeconfig(
            "kubelet", f"system:node:{NODE_NAME}", ["system:masters"]
        )
        self.spawn(
            "kubelet",
            [
                self.binaries.kubelet,
                f"--config={path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.workdir / 'kubelet'}",
                f"--cert-dir={pki}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={HOST_IP}",
                "--v=1",
            ],
        )
        self._started_kubelet = True

    def _start_kube_proxy(self) -> None:
        kubeconfig = self._node_kubeconfig("kube-proxy", "system:kube-proxy", ["system:masters"])
        self.spawn(
            "kube-proxy",
            [
                self.binaries.kube_proxy,
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                "--proxy-mode=nftables",
                f"--cluster-cidr={POD_CIDR}",
                # Leave the machine's conntrack settings alone.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                # Service traffic between pods on one bridge is bridged on the way back
                # unless it is masqueraded through the host; this avoids br_netfilter.
                "--masquerade-all",
                f"--nodeport-addresses={HOST_IP}/32",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
                "--v=1",
            ],
        )

    def _start_scheduler(self) -> None:
        kubeconfig = self._node_kubeconfig("scheduler", "system:kube-scheduler", ["system:masters"])
        self.spawn(
            "kube-scheduler",
            [
                self.binaries.kube_scheduler,
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )

    def _start_coredns(self, deadline: float) -> None:
        kubeconfig = self._node_kubeconfig("coredns", "coredns", ["system:masters"])
        health, ready = free_port(), free_port()
        corefile = self.workdir / "Corefile"
        # No forwarder: a name outside the cluster gets no answer, never the machine's DNS.
        corefile.write_text(
            f""".:53 {{
    bind {HOST_IP}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} mlkube-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loop
}}
"""
        )
        proc = self.spawn("coredns", [self.binaries.coredns, "-conf", corefile])
        self._wait(proc, deadline, lambda: _http_status(f"http://127.0.0.1:{ready}/ready") == 200)

    def _wait(self, proc: ManagedProcess, deadline: float, ready: Any) -> None:
        while not ready():
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} not ready in time:\n{proc.log_tail()}")
            time.sleep(0.2)

    def _wait_for(self, what: str, deadline: float, ready: Any) -> None:
        while not ready():
            self.assert_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached in {self.start_timeout}s")
            time.sleep(0.5)

    def _wait_node_ready(self, deadline: float) -> None:
        def ready() -> bool:
            out = self.kubectl(
                "get",
                "node",
                NODE_NAME,
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
                check=False,
            )
            return out.stdout.strip() == "True"

        self._wait_for(f"node {NODE_NAME} Ready", deadline, ready)

    def _wait_default_service_account(self, deadline: float) -> None:
        def ready() -> bool:
            return (
                self.kubectl("get", "sa", "default", "-n", "default", check=False).returncode == 0
            )

        self._wait_for("the default ServiceAccount", deadline, ready)

    # ---- stop

    def stop(self) -> None:
        """Pods first (through the kubelet, so CNI releases their addresses and namespaces),
        then the daemons, then everything made on the machine. Idempotent; a second Ctrl-C
        does not cut it short."""
        with self._lock, _signals_deferred():
            problems: list[str] = []
            if self._started_kubelet and self.control_plane.port:
                self._stop_controllers()
                with contextlib.suppress(Exception):
                    self._delete_all_pods()
            containerd = [p for p in self._procs if p.name == "containerd"]
            for proc in reversed(self._procs):
                if proc.name != "containerd":
                    proc.stop(grace=15)
            if containerd and containerd[0].alive():
                self._remove_leftover_containers(problems)
            for proc in containerd:
                proc.stop(grace=15)
            self._procs.clear()
            self._started_kubelet = False
            self.control_plane.stop()
            problems += clean_machine([self.workdir, self.containerd_root])
            if not os.environ.get("MLKUBE_K8S_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)
            if problems:
                print("node teardown: " + "; ".join(problems), file=sys.stderr)

    def _stop_controllers(self) -> None:
        """Nothing may create pods while they are being removed."""
        for proc in self._procs:
            if proc.name not in ("containerd", "kubelet", "kube-proxy", "coredns"):
                proc.stop()

    def _delete_all_pods(self, timeout: float = 60.0) -> None:
        self.kubectl(
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
            check=False,
            timeout=timeout,
        )
        # The kubelet stops each sandbox (CNI DEL releases its address and network
        # namespace) once it sees the pod gone.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.ctr("tasks", "ls", "-q", check=False).split():
                return
            time.sleep(0.5)

    def _remove_leftover_containers(self, problems: list[str]) -> None:
        """Containers the kubelet did not remove (it was stopped, or died): their tasks
        would keep running and their metadata would outlive the node in the image store."""
        ids = self.ctr("containers", "ls", "-q", check=False).split()
        for cid in ids:
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            self.ctr("tasks", "rm", "-f", cid, check=False)
            self.ctr("containers", "rm", cid, check=False)
        if ids:
            problems.append(f"removed {len(ids)} containers the kubelet left")


def _kill_cgroup(path: Path) -> None:
    """SIGKILL every process in `path` and below."""
    for d, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            for pid in (Path(d) / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return 0


def machine_state() -> dict[str, Any]:
    """What a node could leave behind on this machine, to compare before and after one."""
    names = {
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "kubelet",
        "kube-proxy",
        "kube-scheduler",
        "coredns",
        "kube-apiserver",
        "kube-controller-manager",
        "etcd",
        "pause",
        "kuberay-operator",
        "kserve-manager",
    }
    # The e2e lane's control planes run these too, in their own workdirs (mlkube-k8s-*):
    # only a node's (under mlkube-node-*) are the node's.
    also_standalone = {"kube-apiserver", "kube-controller-manager", "etcd"}
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                comm = (entry / "comm").read_text().strip()
                cmdline = (entry / "cmdline").read_bytes()
                if comm in also_standalone and b"mlkube-node-" not in cmdline:
                    continue
                if comm in names or comm.startswith("containerd-shim"):
                    procs.append(f"{entry.name} {comm}")
    v1 = [
        str(root / CGROUP_NAME) for root in cgroup_v1_hierarchies() if (root / CGROUP_NAME).exists()
    ]
    v2 = cgroup_v2_root()
    tables = _sh("nft", "list", "tables", check=False).split("\n")
    return {
        "processes": sorted(procs),
        "mounts": sorted(
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if "mlkube" in line
            or "/var/lib/kubelet" in line
            or "/run/containerd" in line
            or "netns" in line
        ),
        "network namespaces": sorted(netns_names()),
        "links": sorted(os.listdir("/sys/class/net")),
        "nftables tables": sorted(t.strip() for t in tables if t.strip()),
        "sysctls": {name: _read_sysctl(name) for name in SYSCTLS},
        "cgroups": v1 + ([str(v2 / CGROUP_NAME)] if v2 and (v2 / CGROUP_NAME).exists() else []),
        "fixed paths": sorted(str(p) for p in FIXED_PATHS if p.exists()),
    }


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What `after` has that `before` had not (or had otherwise), one line each."""
    lines = []
    for key, old in before.items():
        new = after.get(key)
        if isinstance(old, dict):
            lines += [
                f"{key}: {k} was {v!r}, now {new.get(k)!r}"
                for k, v in old.items()
                if new.get(k) != v
            ]
        else:
            extra = sorted(set(new) - set(old))
            if extra:
                lines.append(f"{key} left behind: {', '.join(extra)}")
    return lines


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from tests.cluster.images import image_archives

    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.node", description="Run the real test node by hand."
    )
    parser.add_argument("cmd", choices=["up", "clean"])
    parser.add_argument("--no-images", action="store_true", help="import no built images")
    parser.add_argument(
        "--controllers", action="store_true", help="also run the real KubeRay and KServe"
    )
    args = parser.parse_args(argv)
    if args.cmd == "clean":
        problems = clean_machine()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    images = [] if args.no_images else list(image_archives().values())
    started = time.monotonic()
    with Node(images=images) as node:
        print(f"node Ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        if args.controllers:
            from tests.cluster.controllers import start_kserve, start_kuberay

            start_kuberay(node)
            start_kserve(node)
            print(f"controllers up at {time.monotonic() - started:.1f}s", file=sys.stderr)
        print(f"export KUBECONFIG={node.kubeconfig}", flush=True)
        try:
            while not node.dead():
                time.sleep(1)
            node.assert_alive()
        except KeyboardInterrupt:
            return 0
    return 1


class MachineRecord:
    """What the machine had before the first node started (kernel settings, nftables
    tables, network namespaces, fixed paths), kept in a file so that a node killed
    without its teardown can still be cleaned up after by `clean`."""

    @staticmethod
    def path() -> Path:
        return cache_root() / "node" / "machine-before.json"

    @classmethod
    def save(cls) -> None:
        path = cls.path()
        if path.exists():  # a killed node's record: the values from before it are the ones
            return
        record = {
            "sysctls": {n: v for n in SYSCTLS if (v := _read_sysctl(n)) is not None},
            "tables": nft_tables(),
            "netns": sorted(netns_names()),
            "fixed_paths": [str(p) for p in FIXED_PATHS if p.exists()],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(cls.path().read_text()))
        return None


def nft_tables() -> list[str]:
    lines = _sh("nft", "list", "tables", check=False).splitlines()
    return sorted(line.strip() for line in lines if line.strip())


def clean_machine(roots: Sequence[Path] = ()) -> list[str]:
    """Undo what a node did to the machine, whether it stopped or was killed: its
    processes, mounts, network namespaces, bridge, nftables tables, kernel settings and
    cgroups. Returns what could not be undone."""
    problems: list[str] = []
    record = MachineRecord.load()
    # containerd's shims and the pods' processes detach from their parents.
    for cgroup in _node_cgroups():
        _kill_cgroup(cgroup)
    workdirs = list(Path(tempfile.gettempdir()).glob("mlkube-node-*"))
    for point in mounts_under([*roots, *workdirs, cache_root() / "node", *FIXED_PATHS]):
        _sh("umount", "-l", point, check=False)
    if record:
        for name in netns_names() - set(record["netns"]):
            if name.startswith("cni-"):
                _sh("ip", "netns", "delete", name, check=False)
        for table in set(nft_tables()) - set(record["tables"]):
            _sh("nft", "delete", *table.split(), check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _sh("ip", "link", "delete", BRIDGE, check=False)
    if record:
        for name, value in record["sysctls"].items():
            if _read_sysctl(name) != value:
                _write_sysctl(name, value)
        for path in FIXED_PATHS:
            if str(path) not in record["fixed_paths"] and path.exists():
                shutil.rmtree(path, ignore_errors=True)
    for cgroup in _node_cgroups():
        dirs = sorted((Path(d) for d, _, _ in os.walk(cgroup)), key=lambda p: len(p.parts))
        for d in reversed(dirs):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    _kill_cgroup(d)
                    time.sleep(0.1)
            else:
                problems.append(f"cgroup {d} could not be removed")
    if not problems:
        MachineRecord.path().unlink(missing_ok=True)
    return problems


def _node_cgroups() -> list[Path]:
    roots = cgroup_v1_hierarchies()
    v2 = cgroup_v2_root()
    if v2:
        roots.append(v2)
    return [root / CGROUP_NAME for root in roots if (root / CGROUP_NAME).exists()]


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


if __name__ == "__main__":
    sys.exit(_main())
